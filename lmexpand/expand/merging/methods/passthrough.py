"""Passthrough: one model's tensor, as is or scaled (mergekit's ``passthrough.py``); with
``slices:`` it stacks layers (frankenmerges, SOLAR-style depth up-scaling)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmexpand.expand.merging.methods.registry import Inputs, Param, register

if TYPE_CHECKING:
    import torch


@register("passthrough", params=[Param("scale", float, "input", default=None, optional=True)], max_inputs=1,
          paper="mergekit's passthrough (frankenmerges, Goddard et al. 2024)",
          summary="one model's tensor as is (optionally scaled): layer stacking with slices")
def passthrough(x: Inputs) -> "torch.Tensor":
    """``x`` or ``scale·x``."""
    scale = x.per_model["scale"][0]
    return x.tensors[0] if scale is None else x.tensors[0] * scale
