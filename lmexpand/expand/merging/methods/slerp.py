"""Spherical linear interpolation between two models (mergekit's ``slerp.py``).

Shoemake 1985, *Animating rotation with quaternion curves*; used for LLM weights by mergekit
(Goddard et al. 2024, arXiv 2403.13257).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmexpand.expand.merging.methods.registry import Inputs, Param, register, work_float

if TYPE_CHECKING:
    import torch

CHUNK = 1024 * 1024  # mergekit's order of summation: norms and dot product over 2^20-element chunks


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
    dtype = work_float(v0)
    a = v0.reshape(1, -1)
    b = v1.reshape(1, -1)
    tt = torch.tensor([t], dtype=dtype, device=v0.device).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - tt) * a + tt * b).reshape(v0.shape).to(v0.dtype)
    chunk = max(1, CHUNK // a.shape[0])
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
