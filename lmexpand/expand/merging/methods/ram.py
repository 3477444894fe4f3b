"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (mergekit's ``ram.py``).

Task vectors' entries above ``epsilon`` are kept; an entry changed by one model only is taken
whole, one changed by several is averaged over those that changed it (not diluted by the
models that left it alone). arXiv 2601.13572.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmexpand.expand.merging.methods.registry import Inputs, Param, register

if TYPE_CHECKING:
    import torch

PAPER = "Reinforced Agent Merging (arXiv 2601.13572)"


def _ram_vectors(tensors: list["torch.Tensor"], base: "torch.Tensor", epsilon: float):
    """Flattened task vectors; where each exceeds ``epsilon``; how many models change each
    entry; entries changed by several / by exactly one."""
    import torch

    tv = torch.stack([t - base for t in tensors], dim=0).view(len(tensors), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    return tv, nonzero, counts, counts > 1, counts == 1


@register("ram", params=[Param("epsilon", float, default=1e-5)], base="required", paper=PAPER,
          summary="entries changed by one model taken whole, by several averaged over those")
def ram(x: Inputs, epsilon: float) -> "torch.Tensor":
    """``base + Σ_i τ_i·[|τ_i|>ε]·(U + O/max(c, 1))`` with ``c`` the number of models whose
    ``|τ_i| > ε`` at an entry, ``U = [c = 1]``, ``O = [c > 1]``."""
    base = x.base
    tensors = x.non_base
    if not tensors:
        return base
    tv, nonzero, counts, overlap, unique = _ram_vectors(tensors, base, epsilon)
    z = tv * nonzero
    merged = ((z * unique) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@register("ramplus_tl", params=[Param("r", float, default=0.1), Param("alpha", float, default=0.2),
                                Param("epsilon", float, default=1e-5)],
          base="required", paper=PAPER, result_at_least="F32",
          summary="RAM with each model's unique entries scaled up by its shared/unique ratio (per tensor)")
def ramplus_tl(x: Inputs, r: float, alpha: float, epsilon: float) -> "torch.Tensor":
    """RAM+, tensor-local: a model's unique entries are scaled by ``λ_i = 1 + r·clamp(ρ_i, 0, α)``,
    ``ρ_i`` = (its entries shared with another model) / (its unique entries), in this tensor.
    ``λ`` is fp32, so the result is promoted to fp32 as in mergekit."""
    base = x.base
    tensors = x.non_base
    if not tensors:
        return base
    tv, nonzero, counts, overlap, unique = _ram_vectors(tensors, base, epsilon)
    shared = (nonzero & overlap).sum(dim=1)
    alone = (nonzero & unique).sum(dim=1)
    rho = shared / alone.clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    z = tv * nonzero
    merged = ((z * unique * lam.unsqueeze(-1)) + (z * overlap / counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)
