"""Arcee Fusion: keep the other model's change only where it is important (mergekit's
``arcee_fusion.py``).

Arcee AI 2025, *Arcee Fusion* (https://arcee.ai; mergekit's reference); the importance is the
change times the KL divergence between the rows' softmaxes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmexpand.expand.merging.methods.registry import Inputs, register

if TYPE_CHECKING:
    import torch

QUANTILE_SAMPLE_SIZE = 1_000_000  # above this many elements the quantiles come from a random sample


def importance(params: "torch.Tensor", base: "torch.Tensor") -> "torch.Tensor":
    """``|x − base| · KL(softmax(x) ‖ softmax(base))`` per row (last dimension)."""
    import torch
    import torch.nn.functional as F

    diff = (params - base).abs()
    eps = 1e-8
    p = F.softmax(params, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl


@register("arcee_fusion", base="required", min_inputs=2, max_inputs=2, random=True, result_at_least="F32",
          paper="Arcee AI 2025, Arcee Fusion (arcee.ai; mergekit)",
          summary="take the other model's change where its importance exceeds median + 1.5 IQR")
def arcee_fusion(x: Inputs) -> "torch.Tensor":
    """``s = importance(x, base)``; threshold ``median(s) + 1.5·(q3 − q1)`` (quantiles by
    index into the sorted scores, sampled with replacement from 10^6 elements for larger
    tensors: the only random draw); ``base + (x − base)·[s ≥ threshold]`` (the mask is fp32,
    so the result is promoted to fp32 as in mergekit)."""
    import torch

    base, other = x.base, x.non_base[0]
    scores = importance(other, base)
    flat = scores.reshape(-1)
    n = flat.numel()

    def sample(gen):  # a RandomSource (methods/rng.py), or None outside a merge
        if n <= QUANTILE_SAMPLE_SIZE:
            return None
        return torch.randint(n, (QUANTILE_SAMPLE_SIZE,), device=flat.device,
                             generator=gen.torch if gen is not None else None)

    picked = x.draw(sample) if x.draw is not None else sample(None)
    if picked is not None:
        flat = flat[picked]
    ordered, _ = torch.sort(flat)
    q = torch.tensor([0.25, 0.5, 0.75])
    q1, median, q3 = ordered[(q.to(ordered.device) * (ordered.numel() - 1)).long()]
    threshold = median + 1.5 * (q3 - q1)
    mask = (scores >= threshold).float()
    return base + (other - base) * mask
