"""Training data: local files -> documents -> tokens -> packed blocks, deterministically.

* Plain text: documents are paragraphs separated by blank lines. Records (JSONL, parquet,
  arrow, CSV, ``save_to_disk`` directories; :mod:`lmexpand.train.formats`): one document per
  record, from a field or a template over fields (GSM8K: ``Question: {question}\\nAnswer:
  {answer}``), or a conversation rendered with the chat template, whose assistant answers
  are the only targets (:mod:`lmexpand.train.chat`).
* Documents are split into train / validation by a seeded hash of their index (so the
  split does not depend on the order files are read in or on streaming).
* Tokenization goes through ``datasets`` ``map``, cached on disk by its fingerprint
  (``$LMEXPAND_CACHE/datasets``): the second run of the same data and tokenizer is free.
* Documents are joined with EOS separators and cut into blocks of ``seq_len`` tokens.
* ``loss_from``: tokens up to the end of a marker (the prompt) are context only. They are
  stored as ``-(id + 1)`` in the blocks, so a block stays one int64 row; the loss turns
  them back into ids and excludes them as targets (:func:`split_targets`).
* Weighted sources (a mixture) are packed apart, each into its own blocks, and block ``k``
  of the run is drawn from source ``choice(k)`` (:mod:`lmexpand.train.mixture`); each keeps
  its own validation blocks.
* ``document_masking``: each block carries position ids that restart at every document, so
  attention stops at document boundaries (the model builds the block-diagonal mask).
* In-memory mode shuffles blocks per epoch with a seeded permutation; streaming mode reads
  in file order. Either way, block ``k`` of the run is a pure function of (data, seed, k),
  which is what makes resume exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from lmexpand.errors import ConfigError, LmexpandError
from lmexpand.train.config import DataSource

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger("lmexpand")


def _check_source(src: DataSource) -> None:
    from lmexpand.train.formats import check_exists

    check_exists(src)
    if src.chat and src.kind == "text":
        raise ConfigError(f"data: {src.path}: --chat reads records (JSONL, parquet, arrow, CSV or a save_to_disk "
                          "directory); this is plain text. Give the conversations as records, or drop --chat.")
    if src.chat and src.loss_from:
        raise ConfigError(f"data: {src.path}: --loss-from and --chat both choose the targets (chat: the assistant "
                          "turns). Drop --loss-from.")


def _first_records(src: DataSource, n: int) -> Iterator[tuple[int, dict]]:
    from lmexpand.train.formats import open_records

    for i, record in enumerate(open_records(src, streaming=True)):
        if i >= n:
            return
        yield i, record


def _where(src: DataSource, index: int) -> str:
    return f"data: {src.path}: record {index + 1}"


def _loss_from_found(src: DataSource) -> bool:
    """Whether any document holds the ``loss_from`` marker (read until the first one does)."""
    return text_found(src, src.loss_from)


def text_found(src: DataSource, needle: str) -> bool:
    """Whether any document of ``src`` contains ``needle`` (read until the first one does):
    a --loss-from marker, a deep-fusion span marker."""
    if src.kind == "text":
        with open(src.path, encoding="utf-8", errors="replace") as f:
            tail = ""
            for chunk in iter(lambda: f.read(1 << 20), ""):
                if needle in tail + chunk:
                    return True
                tail = chunk[-len(needle):]
        return False
    if src.kind == "jsonl":
        with open(src.path, encoding="utf-8", errors="replace") as f:
            records = (json.loads(line) for line in f if line.strip())
            return any(needle in _text_or_none(src, r) for r in _tolerant(records))
    return any(needle in _text_or_none(src, r) for _, r in _first_records(src, 1 << 62))


def _tolerant(records: Iterator[Any]) -> Iterator[dict]:
    while True:
        try:
            r = next(records)
        except StopIteration:
            return
        except ValueError:
            continue  # the record checks report bad lines
        if isinstance(r, dict):
            yield r


def _text_or_none(src: DataSource, record: dict) -> str:
    try:
        return _document_text(src, record, "")
    except (ConfigError, KeyError, TypeError, IndexError, AttributeError, ValueError):
        return ""


CHAT_CHECKED = 200  # chat records checked by `run --check` and before streaming (all are, in memory)


def check_sources(sources: Sequence[DataSource]) -> None:
    """Everything about the training data that can be known without the tokenizer, before
    any work (train's setup and `run --check` both call this): the files exist and are not
    empty, records have the fields (of the types) the text field, template or chat layout
    needs, the first conversations are well formed, and a ``loss_from`` marker occurs in at
    least one document (else every token would be context and nothing would train)."""
    from lmexpand.train.chat import conversation
    from lmexpand.train.formats import chat_style, check_columns, jsonl_problem, schema

    for s in sources:
        _check_source(s)
        if s.kind == "jsonl":
            problem = jsonl_problem(s, first_only=True)
            if problem is not None:
                raise problem
        elif s.kind != "text":
            check_columns(s, schema(s))
        if s.chat:
            for i, record in _guarded(s, _first_records(s, CHAT_CHECKED)):
                conversation(record, chat_style(s, list(record), _where(s, i)), _where(s, i))
        if s.loss_from and not _loss_from_found(s):
            raise ConfigError(f"data: {s.path}: no document contains the --loss-from text {s.loss_from!r}, so "
                              "no token would be a target. Check its spelling and spacing (it is matched "
                              "exactly, after the template is applied), or drop --loss-from.")


def _guarded(src: DataSource, items: Iterator[Any]) -> Iterator[Any]:
    """``items``, with a reader's failure deep in the source turned into a readable error."""
    try:
        yield from items
    except LmexpandError:
        raise
    except Exception as e:  # datasets/pyarrow/format errors deep in a corpus: say which line
        raise _data_error(src, e) from None


def _data_error(src: DataSource, error: Exception) -> ConfigError:
    """A readable error for a corpus that failed while being read: the first bad line of a
    JSONL file, else the reader's own error."""
    from lmexpand.train.formats import jsonl_problem

    problem = jsonl_problem(src, first_only=False) if src.kind == "jsonl" else None
    if problem is not None:
        return problem
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(f"data: {src.path}: cannot be read ({type(error).__name__}: {first[:300]}). "
                       f"Check that the file is what its extension says ({src.kind}), or give its format.")


def fingerprint_sources(sources: Sequence[DataSource], chat_template: str | None = None) -> str:
    """Identity of the training data: paths, sizes, mtimes and settings (the settings added
    since the first version enter only when used, so older runs keep their fingerprint)."""
    h = hashlib.sha256()
    for s in sources:
        files = sorted(p for p in s.path.rglob("*") if p.is_file()) if s.path.is_dir() else [s.path]
        stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        size, mtime = (stats[0] if len(stats) == 1 else (sum(a for a, _ in stats), max((b for _, b in stats), default=0)))
        entry = [str(s.path.resolve()), size, mtime, s.kind, s.field, s.template, s.loss_from]
        if s.chat or s.weight is not None:
            entry += [s.chat, s.weight, s.label]
        h.update(json.dumps(entry).encode())
    if chat_template and any(s.chat for s in sources):
        h.update(chat_template.encode())
    return h.hexdigest()[:16]


def _in_validation(doc_index: int, source_index: int, val_fraction: float, seed: int) -> bool:
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{source_index}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _document_text(src: DataSource, record: dict, where: str) -> str:
    """A non-chat record's document text (plain text: the paragraph, stripped)."""
    if src.kind == "text":
        return record["text"].strip()
    if src.template:
        try:
            return src.template.format(**record)
        except KeyError as e:
            raise ConfigError(f"{where}: has no field {e.args[0]!r} (needed by template {src.template!r}); fields "
                              f"present: {', '.join(record)}. Fix that record, or the template.") from None
        except (IndexError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: the template {src.template!r} cannot be applied ({e}). Name fields in "
                              "braces, e.g. 'Question: {question}'; double literal braces ({{ }}).") from None
    if src.field not in record:
        raise ConfigError(f"{where}: has no field {src.field!r} (needed by --text-field); fields present: "
                          f"{', '.join(record)}. Fix that record, or use --text-field NAME or --template.")
    value = record[src.field]
    return "" if value is None else str(value)


class _Encoder:
    """Records of one source -> token id lists (context tokens stored as ``-(id + 1)``) and
    the separator that follows each document (EOS: a target after text, context after a
    conversation, whose targets are exactly its assistant answers)."""

    def __init__(self, src: DataSource, tokenizer: Any, chat_template: str | None):
        self.src = src
        self.tokenizer = tokenizer
        self.template = chat_template
        eos = tokenizer.eos_token_id
        self.separator = -(eos + 1) if src.chat else eos

    def __call__(self, batch: dict[str, list], indices: list[int]) -> list[list[int]]:
        from lmexpand.train.chat import conversation, encode_conversation
        from lmexpand.train.formats import chat_style

        keys = list(batch)
        records = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
        if self.src.chat:
            out = []
            for i, record in zip(indices, records):
                where = _where(self.src, i)
                turns = conversation(record, chat_style(self.src, keys, where), where)
                out.append(encode_conversation(self.tokenizer, self.template, turns, where))
            return out
        texts = [_document_text(self.src, r, _where(self.src, i)) for i, r in zip(indices, records)]
        keep = [i for i, t in enumerate(texts) if t]
        ids = _tokenize(self.tokenizer, [texts[i] for i in keep], self.src.loss_from) if keep else []
        out = [[] for _ in texts]
        for i, row in zip(keep, ids):
            out[i] = row
        return out


@dataclass
class Part:
    """The blocks of one mixture source (or of all sources, when not a mixture)."""

    name: str
    train: "np.ndarray | None"  # [n, seq_len] (or [n, 2, seq_len] with positions), in-memory mode
    val: "np.ndarray"
    stream_factory: Any = None  # () -> iterator of blocks, streaming mode
    tag: tuple[int, ...] = ()  # added to the shuffle seed (mixture parts shuffle independently)

    def block_iter(self, seed: int, start: int) -> Iterator["np.ndarray"]:
        """Blocks from this part's index ``start`` on, epoch after epoch."""
        import numpy as np

        if self.train is not None:
            n = len(self.train)
            k = start
            while True:
                epoch, i = divmod(k, n)
                order = np.random.default_rng([seed, epoch, *self.tag]).permutation(n)
                for j in order[i:]:
                    yield self.train[j]
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


@dataclass
class PackedData:
    """Train blocks (in memory, or streamed) and fixed validation blocks, in one part, or
    one part per source of a weighted mixture."""

    seq_len: int
    seed: int
    parts: list[Part]
    mixture: Any = None  # Mixture, when the sources are weighted
    num_tokens: int = 0

    @property
    def train_blocks(self) -> "np.ndarray | None":
        return self.parts[0].train if self.mixture is None else None

    @property
    def val_blocks(self) -> "np.ndarray":
        import numpy as np

        return self.parts[0].val if len(self.parts) == 1 else np.concatenate([p.val for p in self.parts])

    @property
    def has_positions(self) -> bool:
        return self.parts[0].val.ndim == 3 or (self.parts[0].train is not None and self.parts[0].train.ndim == 3)

    def train_block_iter(self, start: int) -> Iterator["np.ndarray"]:
        """Blocks from global index ``start`` on: block k is a pure function of (data, seed, k)."""
        if self.mixture is None:
            yield from self.parts[0].block_iter(self.seed, start)
            return
        counts = self.mixture.counts_before(start)
        iters = [p.block_iter(self.seed, int(c)) for p, c in zip(self.parts, counts)]
        k = start
        while True:
            for s in self.mixture.choices(k, 1024):
                block = next(iters[s], None)
                if block is None:  # a streamed source ran dry
                    return
                yield block
            k += 1024

    def blocks_per_source(self, start: int, count: int) -> list[int]:
        """How many of blocks ``start .. start + count - 1`` each source fed."""
        import numpy as np

        if self.mixture is None:
            return [count]
        return np.bincount(self.mixture.choices(start, count), minlength=len(self.parts)).tolist()


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


def _pack_documents(docs: Iterator[tuple[list[int], int]], seq_len: int, positions: bool) -> Iterator[Any]:
    """Documents (ids, separator) joined and cut into ``seq_len`` blocks; with ``positions``,
    each block comes with its position ids, restarting at 0 at every document start and at
    the block start (a document cut across blocks continues from 0 in the next one)."""
    buf: list[int] = []
    pos: list[int] = []
    for ids, sep in docs:
        buf.extend(ids)
        buf.append(sep)
        if positions:
            pos.extend(range(len(ids) + 1))
        while len(buf) >= seq_len:
            if positions:
                head = pos[:seq_len]
                if head[0] != 0:  # continuation of a document: restart its positions in this block
                    first = head[0]
                    for i, p in enumerate(head):
                        if p < first:
                            break
                        head[i] = p - first
                yield [buf[:seq_len], head]
                pos = pos[seq_len:]
            else:
                yield buf[:seq_len]
            buf = buf[seq_len:]


def _pack(token_lists: Iterator[list[int]], seq_len: int, eos: int) -> Iterator[list[int]]:
    return _pack_documents(((ids, eos) for ids in token_lists), seq_len, positions=False)


def _one_per_document(docs: Iterator[tuple[list[int], int]], seq_len: int, pad: int) -> Iterator[list[int]]:
    """Unpacked: each document (+ separator) in its own block, cut at seq_len, padded with
    ``-(pad + 1)`` (context only, never a target; after the document, so causal attention
    never lets a real token see it)."""
    for ids, sep in docs:
        row = (list(ids) + [sep])[:seq_len]
        yield row + [-(pad + 1)] * (seq_len - len(row))


def _one_per_block(token_lists: Iterator[list[int]], seq_len: int, eos: int, pad: int) -> Iterator[list[int]]:
    return _one_per_document(((ids, eos) for ids in token_lists), seq_len, pad)


def load_packed_data(sources: Sequence[DataSource], tokenizer: Any, *, seq_len: int, val_fraction: float,
                     seed: int, streaming: bool = False, pack: bool = True, chat_template: str | None = None,
                     document_masking: bool = False, model: str = "the model") -> PackedData:
    """Every source read, checked and tokenized (in memory: all of it, so a bad record stops
    the run here, before training), then packed into blocks."""
    import numpy as np

    from lmexpand.train.formats import open_records
    from lmexpand.train.mixture import Mixture

    check_sources(sources)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the model's tokenizer has no EOS token, needed to separate packed documents.")
    template = None
    if any(s.chat for s in sources):
        from lmexpand.train.chat import resolve_chat_template

        template = resolve_chat_template(tokenizer, chat_template, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    positions = document_masking and pack

    def blocks_of(docs: Iterator[tuple[list[int], int]]) -> Iterator[list[int]]:
        return _pack_documents(docs, seq_len, positions) if pack else _one_per_document(docs, seq_len, pad)

    def source_documents(si: int, src: DataSource, split: str, streaming_: bool) -> Iterator[tuple[list[int], int]]:
        encode = _Encoder(src, tokenizer, template)
        want_val = split == "val"

        def encoded(batch, indices):
            return {"ids": encode(batch, indices),
                    "is_val": [_in_validation(i, si, val_fraction, seed) for i in indices]}

        ds = open_records(src, streaming_)
        if not streaming_:
            ds = ds.map(encoded, batched=True, with_indices=True, remove_columns=ds.column_names)
            ds = ds.filter(lambda r: len(r["ids"]) > 0 and r["is_val"] == want_val)
            for record in ds:
                yield record["ids"], encode.separator
            return
        index = 0
        for batch in ds.iter(batch_size=256):
            n = len(next(iter(batch.values()))) if batch else 0
            out = encoded(batch, list(range(index, index + n)))
            index += n
            for ids, is_val in zip(out["ids"], out["is_val"]):
                if ids and is_val == want_val:
                    yield ids, encode.separator

    def documents(chosen: Sequence[tuple[int, DataSource]], split: str, streaming_: bool):
        for si, src in chosen:
            yield from _guarded(src, source_documents(si, src, split, streaming_))

    def as_array(rows: list) -> "np.ndarray":
        shape = (-1, 2, seq_len) if positions else (-1, seq_len)
        return np.array(rows, dtype=np.int64).reshape(shape)

    def part(name: str, chosen: Sequence[tuple[int, DataSource]], tag: tuple[int, ...]) -> Part:
        val = as_array(list(blocks_of(documents(chosen, "val", streaming)))) if val_fraction > 0 else as_array([])
        files = ", ".join(str(s.path) for _, s in chosen)
        if streaming:
            if next(iter(blocks_of(documents(chosen, "train", True))), None) is None:
                raise ConfigError(f"data: fewer than {seq_len} tokens of training text in {files}; lower --seq-len "
                                  "or add data.")
            return Part(name, None, val, tag=tag, stream_factory=lambda: (
                np.array(b, dtype=np.int64) for b in blocks_of(documents(chosen, "train", True))))
        train = list(blocks_of(documents(chosen, "train", False)))
        if not train:
            raise ConfigError(f"data: fewer than {seq_len} tokens of training text in {files}; lower --seq-len "
                              "or add data.")
        return Part(name, as_array(train), val, tag=tag)

    indexed = list(enumerate(sources))
    if all(s.weight is None for s in sources):
        parts = [part("all", indexed, ())]
        mixture = None
    else:
        parts = [part(s.label, [(si, s)], (si + 1,)) for si, s in indexed]
        mixture = Mixture([s.weight for s in sources], seed)
    data = PackedData(seq_len, seed, parts, mixture=mixture,
                      num_tokens=sum(p.train.shape[0] * seq_len for p in parts if p.train is not None))
    for p in parts:
        if p.train is not None:
            log.info("data%s: %d training blocks of %d tokens (%s tokens), %d validation blocks",
                     "" if mixture is None else f" {p.name}", len(p.train), seq_len, f"{len(p.train) * seq_len:,}",
                     len(p.val))
    if mixture is not None:
        log.info("mixture: %s", ", ".join(f"{p.name} {w:.1%}" for p, w in zip(parts, mixture.p)))
    return data
