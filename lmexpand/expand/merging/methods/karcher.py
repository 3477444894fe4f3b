"""Karcher mean: the Riemannian centre of mass of the models on the unit hypersphere, scaled
back by their mean norm (mergekit's ``karcher.py``).

Karcher 1977, *Riemannian center of mass and mollifier smoothing* (CPAM 30(5)); applied to
model merging in arXiv 2603.04972 (mergekit's reference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmexpand.expand.merging.methods.registry import Inputs, Param, register

if TYPE_CHECKING:
    import torch


def karcher_mean(tensors: list["torch.Tensor"], alphas: list[float], max_iter: int, tol: float) -> "torch.Tensor":
    """mergekit's ``karcher_merge_tensors``: norms in fp32 (fp64 for fp64), unit vectors in the
    input dtype; the mean starts at the normalized weighted sum of the unit vectors and takes
    up to ``max_iter`` exponential-map steps along ``Σ α_i θ_i/sin θ_i (u_i − cos θ_i m)``,
    stopping when that step is shorter than ``tol``; scaled by ``Σ α_i |x_i|``."""
    import torch

    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    valid_alphas = [alphas[i] for i in valid]
    alpha_sum = sum(valid_alphas)
    weights = [a / alpha_sum for a in valid_alphas]
    valid_units = [units[i] for i in valid]
    mean = torch.zeros_like(valid_units[0])
    for a, unit in zip(weights, valid_units):
        mean += a * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, unit in zip(weights, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * norm for a, norm in zip(alphas, norms))
    return scale * mean


@register("karcher", params=[Param("max_iter", int, default=10,
                                   check=lambda v: None if v >= 0 else f"max_iter {v} is negative"),
                             Param("tol", float, default=1e-5)],
          paper="Karcher 1977 (Riemannian center of mass); for model merging arXiv 2603.04972",
          summary="Riemannian mean on the unit hypersphere of all models, equal weights, times their mean norm")
def karcher(x: Inputs, max_iter: int, tol: float) -> "torch.Tensor":
    """Equal weights ``1/N`` over every listed model (a ``base_model`` is just one of them)."""
    tensors = x.tensors
    if len(tensors) == 1:
        return tensors[0]
    return karcher_mean(list(tensors), [1.0 / len(tensors)] * len(tensors), max_iter, tol)
