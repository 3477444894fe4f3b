"""Fault injection for the crash and I/O-error tests.

``LMEXPAND_KILL_AT=point`` makes the process SIGKILL itself when it reaches ``point``,
leaving exactly what an external ``kill -9`` would (``LMEXPAND_KILL_SIGNAL=TERM`` or ``INT``
sends that signal instead, as ``kill``, a scheduler or Ctrl-C would, and waits for it). ``LMEXPAND_FAULT=ERRNO@BYTES`` (e.g.
``ENOSPC@1000000`` or ``EIO@0``) makes the checkpoint writer's next write fail with that
error once the process has written ``BYTES`` bytes, as a full or failing disk would.
Unset, each check costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time

_written = 0


def kill_point(point: str) -> None:
    if os.environ.get("LMEXPAND_KILL_AT") == point:
        sig = getattr(signal, "SIG" + os.environ.get("LMEXPAND_KILL_SIGNAL", "KILL").upper())
        os.kill(os.getpid(), sig)
        time.sleep(5)  # a handled signal raises here, in the main thread


def io_fault(nbytes: int) -> None:
    """Called by the writer before writing ``nbytes``; raises the configured error."""
    global _written
    spec = os.environ.get("LMEXPAND_FAULT")
    if not spec:
        return
    name, _, at = spec.partition("@")
    code = getattr(errno, name, None)
    if not isinstance(code, int):
        raise ValueError(f"LMEXPAND_FAULT={spec!r}: unknown errno name {name!r}")
    if _written + nbytes > int(at or 0):
        raise OSError(code, os.strerror(code))
    _written += nbytes
