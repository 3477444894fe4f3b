"""The evaluation stage: ``lmexpand eval`` and a recipe's ``eval`` section."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lmexpand.errors import ConfigError


@dataclass(frozen=True)
class EvalRequest:
    model: str  # a model directory, a training run directory or an embedded name
    sets: list  # lmexpand.eval.perplexity.TextSet
    out: Path
    base: str | None = None
    compare: list[tuple[str, str]] = field(default_factory=list)  # (label, model)
    max_tokens: int = 16384
    seq_len: int = 256
    stride: int | None = None
    samples: bool = True
    allow_pickle: bool = False
    lm_eval: Any = None  # lmexpand.eval.harness.LmEvalSettings
    force: bool = False


def eval_request_from_flags(model: str, data: Sequence[str], template: str | None, text_field: str, base: str | None,
                            compare: Sequence[str], out: str, max_tokens: int, seq_len: int, stride: int | None,
                            no_samples: bool, lm_eval: dict[str, Any], allow_pickle: bool,
                            force: bool) -> EvalRequest:
    """The command's options, checked (``lm_eval``: the --lm-eval* options by their names
    without the prefix: tasks, include, limit, batch_size, fewshot, device)."""
    from lmexpand.eval.perplexity import parse_text_set

    if max_tokens <= 0 or seq_len <= 1 or (stride is not None and stride <= 0):
        raise ConfigError("--max-tokens, --seq-len and --stride must be positive (--seq-len at least 2).")
    pairs = []
    for c in compare:
        label, sep, spec = c.partition("=")
        if not sep or not label or not spec:
            raise ConfigError(f"--compare {c!r}: use LABEL=MODEL, e.g. expanded=out/pro")
        pairs.append((label, spec))
    harness = None
    if lm_eval["tasks"] is not None:
        from lmexpand.eval.harness import LmEvalSettings

        harness = LmEvalSettings.parse(lm_eval["tasks"], include=lm_eval["include"], limit=lm_eval["limit"],
                                       batch_size=lm_eval["batch_size"], device=lm_eval["device"],
                                       num_fewshot=lm_eval["fewshot"])
    elif any(lm_eval[k] is not None for k in ("include", "limit", "batch_size", "fewshot", "device")):
        raise ConfigError("the --lm-eval-* options set up lm-evaluation-harness: add --lm-eval TASKS "
                          "(e.g. --lm-eval hellaswag), or leave them out.")
    sets = [parse_text_set(d, template, text_field) for d in data]
    return EvalRequest(model, sets, Path(out), base=base, compare=pairs, max_tokens=max_tokens, seq_len=seq_len,
                       stride=stride, samples=not no_samples, allow_pickle=allow_pickle, lm_eval=harness, force=force)


def run_evaluation(request: EvalRequest) -> dict[str, Any]:
    """Score every row; write results.json, report.md and the plots into ``request.out``."""
    from lmexpand.eval.report import run_eval

    r = request
    return run_eval(r.model, r.sets, r.out, base=r.base, compare=r.compare, max_tokens=r.max_tokens,
                    seq_len=r.seq_len, stride=r.stride, samples=r.samples, allow_pickle=r.allow_pickle,
                    lm_eval=r.lm_eval, force=r.force)
