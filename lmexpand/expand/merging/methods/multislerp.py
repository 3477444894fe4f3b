"""Multi-SLERP: barycentric interpolation of any number of models on the hypersphere
(mergekit's ``multislerp.py``).

Goddard 2025, *Multi-SLERP* (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea); the
tangent-space construction of Buss & Fillmore 2001, *Spherical averages and applications to
spherical splines and interpolation* (ACM TOG 20(2)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmexpand.expand.merging.methods.registry import Inputs, MethodError, Param, register

if TYPE_CHECKING:
    import torch


@register("multislerp", params=[Param("weight", float, "non_base"), Param("normalize_weights", bool, default=True),
                                Param("eps", float, default=1e-8)],
          base="optional", min_non_base=1,
          paper="Goddard 2025, Multi-SLERP (goddard.blog); Buss & Fillmore 2001 (spherical averages)",
          summary="weighted spherical mean of any number of models (or of their task vectors with a base)")
def multislerp(x: Inputs, normalize_weights: bool, eps: float) -> "torch.Tensor":
    """With ``v_i`` the models (minus the base when one is given), ``u_i = v_i/(|v_i|+eps)``
    and ``w`` the weights (normalized to sum 1): ``m = Σ w_i u_i / |Σ w_i u_i|``; tangent
    vectors ``τ_i = u_i − (u_i·m) m``, ``τ = Σ w_i τ_i``; result
    ``(cos|τ|·m + sin|τ|/|τ|·τ) · Σ w_i |v_i|`` (plus the base), ``|τ|`` taken ``+eps``.
    A single model is returned as is; two antipodal models fall back to the weighted sum."""
    import torch

    tensors = x.non_base
    base = x.base
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    weights = torch.tensor(x.per_model["weight"], dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] == 2:  # antipodal pair: mergekit falls back to the weighted sum
            result = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
            return result + base if base is not None else result
        raise MethodError("multislerp: the weighted sum of the models' unit vectors is zero (antipodal models whose "
                          "weights cancel out); change the weights")
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangents = units - dots * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = result * (norms.squeeze(-1) * weights).sum()
    result = result.view(stacked.shape[1:])
    return result + base if base is not None else result
