"""Merging models whose vocabularies differ: mergekit's ``tokenizer_source: union|base|MODEL``
and ``tokenizer:`` section (``source``, ``tokens``, ``pad_to_multiple_of``).

Recipe (mergekit 0.1.5, ``mergekit/tokenizer/build.py`` and ``embed.py``):

1. The output tokenizer. ``base``: the base model's (the first model's without a base),
   stripped of ids at or past its config's ``vocab_size``. ``MODEL``: that model's. ``union``:
   the base's, plus every other model's tokens it lacks, added after its own ids (plain tokens
   first, in model then id order, then added/special tokens with their settings, the first
   model's settings winning). The keys of ``tokens:`` are added too when missing.
2. Per input model, a permutation: output id -> that model's row for the same token string,
   or none (-1).
3. Per vocabulary tensor (embeddings, head) and input, a row for every output id: its own row
   when the model has the token (unless ``force``); else a default row, shared by every input:
   the row ``tokens:`` names for it (``source: MODEL``, ``{kind: model_token, model, token_id |
   token}`` or ``{kind: zero}``); without one, the only model that has it, else the base's
   row when the base has it, else the mean over the models that have it, else zeros. Rows
   padded up to ``pad_to_multiple_of`` get the mean of the real rows.
4. The merge method then runs on these aligned tensors as on any other.

Where mergekit is not deterministic, lmexpand fixes an order: mergekit visits the other
models in the order of a Python ``set`` and a fast tokenizer's ``get_vocab()`` in hash order
(both change from run to run), so the ids it gives to tokens new to the base vary between
its own runs when several are added; lmexpand adds them in configuration order, then id
order. Every token's rows are mergekit's either way (the comparison test matches rows by
token string). Where mergekit crashes (``tokens:`` entry with no ``source`` for a token some
model lacks) lmexpand applies the default rule of step 3.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from lmexpand.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TokenDefault:
    """Where a token's default row comes from: ``("model", m)`` (that model's row for the
    token), ``("row", m, row)`` (a given row of model ``m``), ``("zero",)``, or None (the
    default rule)."""

    source: Optional[tuple]
    force: bool = False


@dataclass(frozen=True)
class Vocabulary:
    """The output vocabulary and how every input model's rows map onto it."""

    tokens: tuple[str, ...]  # output id -> token string
    size: int  # rows of every vocabulary tensor (len(tokens), padded)
    perms: tuple[tuple[int, ...], ...]  # per model index: output id -> that model's row, or -1
    configured: tuple[tuple[int, TokenDefault], ...]  # output id -> its tokens: entry
    files: tuple[tuple[str, bytes], ...]  # the output tokenizer's files

    def is_identity_for(self, models: list[int], rows: list[int]) -> bool:
        """Aligning changes nothing: every model keeps its rows, in order, all present."""
        if self.configured or self.size != len(self.tokens):
            return False
        ident = tuple(range(len(self.tokens)))
        return all(self.perms[m] == ident and n == len(self.tokens) for m, n in zip(models, rows))

    def align(self, tensors: list["torch.Tensor"], models: list[int], base: Optional[int]) -> list["torch.Tensor"]:
        """``tensors[i]`` (model ``models[i]``, vocabulary on axis 0, one dtype) -> rows of the
        output vocabulary, mergekit's ``PermutedVocabulary`` vectorized (same arithmetic per
        element)."""
        import torch

        n = len(self.tokens)
        shape = tensors[0].shape[1:]
        dtype, device = tensors[0].dtype, tensors[0].device
        perm = torch.tensor([self.perms[m] for m in models], dtype=torch.long).reshape(len(models), n)
        # a model's row past its tensor (padding ids of a tokenizer larger than the tensor) is absent
        for i, t in enumerate(tensors):
            perm[i][perm[i] >= t.shape[0]] = -1
        present = perm >= 0
        count = present.sum(0)
        configured = dict(self.configured)
        forced = torch.zeros(n, dtype=torch.bool)
        for tid, d in configured.items():
            forced[tid] = d.force
        need = forced | ~present.all(0)  # ids whose default row some model uses

        default = torch.zeros((n, *shape), dtype=dtype, device=device)
        has_default = torch.zeros(n, dtype=torch.bool)
        average: list[int] = []
        for tid in need.nonzero().flatten().tolist():
            d = configured.get(tid)
            src = d.source if d is not None else None
            if src is None:  # the default rule
                k = int(count[tid])
                if k == 1:
                    src = ("model", models[int(present[:, tid].nonzero()[0])])
                elif k == 0:
                    src = ("zero",)
                elif base is not None and base in models and bool(present[models.index(base), tid]):
                    src = ("model", base)
                else:
                    average.append(tid)
                    has_default[tid] = True
                    continue
            if src[0] == "zero":
                has_default[tid] = True
                continue
            i = models.index(src[1])
            row = int(perm[i, tid]) if src[0] == "model" else src[2]
            if row < 0:
                raise ConfigError(f"tokenizer.tokens: token {self.tokens[tid]!r} takes its embedding from a model that "
                                  "does not have it; name a model that has it, or {kind: zero}.")
            default[tid] = tensors[i][row]
            has_default[tid] = True
        if average:
            ids = torch.tensor(average, dtype=torch.long)
            acc = torch.zeros((len(average), *shape), dtype=dtype, device=device)
            for i, t in enumerate(tensors):  # zeros + each present model's row, in model order
                sel = present[i, ids]
                if bool(sel.any()):
                    acc[sel] = acc[sel] + t[perm[i, ids[sel]]]
            counts = count[ids]
            for c in counts.unique().tolist():  # divided by a Python int, as mergekit's `embed /= count`
                rows = counts == c
                part = acc[rows]
                part /= c
                acc[rows] = part
            default[ids] = acc

        out = []
        for i, t in enumerate(tensors):
            new = torch.zeros((self.size, *shape), dtype=dtype, device=device)
            own = present[i] & ~forced
            new[:n][own] = t[perm[i][own]]
            use_default = ~own & has_default
            new[:n][use_default] = default[use_default]
            if self.size > n:
                new[n:] = torch.mean(new[:n], dim=0)
            out.append(new)
        return out


