"""Streaming checkpoint reader.

Opening a checkpoint reads the config and the safetensors headers only: names, shapes,
dtypes and byte ranges of every tensor, with no value loaded. Values come one tensor at a
time on demand (:meth:`CheckpointReader.get_tensor`), memory-mapped by safetensors, and
writers can move a tensor's raw bytes without deserializing it (``TensorInfo.offset``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lmexpand.checkpoint.families import Family, detect_family
from lmexpand.checkpoint.limits import check_config_sizes
from lmexpand.checkpoint.safetensors_format import TensorInfo, read_header
from lmexpand.errors import CheckpointError, SourceError
from lmexpand.jsonio import read_json

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
LINEAGE_FILE = "lmexpand.json"

# Files that travel with the weights: tokenizer, chat template, generation defaults.
CARRY_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "chat_template.*",
    "generation_config.json",
)

_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def torch_dtype_name(st_dtype: str) -> str:
    return _TORCH_DTYPES.get(st_dtype, st_dtype.lower())


def st_dtype_of(tensor: "torch.Tensor") -> str:
    name = str(tensor.dtype).removeprefix("torch.")
    for st, tname in _TORCH_DTYPES.items():
        if tname == name:
            return st
    raise CheckpointError(f"tensor dtype {tensor.dtype} cannot be written to safetensors by lmexpand")


def _load_json(path: Path, what: str) -> Any:
    """A JSON file of the model directory; a damaged one is the source's problem."""
    return read_json(path, what=what, fix="Fix or re-download the file.", error=SourceError)


