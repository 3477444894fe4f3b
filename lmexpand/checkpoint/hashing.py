"""sha256 of every shard, computed while the shards are written.

A :class:`ShardHasher` hashes a shard from the bytes the plan puts in it (its
:func:`shard_segments`: source ranges read from the page cache, holes as zeros, computed
tensors read back once written), by one thread per shard, as many at a time as there are
cores; the raw-copied bytes it reads are checked for NaN/Inf on the way. The digest is what
``sha256sum`` prints for the finished file (:func:`sha256_file`), recorded in
``lmexpand.json`` under ``"shards"`` and recomputed by ``lmexpand verify``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from lmexpand.checkpoint.finite import FiniteCheck, is_float, non_finite_error
from lmexpand.checkpoint.safetensors_format import TensorSlot
from lmexpand.checkpoint.shards import Producer, RawCopy, Zeros
from lmexpand.errors import CheckpointError


@dataclass(frozen=True)
class Segment:
    """A run of a shard's bytes, as the plan defines them: ``kind`` is 'bytes' (``data``:
    the header), 'source' (``length`` bytes of ``path`` from ``offset``: a raw copy), 'zeros'
    (a hole) or 'output' (a computed tensor: read back from the shard once written)."""

    kind: str
    length: int
    data: bytes = b""
    path: Path | None = None
    offset: int = 0
    name: str = ""  # the tensor a 'source' segment copies, and its dtype: its values are checked finite
    dtype: str = ""


def shard_segments(header: bytes, slots: Sequence[TensorSlot], producers: Mapping[str, Producer]) -> list[Segment]:
    segments = [Segment("bytes", len(header), data=header)]
    for slot in slots:
        producer = producers[slot.name]
        if isinstance(producer, RawCopy) and producer.info.offset >= 0:
            segments.append(Segment("source", slot.nbytes, path=producer.info.file, offset=producer.info.offset,
                                    name=slot.name, dtype=slot.dtype))
        elif isinstance(producer, Zeros):
            segments.append(Segment("zeros", slot.nbytes))
        else:
            segments.append(Segment("output", slot.nbytes))
    return segments


_ZEROS = bytes(256 * 1024)


class ShardHasher:
    """sha256 of a shard, computed from the bytes the plan puts in it, by a thread of its
    own that starts at once, not behind the writer: raw-copied ranges are read from the
    source (page cache), holes hashed as zeros, the header from memory, and only computed
    tensors read back from the shard once the writer has written them (:meth:`advance`).
    The raw-copied bytes it reads are also checked for NaN/Inf (computed tensors are checked
    in memory): a non-finite value stops the write (:attr:`failure`), naming the tensor and
    the model it came from.
    Every shard's hasher runs beside the copy, up to ``gate`` of them at a time (one per
    core). The digest is what ``sha256sum`` prints for the finished file, which
    ``lmexpand verify`` recomputes from the file itself.

    The writer calls :meth:`advance` with the length written so far, :meth:`close` with
    the final size, and :meth:`finish` for the digest (or :meth:`abandon`).
    """

    def __init__(self, path: Path, segments: Sequence[Segment], gate: threading.Semaphore) -> None:
        self._path = path
        self._segments = list(segments)
        self._gate = gate
        self._sha = hashlib.sha256()
        self._target = 0
        self._closed = False
        self._abandoned = False
        self.size = 0
        self._expected = sum(s.length for s in self._segments)
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="lmexpand-sha256", daemon=True)
        self._thread.start()

    def advance(self, upto: int) -> None:
        with self._cond:
            self._target = max(self._target, upto)
            self._cond.notify()

    def _wait_written(self, upto: int) -> bool:
        with self._cond:
            while self._target < upto and not self._closed and not self._abandoned:
                self._cond.wait()
            return not self._abandoned

    def _read(self, fd: int, offset: int, length: int, view: memoryview, what: str,
              check: "FiniteCheck | None" = None) -> None:
        end = offset + length
        while offset < end and not self._abandoned:
            n = os.preadv(fd, [view[: min(len(view), end - offset)]], offset)
            if n == 0:
                raise CheckpointError(f"{what} ended early while its bytes were being hashed")
            self._sha.update(view[:n])
            if check is not None:
                check.feed(view[:n])
            offset += n

    @property
    def failure(self) -> BaseException | None:
        """The error that stops this shard (non-finite values copied, a short file), as soon
        as the hasher found it: the writer stops at the next tensor."""
        return self._error

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        try:
            while not self._gate.acquire(timeout=0.1):
                if self._abandoned:
                    return
            try:
                view = memoryview(bytearray(_HASH_CHUNK))
                pos = 0
                for seg in self._segments:
                    if self._abandoned:
                        return
                    if seg.kind == "bytes":
                        self._sha.update(seg.data)
                    elif seg.kind == "zeros":
                        left = seg.length
                        while left and not self._abandoned:
                            step = min(left, len(_ZEROS))
                            self._sha.update(_ZEROS[:step])
                            left -= step
                    else:
                        if seg.kind == "source":
                            assert seg.path is not None
                            path, offset, what = seg.path, seg.offset, f"the source {seg.path}"
                        else:
                            if not self._wait_written(pos + seg.length):
                                return
                            path, offset, what = self._path, pos, f"the shard {self._path.name}"
                        if path not in fds:
                            fds[path] = os.open(path, os.O_RDONLY)
                        check = FiniteCheck(seg.dtype) if seg.kind == "source" and is_float(seg.dtype) else None
                        self._read(fds[path], offset, seg.length, view, what, check)
                        if check is not None and check.bad:
                            raise non_finite_error(seg.name, check.bad, seg.length // check.size,
                                                   f"copied from {seg.path}", seg.path.parent)
                    pos += seg.length
            finally:
                self._gate.release()
        except BaseException as e:  # reported by finish()
            self._error = e
        finally:
            for fd in fds.values():
                os.close(fd)

    def close(self, size: int) -> None:
        """The file is complete at ``size`` bytes; hashing goes on in the background."""
        self.size = size
        with self._cond:
            self._target = size
            self._closed = True
            self._cond.notify()

    def finish(self) -> str:
        """Wait for the digest (after :meth:`close`)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self.size != self._expected:
            raise CheckpointError(f"{self._path.name}: {self.size:,} bytes written, the plan has {self._expected:,} "
                                  "(a bug in the writer)")
        return self._sha.hexdigest()

    def abandon(self) -> None:
        with self._cond:
            self._abandoned = True
            self._cond.notify()
        self._thread.join()


class NoHash:
    """bench/surgery.py's measure of the hashes' cost (LMEXPAND_BENCH_NO_HASH=1, not a user
    option): no shard is recorded, as in a directory lmexpand did not write."""

    size = 0
    failure = None

    def advance(self, upto: int) -> None:
        pass

    def close(self, size: int) -> None:
        self.size = size

    def finish(self) -> str:
        return ""

    def abandon(self) -> None:
        pass


_HASH_CHUNK = 256 * 1024  # hashed while in L2: 5 % faster than 8 MB reads here


def sha256_file(path: Path) -> str:
    """sha256 of a whole file (what ``sha256sum`` prints)."""
    sha = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            sha.update(view[:n])
    return sha.hexdigest()
