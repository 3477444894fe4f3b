"""Greedy soup (Wortsman et al. 2022, Model soups, arXiv 2203.05482, recipe 1).

1. Score every candidate alone on held-out text (perplexity; lower is better) and rank them.
2. The soup starts as the best candidate.
3. Each next candidate, in rank order, is added to the running *uniform* average only if the
   average's held-out perplexity does not get worse.
4. The output is the uniform ``linear`` merge of the kept candidates: the very tensors that
   were scored (each trial is the same merge op the streaming executor runs).

The configuration is mergekit-style: ``merge_method: greedy_soup`` with ``models:`` (the
candidates, no parameters). The scorer comes from the caller (the merge stage,
:mod:`lmexpand.stages.merge`, uses lmexpand's perplexity), so this module does not depend on
evaluation code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lmexpand.errors import ConfigError
from lmexpand.expand.merging.config import InputModel
from lmexpand.expand.merging.planner import Resolved, open_models, plan_merge
from lmexpand.expand.plan import _torch_dtype


@dataclass
class SoupResult:
    resolved: Resolved  # a uniform linear merge of the kept candidates
    record: dict[str, Any]


def soup_inputs(resolved: Resolved, where: str) -> Resolved:
    """Check a greedy_soup configuration: ≥ 2 candidates, no base, no parameters; and that
    the candidates can be averaged at all (the same checks as a linear merge)."""
    f = resolved.file
    problems = []
    if not f.models:
        problems.append("greedy_soup takes models: (the candidates), not slices:")
    elif len(f.models) < 2:
        problems.append(f"greedy_soup needs at least 2 candidates; got {len(f.models)}")
    if f.base_model:
        problems.append("greedy_soup averages fine-tunes uniformly and has no base_model; remove it (or list the "
                        "base as one more candidate)")
    if f.parameters or any(m.parameters for m in (f.models or [])):
        problems.append("greedy_soup takes no parameters (every kept candidate has the same weight); remove them")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems) + ".")
    linear = _uniform(resolved, resolved.models, where)
    plan_merge(linear, where)  # families, shapes, vocabularies: refused before anything is scored
    return resolved


def uniform_merge(resolved: Resolved, where: str) -> Resolved:
    """The uniform linear merge of every candidate: the config and tensors of any soup of
    them, known before a candidate is scored."""
    return _uniform(resolved, resolved.models, where)


def _uniform(resolved: Resolved, refs: list[str], where: str) -> Resolved:
    """A linear merge, weight 1 each, of the candidates ``refs`` (by their resolved paths)."""
    paths = {ref: str(reader.path) for ref, reader in zip(resolved.models, resolved.readers)}
    f = resolved.file.model_copy(update={
        "merge_method": "linear", "base_model": None,
        "models": [InputModel(model=paths[r], parameters={"weight": 1.0}) for r in refs]})
    return open_models(f, where)


def _materialize(resolved: Resolved, where: str, model: Any = None) -> Any:
    """The merge in memory, as a transformers model (built once, then refilled)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmexpand.expand.executor import compute_tensor

    plan = plan_merge(resolved, where)
    readers = plan.readers

    def get(m: int, name: str) -> "torch.Tensor":
        return readers[m].get_tensor(name)

    if model is None:
        config = AutoConfig.for_model(**{k: v for k, v in plan.config.items() if k != "model_type"},
                                      model_type=plan.config["model_type"])
        model = AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(plan.tensors[0].dtype))
    state = {t.name: compute_tensor(t, get) for t in plan.tensors}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ConfigError(f"{where}: the merged tensors do not fit the model class ({unexpected[:2]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for r in readers:
        r.close()
    return model.eval()


def greedy_soup(resolved: Resolved, score: Callable[[Any], float], where: str,
                log: Callable[[str], None] = lambda s: None) -> SoupResult:
    refs = list(resolved.models)
    alone = {}
    model = None
    for ref in refs:
        model = _materialize(_uniform(resolved, [ref], where), where, model)
        alone[ref] = score(model)
        log(f"greedy soup: {ref} alone: perplexity {alone[ref]:.4f}")
    ranked = sorted(refs, key=lambda r: alone[r])
    kept = [ranked[0]]
    current = alone[ranked[0]]
    trials = []
    for ref in ranked[1:]:
        model = _materialize(_uniform(resolved, kept + [ref], where), where, model)
        value = score(model)
        keep = value <= current
        trials.append({"candidate": ref, "soup_perplexity": value, "kept": keep})
        log(f"greedy soup: + {ref}: perplexity {value:.4f} ({'kept' if keep else 'dropped'}; soup was {current:.4f})")
        if keep:
            kept.append(ref)
            current = value
    for r in resolved.readers:
        r.close()
    record = {"candidates_alone": alone, "ranking": ranked, "trials": trials, "kept": kept,
              "soup_perplexity": current}
    return SoupResult(_uniform(resolved, kept, where), record)