def wanted(file) -> bool:
    """The configuration builds an output vocabulary (mergekit's ``tokenizer_source`` or
    ``tokenizer:`` section)."""
    return file.tokenizer is not None or file.tokenizer_source is not None


def source_of(file) -> Optional[str]:
    """``union``, ``base`` or a model reference: the ``tokenizer:`` section's source wins over
    ``tokenizer_source`` (as in mergekit)."""
    return file.tokenizer.source if file.tokenizer is not None else file.tokenizer_source


def _config_vocab_size(reader) -> Optional[int]:
    v = reader.config.get("vocab_size")
    return v if isinstance(v, int) else None


def _stripped(tokenizer: Any, vocab_size: Optional[int], what: str) -> Any:
    """mergekit's ``get_stripped_tokenizer``: drop ids at or past ``vocab_size`` (BPE only)."""
    import json

    import tokenizers

    if vocab_size is None:
        return tokenizer
    unused = [tok for tok, idx in tokenizer.get_vocab().items() if idx >= vocab_size]
    if not unused:
        return tokenizer
    backend = getattr(tokenizer, "_tokenizer", None)
    doc = json.loads(backend.to_str()) if backend is not None else None
    if doc is None or doc["model"]["type"] != "BPE":
        raise ConfigError(f"{what}: its tokenizer has ids at or past the config's vocab_size {vocab_size} and is not "
                          "a BPE tokenizer, so they cannot be stripped for a merged vocabulary (mergekit refuses it "
                          "too); use tokenizer_source: a model whose tokenizer fits its vocab_size.")
    unused_set = set(unused)
    doc["added_tokens"] = [e for e in doc["added_tokens"] if e["id"] < vocab_size]
    for tok in unused:
        doc["model"]["vocab"].pop(tok, None)

    def keep(m: Any) -> bool:
        toks = m.split(" ") if isinstance(m, str) else m
        return not any(t in unused_set for t in toks)

    doc["model"]["merges"] = [m for m in doc["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(doc))
    return tokenizer


def _by_id(vocab: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(vocab.items(), key=lambda kv: kv[1])


def build(resolved, where: str) -> Vocabulary:
    """The output tokenizer and the permutations, from the inputs' tokenizers."""
    from transformers import AutoTokenizer

    from lmexpand.checkpoint.tokenizer import has_tokenizer, load_tokenizer

    file = resolved.file
    refs, readers = resolved.models, resolved.readers
    source = source_of(file)
    base = resolved.base if resolved.base is not None else 0
    missing = [ref for ref, rd in zip(refs, readers) if not has_tokenizer(rd.path)]
    if missing:
        raise ConfigError(f"{where}: tokenizer_source: {source} builds the output vocabulary from every model's "
                          f"tokenizer, but {', '.join(missing)} has none; copy its tokenizer files into it (or "
                          "remove tokenizer_source to merge models that share one vocabulary).")
    loaded = {}
    for i, (ref, rd) in enumerate(zip(refs, readers)):
        tok = AutoTokenizer.from_pretrained(str(rd.path)) if i != base else None
        if tok is None:
            tok = _stripped(load_tokenizer(rd.path, what=f"model {ref}"), _config_vocab_size(rd), f"model {ref}")
        loaded[i] = tok
    order = [base] + [i for i in range(len(refs)) if i != base]

    if source == "base":
        out_tok = loaded[base]
    elif source == "union":
        out_tok = _union(loaded, order, readers)
    else:
        if source not in refs:
            raise ConfigError(f"{where}: tokenizer source {source} is not one of the merged models "
                              f"({', '.join(refs)}); give union, base or one of them.")
        out_tok = AutoTokenizer.from_pretrained(str(readers[refs.index(source)].path))

    token_cfg = dict(file.tokenizer.tokens or {}) if file.tokenizer is not None else {}
    existing = set(out_tok.get_vocab())
    for tok in token_cfg:
        if tok not in existing:
            out_tok.add_tokens(tok)
            existing.add(tok)

    vocab_out = out_tok.get_vocab()
    tokens = [tok for tok, _ in _by_id(vocab_out)]
    if [i for _, i in _by_id(vocab_out)] != list(range(len(tokens))):
        raise ConfigError(f"{where}: the output tokenizer's ids are not 0..{len(tokens) - 1} without gaps, so its "
                          "rows cannot be laid out; use another tokenizer source.")
    size = len(tokens)
    pad = file.tokenizer.pad_to_multiple_of if file.tokenizer is not None else None
    if pad and size % pad:
        size = (size // pad + 1) * pad

    perms = []
    for i, rd in enumerate(readers):
        vocab = loaded[i].get_vocab()
        limit = _config_vocab_size(rd) or len(vocab)
        perms.append(tuple(vocab[t] if t in vocab and vocab[t] < limit else -1 for t in tokens))

    configured = []
    problems = []
    for tok, entry in token_cfg.items():
        tid = vocab_out[tok]
        src = entry.source
        if src is None:
            d = TokenDefault(None, entry.force)
        elif isinstance(src, str):
            if src not in refs:
                problems.append(f"tokenizer.tokens.{tok}: source {src} is not one of the merged models")
                continue
            m = refs.index(src)
            if perms[m][tid] < 0:
                problems.append(f"tokenizer.tokens.{tok}: {src} has no token {tok!r}")
                continue
            d = TokenDefault(("model", m), entry.force)
        elif src.kind == "zero":
            d = TokenDefault(("zero",), entry.force)
        else:
            if src.model not in refs:
                problems.append(f"tokenizer.tokens.{tok}: model {src.model} is not one of the merged models")
                continue
            m = refs.index(src.model)
            row = src.token_id
            if row is None:
                row = loaded[m].get_vocab().get(src.token)
                if row is None:
                    problems.append(f"tokenizer.tokens.{tok}: {src.model} has no token {src.token!r}")
                    continue
            limit = _config_vocab_size(readers[m]) or len(loaded[m].get_vocab())
            if not 0 <= row < limit:
                problems.append(f"tokenizer.tokens.{tok}: token_id {row} is outside {src.model}'s rows 0..{limit - 1}")
                continue
            d = TokenDefault(("row", m, row), entry.force)
        configured.append((tid, d))
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems) + ".")

    with tempfile.TemporaryDirectory() as tmp:
        out_tok.save_pretrained(tmp)
        files = tuple((p.name, p.read_bytes()) for p in sorted(Path(tmp).iterdir()) if p.is_file())
    return Vocabulary(tuple(tokens), size, tuple(perms), tuple(sorted(configured, key=lambda x: x[0])), files)


def _union(loaded: dict[int, Any], order: list[int], readers) -> Any:
    """mergekit's ``build_union_tokenizer`` with a fixed order (configuration, then ids)."""
    from transformers import AutoTokenizer

    out_vocab: dict[str, int] = {}
    out_added: dict[str, Any] = {}
    for i in order:
        tok = loaded[i]
        limit = _config_vocab_size(readers[i]) or tok.vocab_size
        added = tok.added_tokens_decoder
        added_names = {info.content for info in added.values()}
        for t, idx in _by_id(tok.get_vocab()):
            if idx >= limit or t in added_names:
                continue
            out_vocab.setdefault(t, len(out_vocab))
        for idx, info in sorted(added.items()):
            if idx < limit and info.content not in out_added:
                out_added[info.content] = info
    base_tok = loaded[order[0]]
    with tempfile.TemporaryDirectory() as p:  # a copy: the base tokenizer object stays as it was
        base_tok.save_pretrained(p)
        res = AutoTokenizer.from_pretrained(p)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res
