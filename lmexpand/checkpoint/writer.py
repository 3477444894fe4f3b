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

This module holds the writer itself (:func:`write_checkpoint`, :func:`copy_checkpoint`);
each of its other concerns has a module of its own, whose public names it re-exports:

* :mod:`~lmexpand.checkpoint.shards`: output tensors, their producers, the shard plan;
* :mod:`~lmexpand.checkpoint.zerocopy`: kernel-side copies, write-behind, fsync;
* :mod:`~lmexpand.checkpoint.hashing`: the per-shard sha256 threads;
* :mod:`~lmexpand.checkpoint.outpath`: output-path checks, the partial directory, the
  atomic rename into place, and the cleanup of what interrupted runs left.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from lmexpand.checkpoint.compat import for_every_client
from lmexpand.checkpoint.finite import non_finite_error
from lmexpand.checkpoint.hashing import NoHash, ShardHasher, sha256_file, shard_segments
from lmexpand.checkpoint.outpath import (check_output, check_target, clean_stale_partials, existing_ancestor,
                                         left_by_dead_process, move_into_place, partial_path)
from lmexpand.checkpoint.reader import INDEX_FILE, LINEAGE_FILE, st_dtype_of
from lmexpand.checkpoint.safetensors_format import TensorInfo, TensorSlot, encode_header
from lmexpand.checkpoint.shards import (DEFAULT_MAX_SHARD_SIZE, Computed, OutputTensor, Producer, RawCopy, Zeros,
                                        plan_shards, shard_names)
from lmexpand.checkpoint.zerocopy import SourceFiles, WriteBehind, fsync_dir
# bound here, not called through their module: the fault-injection tests replace them on this one
from lmexpand.checkpoint.zerocopy import copy_range as _copy_range
from lmexpand.checkpoint.zerocopy import write_all as _write_all
from lmexpand.errors import CheckpointError, DiskFullError, TargetError
from lmexpand.faults import kill_point
from lmexpand.progress import byte_progress
from lmexpand.units import human_bytes

# the writer's public names from before its concerns moved to modules of their own
__all__ = [
    "DEFAULT_MAX_SHARD_SIZE", "Computed", "OutputTensor", "Producer", "RawCopy", "Zeros", "plan_shards",
    "shard_names", "shard_segments", "sha256_file", "non_finite_error", "check_output", "check_target",
    "clean_stale_partials", "existing_ancestor", "left_by_dead_process", "partial_path", "write_checkpoint",
    "unchanged_tensor", "copy_checkpoint",
]


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
                 sources: SourceFiles, hasher: "ShardHasher | NoHash", advance: Callable[[int], None]) -> None:
    """Write one shard (``header`` first); ``hasher`` follows it and finishes in the background."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    behind = WriteBehind(fd)

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
    src_files = SourceFiles()
    try:
        tmp.mkdir()
        digests: dict[str, dict[str, object]] = {}
        headers = [encode_header(slots, meta)[0] for slots in shards]
        gate = threading.Semaphore(max(1, os.cpu_count() or 1))  # hashers at a time: one per core
        no_hash = os.environ.get("LMEXPAND_BENCH_NO_HASH") == "1"
        hashers: list[ShardHasher | NoHash] = []
        try:
            for filename, header, slots in zip(filenames, headers, shards):
                hashers.append(NoHash() if no_hash else
                               ShardHasher(tmp / filename, shard_segments(header, slots, producers), gate))
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
        fsync_dir(tmp)
        kill_point("write:before-rename")
        move_into_place(tmp, resolved)
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
