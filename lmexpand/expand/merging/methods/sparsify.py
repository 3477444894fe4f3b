"""Sparsification of task vectors (mergekit's ``sparsify.py``): which entries of each
``x_i − base`` survive, and the rescaling that keeps their L1 norm."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def rescaled(tensor: "torch.Tensor", mask: "torch.Tensor", rescale: bool) -> "torch.Tensor":
    """``tensor·mask``, times ``|tensor|₁/|masked|₁`` when rescaling (unless either < 1e-7)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def magnitude(t: "torch.Tensor", density: float, rescale: bool) -> "torch.Tensor":
    """TIES trim: keep the top ``max(1, int(density·n))`` magnitudes (mergekit's argsort)."""
    import torch

    if density >= 1:
        return t
    if density <= 0 or t.numel() == 0:
        return torch.zeros_like(t)
    k = max(1, int(density * t.numel()))
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    w = t.abs().reshape(-1)
    if w.device.type == "cpu":  # mergekit sorts in fp32 on CPU only
        w = w.float()
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return rescaled(t, mask.reshape_as(t), rescale)


def outliers(t: "torch.Tensor", density: float, rescale: bool, gamma: float) -> "torch.Tensor":
    """Breadcrumbs: drop the largest ``int(gamma·n)`` and the smallest, keep ``int(density·n)``."""
    import torch

    if density >= 1:
        return t
    n = t.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    w = t.abs().reshape(-1)
    if w.device.type == "cpu":  # mergekit sorts in fp32 on CPU only
        w = w.float()
    idx = torch.sort(w, descending=False).indices
    mask = torch.zeros(n, dtype=t.dtype, device=t.device)
    mask[idx[n_bot:n_bot + target]] = 1
    return rescaled(t, mask.reshape_as(t), rescale)


def _random_work_dtype(t: "torch.Tensor") -> "torch.dtype":
    """mergekit's dtype for keep probabilities: the input's on an accelerator or for bf16; on
    CPU fp32 otherwise (CPU has no fp16 bernoulli)."""
    import torch

    return t.dtype if t.device.type != "cpu" or t.dtype == torch.bfloat16 else torch.float32


def bernoulli_probs(t: "torch.Tensor", density: float) -> "torch.Tensor":
    """DARE's keep probabilities."""
    import torch

    work = _random_work_dtype(t)
    return torch.full_like(t, density, dtype=work)


def della_probs(t: "torch.Tensor", density: float, epsilon: float) -> "torch.Tensor":
    """DELLA MagPrune: keep probability from density−ε to density+ε by magnitude rank per row."""
    import torch

    work = _random_work_dtype(t)
    if t.dim() < 2:
        t = t.unsqueeze(0)
    ranks = torch.argsort(t.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon
