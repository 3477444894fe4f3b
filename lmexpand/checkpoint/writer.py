"""Streaming, atomic checkpoint writer.

Every output tensor's name, dtype and shape are known before any value is read, so each
shard's safetensors header is written first and the values are streamed in after it:

* a :class:`RawCopy` moves the source file's bytes in the kernel (``copy_file_range``,
  falling back to ``sendfile`` and then to chunked reads): no deserialization, no copy in
  user memory;
* :class:`Zeros` become a hole in the file (reads as zeros; nothing allocated or written);
* a :class:`Computed` tensor is materialized (one at a time) and its bytes written.

Output goes into a temporary directory beside the target, every file is fsynced, and the
directory is renamed into place only when complete: a crash or a full disk never leaves a
target that looks complete but is not.

Every shard's sha256 is computed while the shards are written, from the bytes the plan puts
in them (source ranges read from the page cache, holes as zeros, computed tensors read back
once written), by one thread per shard, as many at a time as there are cores, and recorded
in ``lmexpand.json`` under ``"shards"`` when the output has one. The disk writeback of each
shard is started as it grows (``sync_file_range``), so the final fsync is short and the
copy never stalls on a page cache full of dirty pages.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence, Union

from lmexpand.checkpoint.compat import for_every_client
from lmexpand.checkpoint.finite import FiniteCheck, is_float
from lmexpand.checkpoint.reader import INDEX_FILE, LINEAGE_FILE, SINGLE_FILE, st_dtype_of
from lmexpand.checkpoint.safetensors_format import TensorInfo, TensorSlot, alignment_order, encode_header
from lmexpand.errors import CheckpointError, DiskFullError, TargetError
from lmexpand.faults import io_fault, kill_point
from lmexpand.progress import byte_progress
from lmexpand.units import human_bytes

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lmexpand")

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
_CHUNK = 64 * 1024 * 1024
_PARTIAL = ".lmexpand-partial-"
_OLD = ".lmexpand-old-"


@dataclass(frozen=True)
class RawCopy:
    """The bytes of a source tensor, unchanged."""

    info: TensorInfo


@dataclass(frozen=True)
class Zeros:
    """All-zero bytes."""


@dataclass(frozen=True)
class Computed:
    """A tensor computed on demand; called once, when its turn to be written comes.
    ``finite_checked``: the producer has already refused NaN/Inf (with a message naming
    where the values came from), so the writer does not scan it again."""

    fn: Callable[[], "torch.Tensor"]
    finite_checked: bool = False


Producer = Union[RawCopy, Zeros, Computed]


@dataclass(frozen=True)
class OutputTensor:
    slot: TensorSlot
    producer: Producer

    @property
    def name(self) -> str:
        return self.slot.name


# -- low-level I/O (module functions so fault-injection tests can replace them) ------------
def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data).cast("B")
    io_fault(len(view))
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int,
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
        _write_all(dst_fd, data)
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


class _WriteBehind:
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


@dataclass(frozen=True)
class _Segment:
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


def shard_segments(header: bytes, slots: Sequence[TensorSlot], producers: Mapping[str, Producer]) -> list[_Segment]:
    segments = [_Segment("bytes", len(header), data=header)]
    for slot in slots:
        producer = producers[slot.name]
        if isinstance(producer, RawCopy) and producer.info.offset >= 0:
            segments.append(_Segment("source", slot.nbytes, path=producer.info.file, offset=producer.info.offset,
                                     name=slot.name, dtype=slot.dtype))
        elif isinstance(producer, Zeros):
            segments.append(_Segment("zeros", slot.nbytes))
        else:
            segments.append(_Segment("output", slot.nbytes))
    return segments


_ZEROS = bytes(256 * 1024)


class _ShardHasher:
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

    def __init__(self, path: Path, segments: Sequence[_Segment], gate: threading.Semaphore) -> None:
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


class _NoHash:
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- target checks ------------------------------------------------------------------------
def _within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def existing_ancestor(path: Path) -> Path:
    """The nearest ancestor of ``path`` (itself included) that exists."""
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output(target: Path, *, inputs: Iterable[tuple[str, Path]] = (), force: bool = False,
                 label: str = "output", replaces: bool = True, where: str = "") -> Path:
    """The one check of an output location, before any work (every command calls it).

    Refuses, naming the path and the fix: an output that is, contains or lies inside any
    input (symlinks resolved: ``--out`` equal to the model being trained, or a parent of it,
    would delete it under ``--force``); a file where the output directory goes; a parent
    that is a file; a location whose nearest existing parent is not writable; and,
    when the output ``replaces`` what is there, a non-empty one without ``force``. Creates
    nothing. Returns the resolved target. ``inputs`` are (what, path) pairs, e.g.
    ("--model", model_dir), ("--data", file). ``where`` prefixes the message (a recipe's path).
    """
    pre = f"{where}: " if where else ""
    resolved = Path(os.path.abspath(target)).resolve()
    for what, src in inputs:
        src_resolved = Path(src).resolve()
        if resolved == src_resolved:
            raise TargetError(f"{pre}{label} {target} is the {what} {src} this command reads: it would be "
                              f"{'replaced' if replaces else 'written into'}. Choose another {label}.")
        if _within(src_resolved, resolved) and replaces:
            raise TargetError(f"{pre}{label} {target}: the {what} {src} this command reads is inside the output "
                              f"directory, which would be replaced. Choose a {label} that does not hold its inputs.")
        if _within(resolved, src_resolved):
            raise TargetError(f"{pre}{label} {target} is inside the {what} {src} this command reads: writing there "
                              f"changes an input. Choose a {label} outside it.")
    anc = existing_ancestor(resolved)
    if anc != resolved and not anc.is_dir():
        raise TargetError(f"{pre}{label} {target}: its parent {anc} is a file, not a directory. Choose another {label}.")
    place = anc if anc != resolved else resolved.parent  # where the output would be created
    if not os.access(place, os.W_OK | os.X_OK):
        raise TargetError(f"{pre}{label} {target}: {place} is not writable by this user. Choose a {label} where you can "
                          "write, or fix the permissions.")
    if resolved.exists():
        if not resolved.is_dir():
            raise TargetError(f"{pre}{label} {target}: exists and is a file. Remove it or choose another {label}.")
        if replaces and any(resolved.iterdir()) and not force:
            raise TargetError(
                f"{pre}{label} {target}: exists and is not empty. Pass --force to replace it, or choose another {label}."
            )
    return resolved


def check_target(target: Path, *, force: bool, sources: Iterable[Path] = ()) -> Path:
    """A model directory written by the writer: :func:`check_output` with the sources as inputs."""
    return check_output(target, inputs=[("source", Path(s)) for s in sources], force=force, label="output")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def left_by_dead_process(p: Path) -> bool:
    """A temporary path named ``...-PID`` whose writing process is gone (not this one)."""
    pid_text = p.name.rsplit("-", 1)[-1]
    return pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))


def partial_path(target: Path) -> Path:
    """Where this process writes ``target`` before renaming it into place (a file or a
    directory): hidden, beside it, named for this process."""
    return target.parent / f".{target.name}{_PARTIAL}{os.getpid()}"


def clean_stale_partials(target: Path) -> None:
    """Remove what killed earlier runs left beside ``target``: every hidden partial output
    (``.NAME.lmexpand-partial-PID``, a file or a directory) or old output moved aside
    (``.NAME.lmexpand-old-PID``) in its directory whose process is gone, whatever output it
    was for; an old output whose target is missing is put back first. Every command that
    writes calls this before writing."""
    parent = target.parent
    if not parent.is_dir():
        return
    for p in parent.glob(f".*{_OLD}*"):
        # a run killed between moving the old output aside and moving the new one in
        original = parent / p.name[1:].rsplit(_OLD, 1)[0]
        if left_by_dead_process(p) and not os.path.lexists(original):
            log.warning("restoring %s from %s (an interrupted run had moved it aside)", original, p.name)
            os.rename(p, original)
    for marker in (_PARTIAL, _OLD):
        for p in parent.glob(f".*{marker}*"):
            if left_by_dead_process(p):
                log.info("removing %s left by an interrupted run", p)
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


# -- sharding -------------------------------------------------------------------------------
def plan_shards(slots: Sequence[TensorSlot], max_shard_size: int) -> list[list[TensorSlot]]:
    """In order, into as few shards as greedy filling to ``max_shard_size`` gives, of sizes
    as equal as the tensors allow (a tensor larger than the limit gets a shard of its own):
    equal shards hash in parallel on as many cores as there are shards, where greedy
    filling leaves a small last shard and one long hash."""
    greedy: list[list[TensorSlot]] = [[]]
    size = 0
    for slot in slots:
        if greedy[-1] and size + slot.nbytes > max_shard_size:
            greedy.append([])
            size = 0
        greedy[-1].append(slot)
        size += slot.nbytes
    n = len(greedy)
    if n > 1:
        target = sum(s.nbytes for s in slots) / n
        balanced: list[list[TensorSlot]] = [[] for _ in range(n)]
        start = 0
        for slot in slots:  # each tensor goes to the shard its middle byte falls in
            balanced[min(n - 1, int((start + slot.nbytes / 2) // target))].append(slot)
            start += slot.nbytes
        balanced = [b for b in balanced if b]
        if len(balanced) == n and all(len(b) == 1 or sum(s.nbytes for s in b) <= max_shard_size for b in balanced):
            greedy = balanced
    return [alignment_order(s) for s in greedy if s] or [[]]


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


# -- the writer -----------------------------------------------------------------------------
class _SourceFiles:
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


def non_finite_error(name: str, bad: int, numel: int, origin: str, model: Path | None = None) -> CheckpointError:
    """The one message for NaN/Inf met while writing: the tensor, where its values came
    from, that nothing was written, and what to check."""
    return CheckpointError(
        f"{name} ({origin}): {bad:,} of {numel:,} values are NaN/Inf. lmexpand never writes non-finite values, so "
        "nothing was written (the partial output was removed; the inputs are untouched). Find every such tensor "
        f"with `lmexpand verify {model or 'MODEL'} --values all` and use a model without them (a checkpoint saved "
        "after training diverged, or a damaged file).")


def _tensor_bytes(out: OutputTensor) -> memoryview:
    import torch

    assert isinstance(out.producer, Computed)
    t = out.producer.fn()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{out.name}: producer returned {type(t).__name__}, not a tensor")
    if tuple(t.shape) != out.slot.shape or st_dtype_of(t) != out.slot.dtype:
        raise CheckpointError(
            f"{out.name}: computed {st_dtype_of(t)}{list(t.shape)} but the plan promised "
            f"{out.slot.dtype}{list(out.slot.shape)} (a bug in the surgery plan)."
        )
    t = t.detach().to("cpu").contiguous()
    if not out.producer.finite_checked and t.is_floating_point() and t.numel():
        # one reduction, no temporary (NaN propagates through min/max, Inf shows in one of them)
        if not all(bool(torch.isfinite(x)) for x in torch.aminmax(t.reshape(-1))):
            raise non_finite_error(out.name, int((~torch.isfinite(t)).sum()), t.numel(), "computed while writing")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _write_shard(path: Path, header: bytes, slots: list[TensorSlot], producers: Mapping[str, Producer],
                 sources: _SourceFiles, hasher: "_ShardHasher | _NoHash", advance: Callable[[int], None]) -> None:
    """Write one shard (``header`` first); ``hasher`` follows it and finishes in the background."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    behind = _WriteBehind(fd)

    def written() -> None:  # the file is complete up to the current position
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        hasher.advance(pos)
        behind.advance(pos)

    try:
        _write_all(fd, header)
        hasher.advance(len(header))
        for i, slot in enumerate(slots):
            producer = producers[slot.name]
            if isinstance(producer, RawCopy):
                info = producer.info
                if info.offset < 0:
                    raise CheckpointError(f"{slot.name}: a pickle source has no byte range to copy (a bug in the plan)")
                if info.nbytes != slot.nbytes or info.dtype != slot.dtype:
                    raise CheckpointError(f"{slot.name}: raw copy of {info.name} does not match the output slot")
                _copy_range(sources.fd(info.file), fd, info.offset, info.nbytes, written)
            elif isinstance(producer, Zeros):
                # a hole: reads as zeros, costs no write (the final ftruncate fixes the length)
                os.lseek(fd, slot.nbytes, os.SEEK_CUR)
            else:
                _write_all(fd, _tensor_bytes(OutputTensor(slot, producer)))
                written()
            advance(slot.nbytes)
            if hasher.failure is not None:  # NaN/Inf in a copied tensor: stop now, not after every shard
                raise hasher.failure
            if i == len(slots) // 2:
                kill_point(f"write:mid-shard:{path.name}")
        size = os.lseek(fd, 0, os.SEEK_CUR)
        os.ftruncate(fd, size)
        os.fsync(fd)
        hasher.close(size)
    finally:
        os.close(fd)


def write_checkpoint(
    target: str | Path,
    tensors: Sequence[OutputTensor],
    *,
    files: Mapping[str, bytes | Path] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    sources: Iterable[Path] = (),
    metadata: Mapping[str, str] | None = None,
    description: str = "writing",
) -> Path:
    """Write ``tensors`` (in order, sharded) plus ``files`` (name -> bytes, or a path to copy)
    as a Hugging Face model directory at ``target``, atomically.

    Raises :class:`TargetError` before writing anything if the target is unusable and
    :class:`DiskFullError` (after removing the partial output) if the disk fills up.
    """
    target = Path(target)
    sources = [Path(s) for s in sources]
    resolved = check_target(target, force=force, sources=sources)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(f"tensor {dup!r} appears twice in the output (a bug in the surgery plan)")
    files = dict(files or {})
    for name in ("config.json", "tokenizer_config.json"):  # read the same by transformers 4.x and 5.x
        if name in files:
            content = files[name] if isinstance(files[name], bytes) else Path(files[name]).read_bytes()
            compatible = for_every_client(name, content)
            if compatible != content:
                files[name] = compatible
    total = sum(t.slot.nbytes for t in tensors)
    extra = sum(len(v) if isinstance(v, bytes) else Path(v).stat().st_size for v in files.values())

    free = shutil.disk_usage(existing_ancestor(resolved.parent)).free
    if free < total + extra:
        raise DiskFullError(
            f"{target}: needs {human_bytes(total + extra)} but only {human_bytes(free)} is free "
            f"on that device. Free space or choose an output directory on another disk."
        )
    resolved.parent.mkdir(parents=True, exist_ok=True)  # every check passed: only now create parents
    clean_stale_partials(resolved)

    tmp = partial_path(resolved)
    if tmp.exists():
        shutil.rmtree(tmp)
    producers = {t.name: t.producer for t in tensors}
    shards = plan_shards([t.slot for t in tensors], max_shard_size)
    filenames = shard_names(len(shards))
    meta = {"format": "pt", **(metadata or {})}
    src_files = _SourceFiles()
    try:
        tmp.mkdir()
        digests: dict[str, dict[str, object]] = {}
        headers = [encode_header(slots, meta)[0] for slots in shards]
        gate = threading.Semaphore(max(1, os.cpu_count() or 1))  # hashers at a time: one per core
        no_hash = os.environ.get("LMEXPAND_BENCH_NO_HASH") == "1"
        hashers: list[_ShardHasher | _NoHash] = []
        try:
            for filename, header, slots in zip(filenames, headers, shards):
                hashers.append(_NoHash() if no_hash else
                               _ShardHasher(tmp / filename, shard_segments(header, slots, producers), gate))
            with byte_progress(total, description) as advance:
                for filename, header, slots, hasher in zip(filenames, headers, shards, hashers):
                    _write_shard(tmp / filename, header, slots, producers, src_files, hasher, advance)
                    kill_point(f"write:after-shard:{filename}")
            for filename, hasher in zip(filenames, hashers):
                digest = hasher.finish()
                if digest:  # (none under the benchmark's no-hash switch: nothing recorded)
                    digests[filename] = {"sha256": digest, "bytes": hasher.size}
            hashers = []
        finally:
            for hasher in hashers:
                hasher.abandon()
        if isinstance(files.get(LINEAGE_FILE), bytes):
            lineage = json.loads(files[LINEAGE_FILE])
            lineage["shards"] = digests
            files[LINEAGE_FILE] = (json.dumps(lineage, indent=2) + "\n").encode()
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": total},
                "weight_map": {s.name: f for f, shard in zip(filenames, shards) for s in shard},
            }
            files[INDEX_FILE] = (json.dumps(index, indent=2) + "\n").encode()
        for name, content in files.items():
            dest = tmp / name
            if isinstance(content, bytes):
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    _write_all(fd, content)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                shutil.copyfile(content, dest)
        _fsync_dir(tmp)
        kill_point("write:before-rename")
        _move_into_place(tmp, resolved)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"{target}: the disk filled up while writing ({e.strerror}); the partial output was "
                f"removed and the source is untouched. Free at least {human_bytes(total + extra)} "
                "or choose an output directory on another disk."
            ) from None
        raise TargetError(
            f"{target}: I/O error while writing ({e.strerror or e}); the partial output was removed. "
            "Check the device and try again."
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        src_files.close()
    return resolved


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``. An existing target is swapped out
    atomically where the system allows, so at every instant ``target`` is either the old
    complete output or the new one; elsewhere it is renamed aside first, and a killed run's
    aside copy is put back by the next run (:func:`clean_stale_partials`)."""
    if not target.exists():
        try:
            os.rename(tmp, target)
            _fsync_dir(target.parent)
            return
        except OSError as e:  # another writer put a target there in the meantime: replace it
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(tmp, target):
        _fsync_dir(target.parent)
        kill_point("write:after-swap")
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old output
        return
    old = target.parent / f".{target.name}{_OLD}{os.getpid()}"
    os.rename(target, old)
    kill_point("write:between-renames")
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def unchanged_tensor(reader, info: TensorInfo) -> OutputTensor:
    """A source tensor written unchanged: its raw bytes from a safetensors file, or (a
    weights-only pickle has no byte range to copy) the loaded tensor."""
    producer = Computed(lambda n=info.name: reader.get_tensor(n)) if reader.is_pickle else RawCopy(info)
    return OutputTensor(TensorSlot(info.name, info.dtype, info.shape), producer)


def copy_checkpoint(reader, target: str | Path, **kwargs) -> Path:
    """Copy a checkpoint tensor by tensor (raw bytes) with its config and tokenizer files."""
    outputs = [unchanged_tensor(reader, t) for t in reader]
    files: dict[str, bytes | Path] = {"config.json": reader.path / "config.json"}
    files.update({p.name: p for p in reader.carry_files()})
    kwargs.setdefault("sources", [reader.path])
    kwargs.setdefault("description", f"copying {reader.path.name}")
    return write_checkpoint(target, outputs, files=files, **kwargs)
