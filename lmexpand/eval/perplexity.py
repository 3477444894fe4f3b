"""Perplexity on a text set with a fixed token budget, and the function-preservation check.

Text is read like training data (plain text paragraphs, or JSONL with a field or a template),
documents joined with EOS, and the first ``max_tokens`` tokens are scored in windows of
``seq_len`` moved by ``stride``: each token is scored once, with up to ``seq_len - stride``
tokens of left context from the previous window (stride == seq_len: disjoint windows).
The same budget for every model makes perplexities comparable across rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmexpand.errors import ConfigError, NonFiniteError


@dataclass(frozen=True)
class TextSet:
    name: str
    path: Path
    field: str = "text"
    template: str | None = None


def parse_text_set(spec: str, template: str | None = None, field: str = "text") -> TextSet:
    """``name=FILE`` (or just FILE, named after the file)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).stem, spec
    if not name or not path:
        raise ConfigError(f"--data {spec!r}: use NAME=FILE, e.g. domain=../shared/data/gsm8k/test.jsonl")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--data {spec!r}: {p} is not a file.")
    return TextSet(name, p, field, template)


def check_text_set(ts: TextSet, records: int = 1000) -> None:
    """Read the first ``records`` documents as :func:`read_documents` does (fields, template,
    JSON, encoding): eval and ``run --check`` call this before any model is loaded."""
    read_documents(ts, limit=records)


def read_documents(ts: TextSet, limit: int | None = None) -> list[str]:
    if ts.path.suffix in (".jsonl", ".json"):
        docs = []
        try:
            with open(ts.path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if limit is not None and len(docs) >= limit:
                        break
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        if not isinstance(rec, dict):
                            raise ValueError(f"a JSON {type(rec).__name__}, not an object")
                        docs.append(ts.template.format(**rec) if ts.template else str(rec[ts.field]))
                    except KeyError as e:
                        raise ConfigError(
                            f"{ts.path}:{i}: the record has no field {e} (its fields: "
                            f"{', '.join(map(str, list(rec)[:10]))}); " + (
                                "fix --template." if ts.template else f"give the field with the text: --text-field "
                                "FIELD, or a --template over the fields.")) from None
                    except (ValueError, IndexError, AttributeError) as e:
                        raise ConfigError(
                            f"{ts.path}:{i}: cannot read a document ({type(e).__name__}: {e}); "
                            "check --text-field / --template (a literal brace is written {{ or }})."
                        ) from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{ts.path}: not UTF-8 text ({e.reason} at byte {e.start:,}); convert it to UTF-8.") from None
        return docs
    try:
        text = ts.path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{ts.path}: not UTF-8 text ({e.reason} at byte {e.start:,}); convert it to UTF-8.") from None
    docs = [p.strip() for p in text.split("\n\n") if p.strip()]
    return docs[:limit] if limit is not None else docs


def token_stream(ts: TextSet, tokenizer: Any, max_tokens: int) -> list[int]:
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for doc in read_documents(ts):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_tokens + 1:
            break
    return ids[: max_tokens + 1]


def perplexity(model: Any, ids: list[int], *, seq_len: int, stride: int, batch_size: int = 4) -> dict[str, float]:
    """Mean next-token NLL and its exp over ``ids`` (each target token scored once)."""
    import torch

    if len(ids) < 2:
        raise ConfigError("fewer than 2 tokens to score; give more text.")
    stride = min(stride, seq_len)
    windows = []  # (start, end, number of new targets at the window's end)
    prev_end = 0
    for start in range(0, len(ids) - 1, stride):
        end = min(start + seq_len, len(ids) - 1)
        new = end - max(prev_end, start)
        if new > 0:
            windows.append((start, end, new))
        prev_end = end
        if end == len(ids) - 1:
            break
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            group = windows[i:i + batch_size]
            width = max(e - s for s, e, _ in group)
            inp = torch.zeros((len(group), width), dtype=torch.long)
            tgt = torch.full((len(group), width), -100, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, (s, e, new) in enumerate(group):
                n = e - s
                inp[row, :n] = torch.tensor(ids[s:e])
                mask[row, :n] = 1
                tgt[row, n - new:n] = torch.tensor(ids[e - new + 1:e + 1])
            logits = model(input_ids=inp.to(device), attention_mask=mask.to(device)).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.to(device).reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            if not math.isfinite(nll.item()):
                raise NonFiniteError(non_finite_logits(logits, f"tokens {group[0][0]:,}-{group[-1][1]:,}"))
            total_nll += nll.item()
            total_tokens += int((tgt != -100).sum())
    mean = total_nll / total_tokens
    return {"nll": mean, "ppl": math.exp(mean), "tokens": total_tokens}


def non_finite_logits(logits: Any, where: str) -> str:
    """What a NaN/Inf score came from (the caller adds which model and text): the logits
    themselves, or a target given probability 0."""
    import torch

    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()):
        what = "NaN/Inf logits (its weights hold NaN/Inf, or its logits overflow)"
    else:
        what = "probability 0 to a token of the text (-inf logits)"
    return (f"gives {what} on {where}, so its perplexity is not a number. Check the weights with `lmexpand verify "
            "MODEL --values all`; a composition's weights (alpha, beta, --weights) may be too large")


def logit_difference(model: Any, base: Any, *, vocab_size: int, seed: int = 0) -> dict[str, float]:
    """max and mean |Δlogit| between two models on a fixed padded batch of random tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (4, 48), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[3, :20] = 0
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits.float()
        b = base(input_ids=ids, attention_mask=mask).logits.float()
    valid = mask.bool()
    for who, z in (("model", a), ("base", b)):
        if not bool(torch.isfinite(z[valid]).all()):
            raise NonFiniteError(f"the {who} " + non_finite_logits(z[valid], "the fixed batch of random tokens that "
                                                                    "measures function preservation"))
    d = (a - b).abs()[valid]
    return {"max_abs_dlogit": d.max().item(), "mean_abs_dlogit": d.mean().item()}
