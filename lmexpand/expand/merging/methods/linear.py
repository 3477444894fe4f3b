"""Linear merging: the weighted average (mergekit's ``linear.py``).

Wortsman et al. 2022, *Model soups* (arXiv 2203.05482); SPHINX's weight mix (arXiv 2311.07575).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmexpand.expand.merging.methods.registry import Inputs, Param, register, work_float

if TYPE_CHECKING:
    import torch


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
    dtype = work_float(first)
    weight = torch.tensor([x.per_model["weight"]], dtype=dtype, device=first.device)  # [1, models], as mergekit
    shape = (1,) + (1,) * first.ndim
    result = torch.zeros((1, *first.shape), dtype=dtype, device=first.device)
    for tensor, coefficient in zip(x.tensors, weight.unbind(1)):
        result.addcmul_(tensor.unsqueeze(0), coefficient.reshape(shape))
    if normalize:
        result.div_(weight.sum(dim=1).reshape(shape))
    return result.to(first.dtype)[0]
