"""Model Stock (mergekit's ``model_stock.py``).

Jang et al. 2024, *Model Stock: All we need is just a few fine-tuned models* (arXiv 2403.19522).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmexpand.expand.merging.methods.registry import Inputs, Param, register

if TYPE_CHECKING:
    import torch


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