def _plain_name(name: Any) -> bool:
    """A file name with no directory part: what an index may name as a shard."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _content_sample(path: Path, blocks: int = 16, size: int = 4096) -> bytes:
    """``blocks`` evenly spaced blocks of a file (cheap: no full read of a large shard)."""
    total = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        return b"".join(os.pread(fd, size, i * max(0, total - size) // max(1, blocks - 1)) for i in range(blocks))
    finally:
        os.close(fd)


# what every config of a known family states: without them transformers builds the class's
# default sizes (32 layers of 4096 for Llama), not the checkpoint
_REQUIRED_SIZES = ("hidden_size", "vocab_size")


def _require_sizes(config: dict[str, Any], family: Family | None, config_path: Path) -> None:
    from lmexpand.checkpoint.families import FAMILIES

    family = family or next((f for f in FAMILIES.values() if config.get("model_type") in f.model_types), None)
    if family is None:
        return
    missing = [k for k in (family.num_layers_key, *_REQUIRED_SIZES) if config.get(k) is None]
    if missing:
        raise SourceError(f"{config_path}: no {' and no '.join(missing)}: a {family.name} config states its number of "
                          "layers, hidden size and vocabulary size (without them transformers would build its default "
                          "sizes, another model). Fix config.json or re-download the model.")


class CheckpointReader:
    """A Hugging Face model directory opened for streaming.

    ``tensors`` maps every tensor name to its :class:`TensorInfo` in file order;
    ``config`` is the raw ``config.json``; ``family`` the architecture family.
    """

    def __init__(self, model_dir: str | Path, *, allow_pickle: bool = False, need_family: bool = True):
        self.path = Path(model_dir)
        if not self.path.exists():
            raise SourceError(f"{self.path}: no such file or directory. Give a local Hugging Face model directory.")
        if not self.path.is_dir():
            raise SourceError(f"{self.path}: not a directory. Give the model directory, not a file inside it.")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise SourceError(
                f"{self.path}: no config.json, so this is not a Hugging Face model directory. "
                "Point at the directory that holds config.json and the *.safetensors files."
            )
        self.config: dict[str, Any] = _load_json(config_path, "config.json")
        if not isinstance(self.config, dict):
            raise SourceError(f"{config_path}: config must be a JSON object. Fix config.json or re-download the model.")
        check_config_sizes(self.config, str(config_path))
        self.family: Family | None = detect_family(self.config, str(config_path)) if need_family else None
        _require_sizes(self.config, self.family, config_path)
        self.is_pickle = False
        self.weight_files: list[Path] = []
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = self._scan(allow_pickle)
        self._handles: dict[Path, Any] = {}

    # -- discovery ----------------------------------------------------------------------
    def _scan(self, allow_pickle: bool) -> dict[str, TensorInfo]:
        index_path = self.path / INDEX_FILE
        if index_path.is_file():
            return self._scan_index(index_path)
        single = self.path / SINGLE_FILE
        if single.is_file():
            self.weight_files = [single]
            tensors, self.metadata = read_header(single)
            return tensors
        pickles = [self.path / n for n in PICKLE_FILES if (self.path / n).is_file()]
        pickles += sorted(self.path.glob("pytorch_model-*.bin"))
        if pickles:
            if not allow_pickle:
                raise SourceError(
                    f"{self.path}: only pickle weights ({pickles[0].name}) and no safetensors. "
                    "Loading a pickle can run arbitrary code from the file, so lmexpand refuses it. "
                    "If you trust this checkpoint, pass --allow-pickle (in a recipe: allow_pickle: true in the "
                    "section that reads it; tensors are then loaded with torch.load(weights_only=True)); better, "
                    "convert it to safetensors once (`lmexpand export DIR OUT --allow-pickle`)."
                )
            return self._scan_pickle(pickles)
        others = sorted(p.name for p in self.path.glob("*.safetensors"))
        hint = f" Found {others} but no {INDEX_FILE} naming them." if others else ""
        raise SourceError(
            f"{self.path}: no weights: expected {SINGLE_FILE} or {INDEX_FILE} with its shards.{hint}"
        )

    def _scan_index(self, index_path: Path) -> dict[str, TensorInfo]:
        index = _load_json(index_path, "the shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' object; the index is broken. Re-download it.")
        shard_names = list(dict.fromkeys(weight_map.values()))
        tensors: dict[str, TensorInfo] = {}
        for shard_name in shard_names:
            shard = self.path / str(shard_name)
            # names are checked as written, not resolved: a shard may be a symlink (the
            # Hugging Face hub cache links snapshot files to its blob store)
            if not _plain_name(shard_name):
                raise CheckpointError(
                    f"{index_path}: shard {shard_name!r} lies outside the model directory; "
                    "refusing a hostile or broken index. Shard names must be plain file names."
                )
            if not shard.is_file():
                raise CheckpointError(
                    f"{index_path}: names shard {shard_name!r}, which is missing from {self.path}. "
                    "The download is incomplete: fetch the missing shard."
                )
            self.weight_files.append(shard)
            found, meta = read_header(shard)
            self.metadata.update(meta)
            tensors.update(found)
        missing = [n for n, s in weight_map.items() if n not in tensors or tensors[n].file.name != s]
        if missing:
            raise CheckpointError(
                f"{index_path}: {len(missing)} tensors in the index are not in the shard it names "
                f"(first: {missing[0]!r}). The index and shards do not match: re-download."
            )
        return tensors

    def _scan_pickle(self, files: list[Path]) -> dict[str, TensorInfo]:
        import torch

        index_json = self.path / "pytorch_model.bin.index.json"
        if index_json.is_file():
            files = [self.path / f for f in dict.fromkeys(_load_json(index_json, "the shard index")["weight_map"].values())]
        self.is_pickle = True
        self.weight_files = files
        self._pickled: dict[str, "torch.Tensor"] = {}
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            if not _plain_name(f.name) or f.parent != self.path or not f.is_file():
                raise CheckpointError(f"{f}: pickle shard missing or outside {self.path}.")
            try:
                state = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises many types for a bad pickle
                raise CheckpointError(f"{f}: cannot load as weights-only pickle ({e}).") from None
            for name, t in state.items():
                self._pickled[name] = t
                tensors[name] = TensorInfo(name, st_dtype_of(t), tuple(t.shape), f, -1, t.numel() * t.element_size())
        return tensors

    # -- queries ------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}.") from None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def num_layers(self) -> int:
        assert self.family is not None
        return self.family.num_layers(self.config)

    @property
    def tie_word_embeddings(self) -> bool:
        # transformers' default is True for these families; absent head tensor also means tied
        return bool(self.config.get("tie_word_embeddings", True)) or (
            self.family is not None and self.family.lm_head not in self.tensors
        )

    def lineage(self) -> dict[str, Any] | None:
        path = self.path / LINEAGE_FILE
        return _load_json(path, LINEAGE_FILE) if path.is_file() else None

    def layer_tensors(self, layer: int) -> list[TensorInfo]:
        """The tensors of decoder layer ``layer`` (file order), checked against the family:
        a layer missing a tensor its family requires is a broken checkpoint."""
        assert self.family is not None
        if not hasattr(self, "_by_layer"):
            by_layer: dict[int, list[TensorInfo]] = {}
            for t in self.tensors.values():
                split = self.family.split_layer_name(t.name)
                if split is not None:
                    by_layer.setdefault(split[0], []).append(t)
            self._by_layer = by_layer
        found = self._by_layer.get(layer, [])
        relative = {self.family.split_layer_name(t.name)[1] for t in found}  # type: ignore[index]
        missing = [r for r in self.family.layer_tensors if r not in relative]
        if missing:
            raise CheckpointError(
                f"{self.path}: layer {layer} has no tensor {self.family.layer_name(layer, missing[0])!r} "
                f"(a {self.family.name} layer needs {len(self.family.layer_tensors)}: "
                f"{', '.join(self.family.layer_tensors)}). The checkpoint is incomplete or not {self.family.name}."
            )
        return found

    def carry_files(self) -> list[Path]:
        """Tokenizer, chat template and generation config files to carry to an output."""
        out = []
        for p in sorted(self.path.iterdir()):
            if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in CARRY_PATTERNS):
                out.append(p)
        return out

    def fingerprint(self) -> dict[str, Any]:
        """Cheap identity of a source: file sizes + sha256 of config and index/headers."""
        h = hashlib.sha256()
        h.update((self.path / "config.json").read_bytes())
        index = self.path / INDEX_FILE
        if index.is_file():
            h.update(index.read_bytes())
        for t in self.tensors.values():
            h.update(f"{t.name}:{t.dtype}:{t.shape}:{t.file.name}:{t.offset}\n".encode())
        for f in self.weight_files:  # a sample of the values: same shapes, other weights -> other fingerprint
            h.update(_content_sample(f))
        return {
            "path": str(self.path.resolve()),
            "sha256": h.hexdigest(),
            "files": {f.name: f.stat().st_size for f in self.weight_files},
            "total_bytes": self.total_bytes,
        }

    # -- values -------------------------------------------------------------------------
    def get_tensor(self, name: str) -> "torch.Tensor":
        """One tensor's values, read into fresh memory that is freed with the tensor.

        Plain reads rather than a memory map: a map keeps every page it touched resident
        (and counted in RSS) until the file is closed, so streaming a whole checkpoint
        through it would grow to the checkpoint's size.
        """
        import torch

        info = self.info(name)
        if self.is_pickle:
            return self._pickled[name]
        dtype = getattr(torch, torch_dtype_name(info.dtype))
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        fd = self._handles.get(info.file)
        if fd is None:
            fd = self._handles[info.file] = os.open(info.file, os.O_RDONLY)
        # uninitialized memory (a bytearray would be zero-filled first: one more pass over it)
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        view, pos = memoryview(raw.numpy()), 0
        while pos < info.nbytes:
            n = os.preadv(fd, [view[pos:]], info.offset + pos)
            if n == 0:
                raise CheckpointError(f"{info.file}: ended early while reading {name!r}; the file is truncated.")
            pos += n
        return raw.view(dtype).reshape(info.shape)

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
        if self.is_pickle:
            self._pickled.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
