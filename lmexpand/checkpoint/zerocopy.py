"""The writer's low-level file I/O: byte ranges copied in the kernel, writeback started early.

* :func:`copy_range` appends a byte range of a source file to the output in the kernel
  (``copy_file_range``, falling back to chunked reads where the filesystems cannot): no
  deserialization, no copy in user memory;
* :class:`WriteBehind` starts the disk writeback of a shard as it grows
  (``sync_file_range``), so the final fsync is short and the copy never stalls on a page
  cache full of dirty pages;
* :func:`write_all`, :func:`fsync_dir` and :class:`SourceFiles` (each source file opened
  once) are the rest of what the writer needs from the system.

Every write and copy passes through :func:`lmexpand.faults.io_fault`, so the fault-injection
tests can make any of them fail.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Callable

from lmexpand.errors import CheckpointError
from lmexpand.faults import io_fault

_CHUNK = 64 * 1024 * 1024


def write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    io_fault(len(view))
    while view:
        n = os.write(fd, view)
        view = view[n:]


def copy_range(src_fd: int, dst_fd: int, offset: int, count: int,
               progress: Callable[[], None] = lambda: None) -> None:
    """Append ``count`` bytes of ``src_fd`` from ``offset`` to ``dst_fd``'s position, calling
    ``progress`` after every step of at most 64 MB (the hasher and the writeback follow)."""
    remaining = count
    io_fault(count)
    try:
        while remaining:
            n = os.copy_file_range(src_fd, dst_fd, min(remaining, _COPY_STEP), offset)
            if n == 0:
                raise CheckpointError(f"source ended early while copying ({remaining} bytes missing)")
            offset += n
            remaining -= n
            progress()
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
            raise
    while remaining:  # copy_file_range unsupported here: plain chunked copy
        data = os.pread(src_fd, min(remaining, _CHUNK), offset)
        if not data:
            raise CheckpointError(f"source ended early while copying ({remaining} bytes missing)")
        write_all(dst_fd, data)
        offset += len(data)
        remaining -= len(data)
        progress()


_WRITE_BEHIND = 32 * 1024 * 1024
_COPY_STEP = 64 * 1024 * 1024


def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE)``: start writing
    a range back to disk without waiting for it. None where the system has none."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, count: int) -> None:
        fn(fd, offset, count, 2)  # SYNC_FILE_RANGE_WRITE; a failure only loses the head start

    return start


_sync_file_range = _load_sync_file_range()


class WriteBehind:
    """Starts the disk writeback of each 32 MB a shard grows by, while the next bytes are
    copied: the final fsync then waits for the last few MB instead of the whole shard, and
    the page cache never fills with dirty pages (whose throttling stalls a copy of several
    GB for seconds at a time, as it does ``cp``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.started = 0

    def advance(self, upto: int) -> None:
        if _sync_file_range is not None and upto - self.started >= _WRITE_BEHIND:
            _sync_file_range(self.fd, self.started, upto - self.started)
            self.started = upto


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SourceFiles:
    """Open source files once each, for raw copies."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
