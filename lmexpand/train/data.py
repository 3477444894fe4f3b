"""Training data: local files -> documents -> tokens -> packed blocks, deterministically.

* Plain text: documents are paragraphs separated by blank lines. JSONL: one document per
  line, from a field or a template over fields (GSM8K: ``Question: {question}\\nAnswer:
  {answer}``).
* Documents are split into train / validation by a seeded hash of their index (so the
  split does not depend on the order files are read in or on streaming).
* Tokenization goes through ``datasets`` ``map``, cached on disk by its fingerprint
  (``$LMEXPAND_CACHE/datasets``): the second run of the same data and tokenizer is free.
* Documents are joined with EOS separators and cut into blocks of ``seq_len`` tokens.
* ``loss_from``: tokens up to the end of a marker (the prompt) are context only. They are
  stored as ``-(id + 1)`` in the blocks, so a block stays one int64 row; the loss turns
  them back into ids and excludes them as targets (:func:`split_targets`).
* In-memory mode shuffles blocks per epoch with a seeded permutation; streaming mode reads
  in file order. Either way, block ``k`` of the run is a pure function of (data, seed, k),
  which is what makes resume exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from lmexpand.errors import ConfigError, LmexpandError
from lmexpand.train.config import DataSource

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("lmexpand")


def _template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _check_source(src: DataSource) -> None:
    if not src.path.exists():
        raise ConfigError(f"data: {src.path}: no such file. Give a .txt or .jsonl file.")
    if not src.path.is_file():
        raise ConfigError(f"data: {src.path}: not a file.")
    if src.path.stat().st_size == 0:
        raise ConfigError(f"data: {src.path}: the file is empty; there is nothing to train on.")


def _jsonl_problem(src: DataSource, *, first_only: bool) -> ConfigError | None:
    """The first bad record of a JSONL source (not JSON, not an object, or without a field
    the template/text field needs), looking at the first record only or at every line."""
    needed = _template_fields(src.template) if src.template else [src.field]
    seen = False
    with open(src.path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            seen = True
            try:
                record = json.loads(line)
            except ValueError as e:
                return ConfigError(f"data: {src.path}:{line_no}: not valid JSON ({e}). Fix or remove that line.")
            if not isinstance(record, dict):
                return ConfigError(f"data: {src.path}:{line_no}: each line must be a JSON object.")
            missing = [k for k in needed if k not in record]
            if missing:
                what = f"template {src.template!r}" if src.template else "--text-field"
                return ConfigError(
                    f"data: {src.path}:{line_no}: records have no field {missing[0]!r} (needed by {what}). "
                    f"Fields present: {', '.join(record)}. Use --text-field NAME or --template, or fix that line."
                )
            if first_only:
                return None
    return None if seen else ConfigError(f"data: {src.path}: no JSON records; there is nothing to train on.")


def _loss_from_found(src: DataSource) -> bool:
    """Whether any document holds the ``loss_from`` marker (read until the first one does)."""
    if src.kind == "text":
        with open(src.path, encoding="utf-8", errors="replace") as f:
            tail = ""
            for chunk in iter(lambda: f.read(1 << 20), ""):
                if src.loss_from in tail + chunk:
                    return True
                tail = chunk[-len(src.loss_from):]
        return False
    with open(src.path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = src.template.format(**record) if src.template else str(record[src.field])
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                continue  # the record checks report bad lines
            if src.loss_from in text:
                return True
    return False


def check_sources(sources: Sequence[DataSource]) -> None:
    """Everything about the training data that can be known without the tokenizer, before
    any work (train's setup and `run --check` both call this): the files exist and are not
    empty, JSONL records have the fields the template or text field needs, and a
    ``loss_from`` marker occurs in at least one document (else every token would be context
    and nothing would train)."""
    for s in sources:
        _check_source(s)
        if s.kind == "jsonl":
            _check_jsonl_fields(s)
        if s.loss_from and not _loss_from_found(s):
            raise ConfigError(f"data: {s.path}: no document contains the --loss-from text {s.loss_from!r}, so "
                              "no token would be a target. Check its spelling and spacing (it is matched "
                              "exactly, after the template is applied), or drop --loss-from.")


def _check_jsonl_fields(src: DataSource) -> None:
    """Look at the first record: a missing field is an error naming the keys that exist."""
    problem = _jsonl_problem(src, first_only=True)
    if problem is not None:
        raise problem


def _data_error(src: DataSource, error: Exception) -> ConfigError:
    """A readable error for a corpus that failed while being read: the first bad line of a
    JSONL file, else the reader's own error."""
    problem = _jsonl_problem(src, first_only=False) if src.kind != "text" else None
    if problem is not None:
        return problem
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(f"data: {src.path}: cannot be read ({type(error).__name__}: {first}). "
                       "Check that the file is UTF-8 text or JSON lines.")


def fingerprint_sources(sources: Sequence[DataSource]) -> str:
    """Identity of the training data: paths, sizes, mtimes and settings."""
    h = hashlib.sha256()
    for s in sources:
        st = s.path.stat()
        h.update(json.dumps([str(s.path.resolve()), st.st_size, st.st_mtime_ns, s.kind, s.field, s.template,
                             s.loss_from]).encode())
    return h.hexdigest()[:16]


def _in_validation(doc_index: int, source_index: int, val_fraction: float, seed: int) -> bool:
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{source_index}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _dataset(src: DataSource, streaming: bool):
    from datasets import load_dataset

    cache_dir = str(Path(os.environ.get("LMEXPAND_CACHE") or Path.home() / ".cache" / "lmexpand") / "datasets")
    if src.kind == "text":
        ds = load_dataset("text", data_files=str(src.path), sample_by="paragraph", split="train",
                          streaming=streaming, cache_dir=cache_dir)
        return ds.map(lambda r: {"text": r["text"].strip()})
    _check_jsonl_fields(src)
    ds = load_dataset("json", data_files=str(src.path), split="train", streaming=streaming, cache_dir=cache_dir)
    if src.template:
        template = src.template
        return ds.map(lambda r: {"text": template.format(**r)})
    field = src.field
    return ds.map(lambda r: {"text": str(r[field])})


@dataclass
class PackedData:
    """Train blocks (in memory, or streamed) and fixed validation blocks."""

    seq_len: int
    seed: int
    train_blocks: "np.ndarray | None"  # [n, seq_len] int64, in-memory mode
    val_blocks: "np.ndarray"
    stream_factory: Any = None  # () -> iterator of blocks, streaming mode
    num_tokens: int = 0

    def train_block_iter(self, start: int) -> Iterator["np.ndarray"]:
        """Blocks from global index ``start`` on, epoch after epoch."""
        import numpy as np

        if self.train_blocks is not None:
            n = len(self.train_blocks)
            k = start
            while True:
                epoch, i = divmod(k, n)
                order = np.random.default_rng([self.seed, epoch]).permutation(n)
                for j in order[i:]:
                    yield self.train_blocks[j]
                k = (epoch + 1) * n
        else:
            skipped = 0
            while True:
                empty = True
                for block in self.stream_factory():
                    empty = False
                    if skipped < start:
                        skipped += 1
                        continue
                    yield block
                if empty:
                    return


def _tokenize(tokenizer: Any, texts: list[str], loss_from: str | None) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if not loss_from:
        return ids
    out = []
    for text, row in zip(texts, ids):
        cut = text.find(loss_from)
        if cut < 0:
            out.append(row)
            continue
        n_prompt = len(tokenizer(text[:cut + len(loss_from)], add_special_tokens=False)["input_ids"])
        out.append([-(t + 1) for t in row[:n_prompt]] + row[n_prompt:])
    return out


def split_targets(blocks: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """Blocks (prompt tokens stored as -(id + 1)) -> (input ids, target mask or None).
    ``mask[:, t]`` says whether token t is a training target."""
    import torch

    negative = blocks < 0
    if not bool(negative.any()):
        return blocks, None
    return torch.where(negative, -blocks - 1, blocks), ~negative


def _pack(token_lists: Iterator[list[int]], seq_len: int, eos: int) -> Iterator[list[int]]:
    buf: list[int] = []
    for ids in token_lists:
        buf.extend(ids)
        buf.append(eos)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]


def _one_per_block(token_lists: Iterator[list[int]], seq_len: int, eos: int, pad: int) -> Iterator[list[int]]:
    """Unpacked: each document (+ EOS) in its own block, cut at seq_len, padded with
    ``-(pad + 1)`` (context only, never a target; after the document, so causal attention
    never lets a real token see it)."""
    for ids in token_lists:
        row = (list(ids) + [eos])[:seq_len]
        yield row + [-(pad + 1)] * (seq_len - len(row))


def load_packed_data(sources: Sequence[DataSource], tokenizer: Any, *, seq_len: int, val_fraction: float,
                     seed: int, streaming: bool = False, pack: bool = True) -> PackedData:
    import numpy as np

    check_sources(sources)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the model's tokenizer has no EOS token, needed to separate packed documents.")

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def blocks_of(token_lists: Iterator[list[int]], seq_len: int, eos: int) -> Iterator[list[int]]:
        return _pack(token_lists, seq_len, eos) if pack else _one_per_block(token_lists, seq_len, eos, pad)

    def documents(split: str, streaming_: bool) -> Iterator[list[int]]:
        for si, src in enumerate(sources):
            try:
                ds = _dataset(src, streaming_)
                ds = ds.map(lambda r, idx: {"is_val": _in_validation(idx, si, val_fraction, seed)}, with_indices=True)
                ds = ds.filter(lambda r: bool(r["text"]) and r["is_val"] == (split == "val"))
                ds = ds.map(lambda batch, src=src: {"ids": _tokenize(tokenizer, batch["text"], src.loss_from)},
                            batched=True, remove_columns=[c for c in ["text", "is_val"]])
                for record in ds:
                    yield record["ids"]
            except LmexpandError:
                raise
            except Exception as e:  # datasets/pyarrow/format errors deep in a corpus: say which line
                raise _data_error(src, e) from None

    val = list(blocks_of(documents("val", streaming), seq_len, eos)) if val_fraction > 0 else []
    if streaming:
        first = next(iter(blocks_of(documents("train", True), seq_len, eos)), None)
        if first is None:
            raise ConfigError(f"data: fewer than {seq_len} tokens of training text; lower --seq-len or add data.")
        return PackedData(seq_len, seed, None, np.array(val, dtype=np.int64).reshape(-1, seq_len),
                          stream_factory=lambda: (np.array(b, dtype=np.int64) for b in blocks_of(documents("train", True), seq_len, eos)))
    train = list(blocks_of(documents("train", False), seq_len, eos))
    if not train:
        raise ConfigError(
            f"data: fewer than {seq_len} tokens of training text in {', '.join(str(s.path) for s in sources)}; "
            "lower --seq-len or add data."
        )
    train_arr = np.array(train, dtype=np.int64)
    log.info("data: %d training blocks of %d tokens (%s tokens), %d validation blocks",
             len(train_arr), seq_len, f"{train_arr.size:,}", len(val))
    return PackedData(seq_len, seed, train_arr, np.array(val, dtype=np.int64).reshape(-1, seq_len), num_tokens=train_arr.size)
