"""Non-finite values (NaN, ±Inf) found from a tensor's raw bytes, without torch.

lmexpand never writes a non-finite value silently: the writer checks every floating-point
tensor it writes (computed tensors in memory, raw copies from the bytes its hasher reads
anyway), composition surgeries check the members they reference, ``verify`` checks the
values lmexpand wrote. All of them use this module: a value is non-finite exactly when its
exponent bits are all ones, so one AND and one compare per element over chunks that stay
in the CPU cache (bf16 included, which numpy has no type for).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from lmexpand.checkpoint.safetensors_format import TensorInfo
from lmexpand.errors import CheckpointError

# safetensors dtype -> (bytes per value, the exponent mask: all ones = NaN/Inf)
EXPONENT_MASKS: dict[str, tuple[int, int]] = {
    "F64": (8, 0x7FF0_0000_0000_0000),
    "F32": (4, 0x7F80_0000),
    "F16": (2, 0x7C00),
    "BF16": (2, 0x7F80),
    "F8_E5M2": (1, 0x7C),
    "F8_E4M3": (1, 0x7F),  # e4m3fn: no Inf; NaN is S.1111.111 (the whole mask)
}

_CHUNK = 256 * 1024


def is_float(dtype: str) -> bool:
    return dtype in EXPONENT_MASKS


def count_non_finite(data: memoryview | bytes, dtype: str) -> int:
    """How many values of ``dtype`` in ``data`` (a whole number of elements) are NaN/Inf."""
    if dtype not in EXPONENT_MASKS or not len(data):
        return 0
    import numpy as np  # (not at import: `lmexpand --help` stays light)

    width, mask = EXPONENT_MASKS[dtype]
    utype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    words = np.frombuffer(data, dtype=utype)
    m = utype(mask)
    return int(np.count_nonzero(np.bitwise_and(words, m) == m))


class FiniteCheck:
    """Counts the non-finite values of one tensor fed in pieces of any length (a piece may
    end inside an element: its bytes wait for the next piece)."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.size = EXPONENT_MASKS[dtype][0] if dtype in EXPONENT_MASKS else 1
        self.bad = 0
        self._rest = b""

    def feed(self, data: memoryview | bytes) -> None:
        if self.dtype not in EXPONENT_MASKS:
            return
        if self._rest:
            data = self._rest + bytes(data)
            self._rest = b""
        cut = len(data) - len(data) % self.size
        if cut != len(data):
            self._rest = bytes(data[cut:])
        self.bad += count_non_finite(memoryview(data)[:cut], self.dtype)


def non_finite_in_file(info: TensorInfo, fd: int | None = None) -> int:
    """Non-finite values of a tensor stored in a safetensors file (read in cache-sized chunks)."""
    if not is_float(info.dtype) or info.offset < 0:
        return 0
    own = fd is None
    fd = os.open(info.file, os.O_RDONLY) if fd is None else fd
    try:
        check = FiniteCheck(info.dtype)
        buf = memoryview(bytearray(_CHUNK))
        offset, end = info.offset, info.offset + info.nbytes
        while offset < end:
            n = os.preadv(fd, [buf[: min(_CHUNK, end - offset)]], offset)
            if n == 0:
                break  # a truncated file: the reader reports it
            check.feed(buf[:n])
            offset += n
        return check.bad
    finally:
        if own:
            os.close(fd)


def non_finite_tensors(reader, names: Iterable[str] | None = None) -> list[tuple[str, int, int]]:
    """(name, non-finite count, numel) of every floating-point tensor of ``reader`` (or of
    ``names``) that holds NaN/Inf. Safetensors are read as bytes; pickle weights (no byte
    ranges) are loaded one tensor at a time."""
    found = []
    fds: dict = {}
    try:
        for name in (names if names is not None else [t.name for t in reader]):
            info = reader.info(name)
            if info.offset >= 0:
                if not is_float(info.dtype):
                    continue
                if info.file not in fds:
                    fds[info.file] = os.open(info.file, os.O_RDONLY)
                bad = non_finite_in_file(info, fds[info.file])
            else:
                import torch

                t = reader.get_tensor(name)
                bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
            if bad:
                found.append((name, bad, info.numel))
    finally:
        for fd in fds.values():
            os.close(fd)
    return found


def describe(found: list[tuple[str, int, int]], shown: int = 3) -> str:
    """The first few tensors with NaN/Inf and how many more: for messages."""
    parts = [f"{name} ({bad:,} of {numel:,} values)" for name, bad, numel in found[:shown]]
    more = f" and {len(found) - shown:,} more tensor(s)" if len(found) > shown else ""
    return ", ".join(parts) + more


def non_finite_error(name: str, bad: int, numel: int, origin: str, model: Path | None = None) -> CheckpointError:
    """The one message for NaN/Inf met while writing: the tensor, where its values came
    from, that nothing was written, and what to check."""
    return CheckpointError(
        f"{name} ({origin}): {bad:,} of {numel:,} values are NaN/Inf. lmexpand never writes non-finite values, so "
        "nothing was written (the partial output was removed; the inputs are untouched). Find every such tensor "
        f"with `lmexpand verify {model or 'MODEL'} --values all` and use a model without them (a checkpoint saved "
        "after training diverged, or a damaged file).")
