"""NuSLERP: slerp of two weighted models or of their task vectors (mergekit's ``nuslerp.py``).

mergekit's method (Goddard et al. 2024, arXiv 2403.13257).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmexpand.expand.merging.methods.registry import Inputs, Param, register

if TYPE_CHECKING:
    import torch


def nuslerp_tensors(t: float, v0: "torch.Tensor", v1: "torch.Tensor", dim: int, flatten: bool,
                    eps: float = 1e-8) -> "torch.Tensor":
    """mergekit's ``nuslerp.nuslerp``: slerp along the last dimension (or ``dim``), or of the
    flattened tensors; lerp where the two are colinear."""
    import torch

    out_shape = v0.shape

    def unit(v: "torch.Tensor") -> "torch.Tensor":
        return v / torch.norm(v, dim=-1, keepdim=True).clamp(min=1e-7)

    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
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
        return x.base + nuslerp_tensors(t, a - x.base, b - x.base, dim, nuslerp_flatten)
    return nuslerp_tensors(t, a, b, dim, nuslerp_flatten)
