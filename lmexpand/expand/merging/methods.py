"""Merge methods: one small function per method, registered by name.

Each function merges one tensor. It receives :class:`Inputs` (the tensors in the method's
layout: for base-aware methods the base first, then the other models in configuration
order), the resolved per-model parameters and the shared ones as keyword arguments. The
arithmetic follows mergekit 0.1.5 operation by operation (same dtypes, same reductions, same
random draws in the same order), so outputs agree bitwise; ``../shared/notes/merge-methods.md``
and mergekit's ``merge_methods/`` are the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

if TYPE_CHECKING:
    import torch

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float, bool, int
    scope: str = "shared"  # "shared", "input" (every model), "non_base" (every model but the base)
    default: Any = REQUIRED
    optional: bool = False  # None allowed (passthrough's scale)
    check: Optional[Callable[[Any], Optional[str]]] = None  # value -> problem or None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def cast(self, value: Any) -> Any:
        """mergekit validates with pydantic in lax mode: 1 -> 1.0, "0.5" -> 0.5, true/false."""
        from pydantic import TypeAdapter

        kind = Optional[self.kind] if self.optional else self.kind
        try:
            return TypeAdapter(kind).validate_python(value)
        except Exception:  # noqa: BLE001 - pydantic's ValidationError; reported with the name
            raise ValueError(f"{self.name}: {value!r} is not a {self.kind.__name__}") from None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., "torch.Tensor"]
    params: tuple[Param, ...]
    base: str  # "required", "optional", "ignored"
    paper: str
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    min_non_base: int = 0
    max_non_base: Optional[int] = None
    random: bool = False
    summary: str = ""

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


@dataclass
class Inputs:
    """One tensor group: ``tensors`` in layout order; ``base_index`` 0 or None; per-model
    parameters aligned with ``tensors`` (``input`` scope) or with ``non_base``."""

    tensors: list["torch.Tensor"]
    base_index: Optional[int]
    per_model: dict[str, list[Any]] = field(default_factory=dict)
    draw: Optional[Callable[[Callable[["torch.Generator"], Any]], Any]] = None  # runs fn(gen) in RNG order

    @property
    def base(self) -> Optional["torch.Tensor"]:
        return None if self.base_index is None else self.tensors[self.base_index]

    @property
    def non_base(self) -> list["torch.Tensor"]:
        return [t for i, t in enumerate(self.tensors) if i != self.base_index]


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, params: Sequence[Param] = (), base: str = "ignored", paper: str, summary: str,
             **limits: Any) -> Callable:
    def decorate(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        METHODS[name] = MergeMethod(name, fn, tuple(params), base, paper, summary=summary, **limits)
        return fn

    return decorate


def _density(v: float) -> Optional[str]:
    return None if 0.0 <= v <= 1.0 else f"density {v:g} is outside [0, 1] (the fraction of each task vector kept)"


def _work_float(t: "torch.Tensor") -> "torch.dtype":
    import torch

    return torch.float64 if t.dtype == torch.float64 else torch.float32


# -- linear ------------------------------------------------------------------------------------
@register("linear", params=[Param("weight", float, "input"), Param("normalize", bool, default=True)],
          paper="Wortsman et al. 2022, Model soups (arXiv 2203.05482); SPHINX (arXiv 2311.07575)",
          summary="sum_i w_i x_i / sum_i w_i")
def linear(x: Inputs, normalize: bool) -> "torch.Tensor":
    """``Σ w_i·x_i`` (``/ Σ w_i`` when normalize): SPHINX's ``β·θ1 + (1−β)·θ2`` and the uniform
    soup. Accumulated in fp32 (fp64 for fp64 inputs) with a fused multiply-add per model."""
    import torch

    first = x.tensors[0]
    if not first.is_floating_point():
        raise TypeError("linear merging needs floating-point tensors")
    dtype = _work_float(first)
    weight = torch.tensor([x.per_model["weight"]], dtype=dtype)  # [1, models], as mergekit batches it
    shape = (1,) + (1,) * first.ndim
    result = torch.zeros((1, *first.shape), dtype=dtype)
    for tensor, coefficient in zip(x.tensors, weight.unbind(1)):
        result.addcmul_(tensor.unsqueeze(0), coefficient.reshape(shape))
    if normalize:
        result.div_(weight.sum(dim=1).reshape(shape))
    return result.to(first.dtype)[0]


# -- spherical interpolation ---------------------------------------------------------------------
_CHUNK = 1024 * 1024


@register("slerp", params=[Param("t", float)], base="required", min_inputs=2, max_inputs=2,
          paper="Shoemake 1985; used for LLMs by mergekit (Goddard et al. 2024, arXiv 2403.13257)",
          summary="spherical interpolation from the base (t=0) to the other model (t=1)")
def slerp(x: Inputs, t: float) -> "torch.Tensor":
    """``sin((1−t)θ)/sinθ·a + sin(tθ)/sinθ·b`` with θ the angle between the flattened tensors;
    plain lerp when ``|cos θ| > 0.9995``. Norms and dot product in fp32, over chunks of 2^20
    elements (mergekit's order of summation)."""
    import torch

    v0, v1 = x.tensors[0], x.tensors[1]
    if not v0.is_floating_point():
        raise TypeError("slerp needs floating-point tensors")
    dtype = _work_float(v0)
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=dtype).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    chunk = max(1, _CHUNK // a.shape[0])
    na, nb = [], []
    for s in range(0, a.shape[1], chunk):
        na.append(torch.linalg.vector_norm(a[:, s:s + chunk].to(dtype), dim=1, keepdim=True))
        nb.append(torch.linalg.vector_norm(b[:, s:s + chunk].to(dtype), dim=1, keepdim=True))
    norm_a = torch.linalg.vector_norm(torch.stack(na), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(nb), dim=0)
    norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
    norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
    dots = []
    for s in range(0, a.shape[1], chunk):
        dots.append(((a[:, s:s + chunk].to(dtype) / norm_a) * (b[:, s:s + chunk].to(dtype) / norm_b))
                    .sum(dim=1, keepdim=True))
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    lin = dot.abs() > 0.9995
    theta = torch.acos(torch.where(lin, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(lin, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(lin, tt, torch.sin(tt * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in range(0, a.shape[1], chunk):
        result[:, s:s + chunk] = coef_a * a[:, s:s + chunk].to(dtype) + coef_b * b[:, s:s + chunk].to(dtype)
    return result.reshape(v0.shape)


def _nuslerp(t: float, v0: "torch.Tensor", v1: "torch.Tensor", dim: int, flatten: bool) -> "torch.Tensor":
    import torch

    out_shape = v0.shape

    def unit(v: "torch.Tensor") -> "torch.Tensor":
        return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=1e-7)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-8 ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


@register("nuslerp", params=[Param("weight", float, "non_base"), Param("nuslerp_row_wise", bool, default=False),
                             Param("nuslerp_flatten", bool, default=True)],
          base="optional", min_non_base=2, max_non_base=2,
          paper="mergekit's NuSLERP (Goddard et al. 2024, arXiv 2403.13257)",
          summary="slerp of two weighted models, or of their task vectors when a base is given")
def nuslerp(x: Inputs, nuslerp_row_wise: bool, nuslerp_flatten: bool) -> "torch.Tensor":
    """``t = w1/(w0+w1)`` (0.5 if the weights sum to ~0); slerp of the two models, or
    ``base + slerp(x0 − base, x1 − base)``; whole tensors (flatten) or per row/column; math in
    the input dtype."""
    a, b = x.non_base
    w = x.per_model["weight"]
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    dim = 0 if nuslerp_row_wise else -1
    if x.base is not None:
        return x.base + _nuslerp(t, a - x.base, b - x.base, dim, nuslerp_flatten)
    return _nuslerp(t, a, b, dim, nuslerp_flatten)


# -- task arithmetic family ---------------------------------------------------------------------
def _rescaled(tensor: "torch.Tensor", mask: "torch.Tensor", rescale: bool) -> "torch.Tensor":
    """``tensor·mask``, times ``|tensor|₁/|masked|₁`` when rescaling (unless either < 1e-7)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def _magnitude(t: "torch.Tensor", density: float, rescale: bool) -> "torch.Tensor":
    """TIES trim: keep the top ``max(1, int(density·n))`` magnitudes."""
    import torch

    if density >= 1:
        return t
    if density <= 0 or t.numel() == 0:
        return torch.zeros_like(t)
    k = max(1, int(density * t.numel()))
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    w = t.abs().reshape(-1).float()
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return _rescaled(t, mask.reshape_as(t), rescale)


def _outliers(t: "torch.Tensor", density: float, rescale: bool, gamma: float) -> "torch.Tensor":
    """Breadcrumbs: drop the largest ``int(gamma·n)`` and the smallest, keep ``int(density·n)``."""
    import torch

    if density >= 1:
        return t
    n = t.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    idx = torch.sort(t.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=t.dtype)
    mask[idx[n_bot:n_bot + target]] = 1
    return _rescaled(t, mask.reshape_as(t), rescale)


def _bernoulli_probs(t: "torch.Tensor", density: float) -> "torch.Tensor":
    import torch

    work = t.dtype if t.dtype == torch.bfloat16 else torch.float32  # CPU: no fp16 bernoulli
    return torch.full_like(t, density, dtype=work)


def _della_probs(t: "torch.Tensor", density: float, epsilon: float) -> "torch.Tensor":
    """DELLA MagPrune: keep probability from density−ε to density+ε by magnitude rank per row."""
    import torch

    work = t.dtype if t.dtype == torch.bfloat16 else torch.float32
    if t.dim() < 2:
        t = t.unsqueeze(0)
    ranks = torch.argsort(t.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def _task_arithmetic(x: Inputs, *, sparsify: Optional[str], consensus: bool, normalize: bool, rescale: bool,
                     lambda_: float, int8_mask: bool) -> "torch.Tensor":
    import torch

    base = x.base
    others = x.non_base
    if not others:
        return base
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
                p = (_bernoulli_probs(other, density[i]) if sparsify == "random"
                     else _della_probs(other - base, density[i], x.per_model["epsilon"][i]))
                out.append(torch.bernoulli(p, generator=gen))
                del p
            return out

        masks = x.draw(draw_all)
    for i, other in enumerate(others):
        d = other - base  # one model's delta at a time (memory)
        if sparsify == "magnitude":
            d = _magnitude(d, density[i], rescale)
        elif sparsify == "outliers":
            d = _outliers(d, density[i], rescale, x.per_model["gamma"][i])
        elif sparsify == "random" and masks[i] is not None:
            work = masks[i].dtype
            d = _rescaled(d.to(work), masks[i], rescale).to(d.dtype)
        elif sparsify == "della":
            if density[i] <= 0:
                d = torch.zeros_like(d)
            elif masks[i] is not None:
                work = masks[i].dtype
                shape = d.shape
                dd = d.unsqueeze(0) if d.dim() < 2 else d
                d = _rescaled(dd.to(work), masks[i].to(work), rescale).to(d.dtype).reshape(shape)
        deltas[i] = d
        masks[i] = None
        del d
    weights = torch.tensor(x.per_model["weight"], dtype=deltas.dtype)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    if consensus:
        mask_dtype = torch.int8 if int8_mask else base.dtype
        sign = deltas.sign().to(mask_dtype)
        majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
        mask = sign == majority
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


def _task_family(name: str, *, sparsify: Optional[str], consensus: bool, normalize: bool, rescale: bool,
                 paper: str, summary: str) -> None:
    params = [Param("weight", float, "non_base"), Param("density", float, "non_base", default=1.0, check=_density),
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


# -- model stock, passthrough -------------------------------------------------------------------
@register("model_stock", params=[Param("filter_wise", bool, default=False)], base="required", min_inputs=3,
          paper="Jang et al. 2024, Model Stock (arXiv 2403.19522)",
          summary="interpolate base -> mean of fine-tunes by their offsets' mean pairwise cosine")
def model_stock(x: Inputs, filter_wise: bool) -> "torch.Tensor":
    """``t = N·cos/(1+(N−1)·cos)`` (0 where the denominator is ~0), ``t·mean(x_i) + (1−t)·base``,
    cos the mean pairwise cosine of the offsets ``x_i − base`` (per row when filter_wise)."""
    import torch

    w0, ws = x.base, x.non_base
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norm = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * cos_theta
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    (n * cos_theta) / torch.where(singular, torch.ones_like(den), den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


@register("passthrough", params=[Param("scale", float, "input", default=None, optional=True)], max_inputs=1,
          paper="mergekit's passthrough (frankenmerges, Goddard et al. 2024)",
          summary="one model's tensor as is (optionally scaled): layer stacking with slices")
def passthrough(x: Inputs) -> "torch.Tensor":
    """``x`` or ``scale·x``."""
    scale = x.per_model["scale"][0]
    return x.tensors[0] if scale is None else x.tensors[0] * scale


def method_names() -> list[str]:
    return sorted(METHODS) + ["greedy_soup"]
