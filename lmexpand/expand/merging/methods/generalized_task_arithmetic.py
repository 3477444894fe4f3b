"""The task-vector family (mergekit's ``generalized_task_arithmetic.py``): task arithmetic,
TIES, DARE, breadcrumbs and DELLA are one procedure with different sparsification and with
or without sign election, registered from one table.

Per model ``d_i = sparsify(x_i − base)``, ``D_i = w_i·d_i``; then either the sum (divided by
``Σ w_i`` when normalize) or TIES' sign election (majority sign of ``Σ D_i``, keep agreeing
entries, divide by the weights kept); times ``lambda``; plus the base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from lmexpand.expand.merging.methods.registry import Inputs, Param, density_check, register
from lmexpand.expand.merging.methods.sparsify import della_probs, magnitude, outliers, random_work_dtype, rescaled

if TYPE_CHECKING:
    import torch


def sign_consensus_mask(deltas: "torch.Tensor", mask_dtype: "torch.dtype") -> "torch.Tensor":
    """TIES sign election (mergekit's ``get_mask(method="sum")``): True where an entry's sign
    agrees with the sign of the sum over models (0 counts as +)."""
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


CHUNK = 1 << 20  # elements per chunk of the streamed path: large enough for torch's per-op overhead and threads, small
# enough that a group of models needs tens of MB instead of whole tensors


def _task_arithmetic(x: Inputs, *, sparsify: Optional[str], consensus: bool, normalize: bool, rescale: bool,
                     lambda_: float, int8_mask: bool) -> "torch.Tensor":
    import torch

    base = x.base
    others = x.non_base
    if not others:
        return base
    if sparsify is None or (sparsify == "magnitude" and not rescale and not x.match_mergekit):
        return _streamed(x, trim=sparsify == "magnitude", consensus=consensus, normalize=normalize, lambda_=lambda_,
                         int8_mask=int8_mask)
    density = x.per_model["density"]
    deltas = base.new_empty((len(others), *base.shape))
    masks: list = [None] * len(others)
    if sparsify in ("random", "della"):
        def draw_all(gen):
            # mergekit's order: tensors by sorted name, then models in config order; one
            # model's keep-probabilities at a time (della's come from its delta's ranks)
            out = []
            for i, other in enumerate(others):
                if density[i] >= 1 or (sparsify == "della" and density[i] <= 0):
                    out.append(None)
                    continue
                if sparsify == "random":  # torch.bernoulli(full_like(p))'s bits, replayed (methods/rng.py)
                    out.append(gen.bernoulli_full(other, density[i], random_work_dtype(other)))
                    continue
                p = della_probs(other - base, density[i], x.per_model["epsilon"][i])
                out.append(gen.bernoulli(p))
                del p
            return out

        masks = x.draw(draw_all)
    for i, other in enumerate(others):
        d = other - base  # one model's delta at a time (memory)
        if sparsify == "magnitude":
            d = magnitude(d, density[i], rescale, match_mergekit=x.match_mergekit)
        elif sparsify == "outliers":
            d = outliers(d, density[i], rescale, x.per_model["gamma"][i])
        elif sparsify == "random" and masks[i] is not None:
            work = masks[i].dtype
            d = rescaled(d.to(work), masks[i], rescale).to(d.dtype)
        elif sparsify == "della":
            if density[i] <= 0:
                d = torch.zeros_like(d)
            elif masks[i] is not None:
                work = masks[i].dtype
                shape = d.shape
                dd = d.unsqueeze(0) if d.dim() < 2 else d
                d = rescaled(dd.to(work), masks[i].to(work), rescale).to(d.dtype).reshape(shape)
        deltas[i] = d
        masks[i] = None
        del d
    weights = torch.tensor(x.per_model["weight"], dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    return _combine(base, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_,
                    mask_dtype=torch.int8 if int8_mask else base.dtype)


def _combine(base: "torch.Tensor", deltas: "torch.Tensor", weights: "torch.Tensor", *, consensus: bool,
             normalize: bool, lambda_: float, mask_dtype: "torch.dtype") -> "torch.Tensor":
    """``base + lambda · Σ D_i`` (divided by the weights, kept ones under sign election, when
    normalize) from the weighted deltas ``D_i``: mergekit's last steps, per element."""
    if consensus:
        mask = sign_consensus_mask(deltas, mask_dtype)
        mixed = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return (base + mixed).to(base.dtype)


def _streamed(x: Inputs, *, trim: bool, consensus: bool, normalize: bool, lambda_: float,
              int8_mask: bool) -> "torch.Tensor":
    """The same arithmetic, in the same dtypes, over chunks of :data:`CHUNK` elements: after
    each model's trimming threshold is known (one histogram pass over its delta, two in fp32)
    every step is per element, so chunking changes no bit (the comparison with mergekit runs
    through here) and needs memory for a few chunks instead of ``models + 3`` whole tensors.
    Ties at a threshold are kept by lowest flat index, chunk after chunk."""
    import torch

    from lmexpand.expand.merging.methods.sparsify import kth_largest_of_chunks

    base = x.base.reshape(-1)
    others = [o.reshape(-1) for o in x.non_base]
    total = base.numel()
    density = x.per_model["density"]

    def delta_chunks(i: int):
        return lambda: (others[i][s:s + CHUNK] - base[s:s + CHUNK] for s in range(0, total, CHUNK))

    keep: list[Any] = []  # per model: None (all), "zero", or [threshold, ties still to keep or None for all]
    for i in range(len(others)):
        if not trim or density[i] >= 1:
            keep.append(None)
        elif density[i] <= 0 or total == 0:
            keep.append("zero")
        else:
            k = max(1, int(density[i] * total))
            abs_chunks = delta_chunks(i)
            threshold, above, equal = kth_largest_of_chunks(lambda: (d.abs() for d in abs_chunks()), base.dtype,
                                                            base.device, k)
            keep.append([threshold, k - above if above + equal > k else None])
    weights = torch.tensor(x.per_model["weight"], dtype=base.dtype, device=base.device).unsqueeze(-1)
    mask_dtype = torch.int8 if int8_mask else base.dtype
    out = torch.empty_like(base)
    for s in range(0, total, CHUNK):
        b = base[s:s + CHUNK]
        deltas = b.new_empty((len(others), b.numel()))
        for i, other in enumerate(others):
            d = other[s:s + CHUNK] - b
            rule = keep[i]
            if rule == "zero":
                d = torch.zeros_like(d)
            elif rule is not None:
                w = d.abs()
                if rule[1] is None:
                    kept = w >= rule[0]
                else:
                    kept = w > rule[0]
                    if rule[1] > 0:
                        ties = torch.nonzero(w == rule[0]).reshape(-1)[:rule[1]]
                        kept[ties] = True
                        rule[1] -= ties.numel()
                d = d * kept  # t·bool: the same ±0 as mergekit's t·1.0/0.0
            deltas[i] = d
        deltas.mul_(weights)
        out[s:s + CHUNK] = _combine(b, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_,
                                    mask_dtype=mask_dtype)
    return out.reshape(x.base.shape)


def _task_family(name: str, *, sparsify: Optional[str], consensus: bool, normalize: bool, rescale: bool,
                 paper: str, summary: str) -> None:
    params = [Param("weight", float, "non_base"), Param("density", float, "non_base", default=1.0, check=density_check),
              Param("normalize", bool, default=normalize), Param("rescale", bool, default=rescale),
              Param("lambda", float, default=1.0), Param("int8_mask", bool, default=False)]
    if sparsify == "outliers":
        params.append(Param("gamma", float, "non_base", default=0.01,
                            check=lambda v: None if 0 <= v <= 1 else f"gamma {v:g} is outside [0, 1]"))
    if sparsify == "della":
        params.append(Param("epsilon", float, "non_base", default=0.15,
                            check=lambda v: None if v >= 0 else f"epsilon {v:g} is negative"))

    def merge(x: Inputs, normalize: bool, rescale: bool, int8_mask: bool, **kw: Any) -> "torch.Tensor":
        return _task_arithmetic(x, sparsify=sparsify, consensus=consensus, normalize=normalize, rescale=rescale,
                                lambda_=kw["lambda"], int8_mask=int8_mask)

    merge.__doc__ = (f"{summary}. Per model ``d_i = sparsify(x_i − base)``, ``D_i = w_i·d_i``; "
                     + ("sign election: majority sign of ``Σ D_i``, keep agreeing entries, divide by the weights "
                        "kept; " if consensus else "sum, divide by ``Σ w_i`` when normalize; ")
                     + "times lambda; plus the base.")
    register(name, params=params, base="required", paper=paper, summary=summary,
             random=sparsify in ("random", "della"))(merge)


# name, sparsification, sign election, normalize and rescale defaults (mergekit's registry), paper, summary
_DARE = "Yu et al. 2024, DARE: language models are Super Mario (arXiv 2311.03099)"
_CRUMBS = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv 2312.06795)"
_DELLA = "Deep et al. 2024, DELLA-Merging (arXiv 2406.11617)"
for _name, _sparsify, _consensus, _normalize, _rescale, _paper, _summary in (
    ("task_arithmetic", None, False, False, False, "Ilharco et al. 2023, Editing models with task arithmetic "
     "(arXiv 2212.04089)", "base + sum_i w_i (x_i - base)"),
    ("ties", "magnitude", True, True, False, "Yadav et al. 2023, TIES-Merging (arXiv 2306.01708)",
     "trim to the top-density magnitudes, elect signs, disjoint mean"),
    ("dare_ties", "random", True, False, True, _DARE, "drop deltas at random (keep density), rescale, elect signs"),
    ("dare_linear", "random", False, False, True, _DARE, "drop deltas at random, rescale, add"),
    ("breadcrumbs", "outliers", False, False, False, _CRUMBS, "drop the largest (gamma) and smallest deltas, add"),
    ("breadcrumbs_ties", "outliers", True, False, False, _CRUMBS, "breadcrumbs with TIES sign election"),
    ("della", "della", True, True, True, _DELLA, "magnitude-ranked random drop (density +- epsilon), rescale, "
     "elect signs"),
    ("della_linear", "della", False, False, True, _DELLA, "della without sign election"),
):
    _task_family(_name, sparsify=_sparsify, consensus=_consensus, normalize=_normalize, rescale=_rescale,
                 paper=_paper, summary=_summary)
