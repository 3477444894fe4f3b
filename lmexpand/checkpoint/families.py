"""Architecture families as data.

A family says how a decoder-only checkpoint names its tensors and how its config counts
layers, so that every surgery is written once for all families (no ``if "qwen" in name`` in
method code). Adding a family is one :class:`Family` entry in :data:`FAMILIES`.

Names are templates relative to a layer prefix (``model.layers.{layer}.``). ``layer_tensors``
lists every tensor one decoder layer holds; ``output_projections`` are the modules whose
output is added to the residual stream (zeroing their weight, and bias if any, makes a block
an identity: the LLaMA-Pro init).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from lmexpand.errors import UnsupportedArchitectureError

_LLAMA_LAYER = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    causal_lm_class: str
    layer_tensors: tuple[str, ...] = _LLAMA_LAYER
    # Tensors a layer may have depending on config flags (attention_bias, mlp_bias, ...).
    optional_layer_tensors: tuple[str, ...] = (
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.bias",
        "mlp.gate_proj.bias",
        "mlp.up_proj.bias",
        "mlp.down_proj.bias",
    )
    output_projections: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    mlp_projections: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    layer_prefix: str = "model.layers.{layer}."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    num_layers_key: str = "num_hidden_layers"
    # Config entries that hold one value per layer; surgeries that add or remove layers
    # must extend them consistently.
    per_layer_keys: tuple[str, ...] = ("layer_types",)
    notes: str = ""
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prefix = re.escape(self.layer_prefix).replace(r"\{layer\}", r"(\d+)")
        object.__setattr__(self, "_layer_re", re.compile("^" + prefix + "(.+)$"))

    def layer_name(self, layer: int, relative: str) -> str:
        return self.layer_prefix.format(layer=layer) + relative

    def split_layer_name(self, name: str) -> tuple[int, str] | None:
        """``model.layers.3.mlp.up_proj.weight`` -> ``(3, "mlp.up_proj.weight")``; None for
        tensors outside the decoder layers."""
        m = self._layer_re.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    def num_layers(self, config: Mapping[str, Any]) -> int:
        return int(config[self.num_layers_key])


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for existing in FAMILIES.values():
        clash = set(existing.model_types) & set(family.model_types)
        if family.name in FAMILIES or clash:
            raise ValueError(f"family {family.name!r} clashes with {existing.name!r}")
    FAMILIES[family.name] = family
    return family


register_family(Family("llama", ("llama",), "LlamaForCausalLM"))
register_family(
    Family(
        "mistral",
        ("mistral",),
        "MistralForCausalLM",
        notes="sliding_window is one global value, not per layer",
    )
)
register_family(
    Family(
        "qwen2",
        ("qwen2",),
        "Qwen2ForCausalLM",
        notes="q/k/v projections carry biases; layer_types holds per-layer attention kind",
    )
)
register_family(
    Family(
        "qwen3",
        ("qwen3",),
        "Qwen3ForCausalLM",
        layer_tensors=_LLAMA_LAYER + ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
        notes="per-head RMSNorm on q and k",
    )
)


# config keys that only mixture-of-experts models set
MOE_CONFIG_KEYS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts", "num_experts_per_tok")


def detect_family(config: Mapping[str, Any], where: str = "config.json") -> Family:
    """The family of a model config, or a clear error listing the supported ones."""
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    archs = config.get("architectures") or []
    from lmexpand.checkpoint.composed import is_composed_config

    if is_composed_config(config):
        raise UnsupportedArchitectureError(
            f"{where}: this is a composed model ({model_type}: several models run together, made by an lmexpand "
            f"surgery); this step needs a plain causal LM ({supported}). Use one of its members, or export it and "
            "load it with trust_remote_code=True.")
    moe_keys = [k for k in MOE_CONFIG_KEYS if config.get(k)]
    if moe_keys:
        raise UnsupportedArchitectureError(
            f"{where}: model_type {model_type!r} is already a mixture-of-experts model ({moe_keys[0]}="
            f"{config[moe_keys[0]]}); lmexpand's surgeries start from dense models "
            f"({supported})."
        )
    raise UnsupportedArchitectureError(
        f"{where}: model_type {model_type!r} (architectures {archs}) is not supported. "
        f"Supported model types: {supported}. "
        "Adding one is a Family entry in lmexpand/checkpoint/families.py."
    )
