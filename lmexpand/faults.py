"""Fault injection for the crash tests.

``LMEXPAND_KILL_AT=point`` makes the process SIGKILL itself when it reaches ``point``,
leaving exactly what an external ``kill -9`` would. Unset, a kill point costs one lookup.
"""

from __future__ import annotations

import os
import signal


def kill_point(point: str) -> None:
    if os.environ.get("LMEXPAND_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
