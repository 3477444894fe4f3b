"""Per-expert checkpoint tensors <-> transformers v5's fused MoE parameters.

Checkpoints hold one tensor per expert (``experts.3.w1.weight``, ``experts.3.gate_proj.weight``)
while transformers v5 models hold the experts of a layer fused (``mlp.experts.gate_up_proj``
[E, 2I, H], gate rows first; ``mlp.experts.down_proj`` [E, H, I]); v5's Mixtral also names
its router ``mlp.gate`` where the files say ``block_sparse_moe.gate``. :func:`param_name` maps
a saved name to its parameter and the piece of it, :func:`piece_of` cuts that piece out
(:func:`piece_shape`: its shape).
``verify`` (structure against the config), training (which parameters are new) and the export
of trained models (written back per expert) all read the layout from here, and training's
router monitor and eval's expert load read routers with :func:`is_router` and
:func:`router_choice`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_EXPERT = re.compile(
    r"^(?P<layer>.*\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<e>\d+)\.(?P<w>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
_MIXTRAL_ROUTER = re.compile(r"^(?P<layer>.*\.layers\.\d+)\.block_sparse_moe\.gate\.weight$")
# Granite-MoE files (4.x and the Hub) hold each layer's experts stacked already, under other
# names than transformers 5's parameters (its conversion_mapping renames them on load)
_RENAMED = (
    (re.compile(r"^(?P<layer>.*\.layers\.\d+)\.block_sparse_moe\.input_linear\.weight$"), "block_sparse_moe.experts.gate_up_proj"),
    (re.compile(r"^(?P<layer>.*\.layers\.\d+)\.block_sparse_moe\.output_linear\.weight$"), "block_sparse_moe.experts.down_proj"),
    (re.compile(r"^(?P<layer>.*\.layers\.\d+)\.block_sparse_moe\.router\.layer\.weight$"), "block_sparse_moe.router.weight"),
)
_PIECE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def param_name(saved: str) -> tuple[str, tuple[str, int] | None]:
    """Saved tensor name -> (parameter name, (piece, expert) or None for a whole tensor)."""
    m = _EXPERT.match(saved)
    if m:
        piece = _PIECE[m["w"]]
        fused = "down_proj" if piece == "down" else "gate_up_proj"
        return f"{m['layer']}.mlp.experts.{fused}", (piece, int(m["e"]))
    m = _MIXTRAL_ROUTER.match(saved)
    if m:
        return f"{m['layer']}.mlp.gate.weight", None
    for pattern, param in _RENAMED:
        m = pattern.match(saved)
        if m:
            return f"{m['layer']}.{param}", None
    return saved, None


def piece_of(value: "torch.Tensor", piece: tuple[str, int] | None) -> "torch.Tensor":
    """The part of a fused expert tensor that one saved tensor holds."""
    if piece is None:
        return value
    kind, e = piece
    if kind == "down":
        return value[e]
    half = value.shape[1] // 2
    return value[e, :half] if kind == "gate" else value[e, half:]


def piece_shape(shape: tuple[int, ...], piece: tuple[str, int] | None) -> tuple[int, ...]:
    """The shape of :func:`piece_of` a tensor of ``shape``, without a tensor (or torch)."""
    if piece is None:
        return tuple(shape)
    if piece[0] == "down":
        return tuple(shape[1:])
    return (shape[1] // 2, *shape[2:])


def is_router_weight(param_name: str) -> bool:
    return param_name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight"))


def router_choice(output: Any, top_k: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """A router module's output -> (logits [tokens, experts], top-k indices [tokens, k]).

    transformers v5 routers return a tuple holding the logits (the float 2-D tensor) and the
    chosen indices (the integer 2-D tensor; Mixtral: logits, weights, indices); older and
    plain routers (an ``nn.Linear`` gate) return the logits alone, whose top-k is taken.
    """
    if isinstance(output, tuple):
        logits = next(t for t in output if hasattr(t, "is_floating_point") and t.is_floating_point() and t.dim() == 2)
        idx = next((t for t in output if hasattr(t, "is_floating_point") and not t.is_floating_point() and t.dim() == 2), None)
    else:
        logits, idx = output, None
    if idx is None:
        idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
    return logits, idx


def is_router(name: str, module: Any) -> bool:
    return name.endswith((".mlp.gate", ".block_sparse_moe.gate")) or type(module).__name__.lower().endswith("router")
