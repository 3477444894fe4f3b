"""NearSwap: take the other model's value where it is close to the base's, keep the base's
where they differ (mergekit's ``nearswap.py``).

alchemonaut 2024, QuartetAnemoi-70B-t0.0001 (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmexpand.expand.merging.methods.registry import Inputs, Param, register

if TYPE_CHECKING:
    import torch


@register("nearswap", params=[Param("t", float)], base="required", min_inputs=2, max_inputs=2,
          paper="alchemonaut 2024, NearSwap (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)",
          summary="per element, lerp base -> other with weight clamp(t/|base - other|, 0, 1)")
def nearswap(x: Inputs, t: float) -> "torch.Tensor":
    """``w = clamp(t / max(|a − b|, 1e-6), 0, 1)``, ``w·b + (1 − w)·a`` (a the base): elements
    closer than ``t`` become the other model's."""
    import torch

    a, b = x.base, x.non_base[0]
    weight = (t / torch.abs(a - b).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a
