"""The safetensors file format, read and written without torch.

Layout: 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a
multiple of 8), then the tensor data. The JSON maps each name to ``{dtype, shape,
data_offsets: [begin, end]}`` relative to the data start, plus an optional ``__metadata__``
of strings. Parsing the header ourselves gives names, shapes, dtypes and exact byte
ranges without loading any value, which lets copies move raw bytes in the kernel.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from lmexpand.errors import CheckpointError

DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}

# A real header is a few MB at most (100k tensors); anything larger is a corrupt or hostile
# file, refused before allocating.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``file`` at absolute ``offset``, ``nbytes`` long."""

    name: str
    dtype: str  # safetensors dtype string: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors file's header; checks that every byte range lies in the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(
                    f"{path}: file is {size} bytes, too short to be a safetensors file "
                    "(truncated or not safetensors). Re-download or re-create it."
                )
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: header claims {header_len} bytes but the file has {size}: "
                    "the file is truncated or not safetensors. Re-download or re-create it."
                )
            header_bytes = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e}).") from None
    try:
        header = json.loads(header_bytes)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}). "
                              "The file is damaged: re-download or re-create it.") from None

    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    max_end = 0
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry for {name!r} is malformed: {entry!r}.") from None
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}.")
        if any(d < 0 for d in shape) or begin < 0 or end < begin:
            raise CheckpointError(f"{path}: tensor {name!r} has invalid shape/offsets {entry!r}.")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} "
                f"of {dtype} needs {nbytes}."
            )
        max_end = max(max_end, end)
        tensors[name] = TensorInfo(name, dtype, shape, path, data_start + begin, nbytes)
    if data_start + max_end > size:
        raise CheckpointError(
            f"{path}: truncated shard: the header needs {data_start + max_end} bytes, the file "
            f"has {size} ({data_start + max_end - size} missing). The copy was interrupted or "
            "the download is incomplete: re-download or re-create this file."
        )
    # Keep the file's own order (by offset): sequential reads are fastest.
    ordered = dict(sorted(tensors.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)))
    prev: TensorInfo | None = None
    for t in ordered.values():  # safetensors and transformers refuse overlapping tensors: so do we
        if prev is not None and t.offset < prev.offset + prev.nbytes and t.nbytes and prev.nbytes:
            raise CheckpointError(
                f"{path}: tensors {prev.name!r} and {t.name!r} overlap in the file (bytes "
                f"{prev.offset - data_start}-{prev.offset - data_start + prev.nbytes} and {t.offset - data_start}-"
                f"{t.offset - data_start + t.nbytes}): the header is damaged or forged. Re-create the file.")
        prev = t
    return ordered, {str(k): str(v) for k, v in metadata.items()}


@dataclass(frozen=True)
class TensorSlot:
    """A tensor to be written: name, dtype, shape (its size follows)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def encode_header(slots: Iterable[TensorSlot], metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix included) for tensors laid out in the given order, and
    each tensor's offset from the start of the data section."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, int] = {}
    pos = 0
    for slot in slots:
        header[slot.name] = {"dtype": slot.dtype, "shape": list(slot.shape), "data_offsets": [pos, pos + slot.nbytes]}
        offsets[slot.name] = pos
        pos += slot.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # data starts 8-byte aligned, as safetensors itself does
    return struct.pack("<Q", len(body)) + body, offsets


def alignment_order(slots: list[TensorSlot]) -> list[TensorSlot]:
    """Widest dtypes first (stable otherwise) so every tensor starts aligned to its item size."""
    return sorted(slots, key=lambda s: -DTYPE_SIZES[s.dtype])
