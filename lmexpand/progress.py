"""Progress display on stderr (stdout stays machine-readable).

Shown only when stderr is a terminal and ``LMEXPAND_NO_PROGRESS`` is unset; otherwise a
single summary line is logged when the task ends.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from lmexpand.units import human_bytes

log = logging.getLogger("lmexpand")


def _interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("LMEXPAND_NO_PROGRESS")


@contextmanager
def byte_progress(total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(nbytes)``; shows bytes done, bytes/s and time left."""
    start = time.perf_counter()
    done = 0
    if _interactive():
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        with Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
        ) as bar:
            task = bar.add_task(description, total=total)

            def advance(n: int) -> None:
                nonlocal done
                done += n
                bar.update(task, advance=n)

            yield advance
    else:
        def advance(n: int) -> None:
            nonlocal done
            done += n

        yield advance
    seconds = time.perf_counter() - start
    log.info("%s: %s in %.1f s (%s/s)", description, human_bytes(done), seconds,
             human_bytes(done / seconds if seconds > 0 else 0))
