"""SCE: select, calculate, erase (mergekit's ``sce.py``), the merging step of FuseChat.

Wan et al. 2024, *FuseChat: knowledge fusion of chat models* (arXiv 2408.07990), section 3.3.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmexpand.expand.merging.methods.generalized_task_arithmetic import sign_consensus_mask
from lmexpand.expand.merging.methods.registry import Inputs, Param, register

if TYPE_CHECKING:
    import torch


def sce_mask(tvs: "torch.Tensor", density: float, mask_dtype: "torch.dtype") -> "torch.Tensor":
    """Select: keep the ``int(density·nonzero)`` elements whose variance across the task
    vectors is largest (``topk``, as mergekit)."""
    import torch

    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=mask_dtype)
    if density >= 1:
        return torch.ones_like(tvs[0], dtype=mask_dtype)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    if k == 0:
        return torch.zeros_like(var, dtype=mask_dtype)
    _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    mask.view(-1)[indices] = 1
    return mask


def sce_weight(tvs: "torch.Tensor") -> "torch.Tensor":
    """Calculate: each task vector's weight is its mean square, normalized to sum 1 (equal
    weights when they all vanish)."""
    import torch

    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


@register("sce", params=[Param("int8_mask", bool, default=False), Param("select_topk", float, default=1.0)],
          base="required", paper="Wan et al. 2024, FuseChat (arXiv 2408.07990)",
          summary="select the highest-variance deltas, weight models by delta energy, erase minority signs")
def sce(x: Inputs, int8_mask: bool, select_topk: float) -> "torch.Tensor":
    """``τ_i = x_i − base``; select (``select_topk`` < 1): zero all but the top-variance
    elements; erase: TIES sign election over ``τ``; calculate: ``w_i = mean(τ_i²)/Σ_j mean(τ_j²)``;
    ``base + Σ_i w_i m_i τ_i / max(Σ_i w_i m_i, 1e-6)`` with ``m`` the sign mask."""
    import torch

    base = x.base
    tensors = x.non_base
    if not tensors:
        return base
    mask_dtype = torch.int8 if int8_mask else base.dtype
    tvs = torch.stack([t - base for t in tensors], dim=0)
    if select_topk < 1:
        tvs = tvs * sce_mask(tvs, select_topk, mask_dtype).unsqueeze(0)
    erase = sign_consensus_mask(tvs, mask_dtype)
    weights = sce_weight(tvs)
    while weights.dim() < tvs.dim():
        weights = weights.unsqueeze(-1)
    erased = weights * erase
    merged = (tvs * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)
