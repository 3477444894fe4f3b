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
    # How the family's transformers class sizes its biases (for :meth:`expected_shapes`): the
    # config flag that gives q/k/v/o projections a bias, whether q/k/v always have one, and
    # the flag that gives the MLP projections one (None: never).
    attention_bias_key: str | None = "attention_bias"
    qkv_bias_always: bool = False
    mlp_bias_key: str | None = "mlp_bias"
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

    def expected_shapes(self, config: Mapping[str, Any]) -> tuple[dict[str, tuple[int, ...]], set[str]] | None:
        """Every tensor name and shape the family's transformers class builds from ``config``,
        and the names that may be absent (the tied head), without importing torch: what
        building the model on the ``meta`` device gives (tested against it for every family
        and flag), in a millisecond instead of seconds. None where the config leaves a size
        to the class's defaults (the caller then builds the model on ``meta``)."""
        need = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                self.num_layers_key)
        if any(not isinstance(config.get(k), int) or isinstance(config.get(k), bool) for k in need):
            return None
        head_dim = config.get("head_dim")
        if head_dim is None:
            head_dim = config["hidden_size"] // config["num_attention_heads"]
        elif not isinstance(head_dim, int) or isinstance(head_dim, bool):
            return None
        flags = [k for k in (self.attention_bias_key, self.mlp_bias_key) if k]
        if any(not isinstance(config.get(k, False), bool) for k in flags):
            return None
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
        attn_bias = bool(self.attention_bias_key and config.get(self.attention_bias_key, False))
        mlp_bias = bool(self.mlp_bias_key and config.get(self.mlp_bias_key, False))
        layer: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
            "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
            "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
            "mlp.down_proj.weight": (hidden, inter),
        }
        if attn_bias or self.qkv_bias_always:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if attn_bias:
            layer["self_attn.o_proj.bias"] = (hidden,)
        if mlp_bias:
            layer.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (hidden,)})
        for name in self.layer_tensors:
            if name not in layer:  # per-head norms (Qwen3's q_norm, k_norm)
                layer[name] = (head_dim,)
        shapes = {self.layer_name(i, name): shape for i in range(self.num_layers(config)) for name, shape in layer.items()}
        shapes[self.embed] = (config["vocab_size"], hidden)
        shapes[self.final_norm] = (hidden,)
        shapes[self.lm_head] = (config["vocab_size"], hidden)
        optional = {self.lm_head} if config.get("tie_word_embeddings", False) else set()
        return shapes, optional


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
        attention_bias_key=None,
        mlp_bias_key=None,
        notes="sliding_window is one global value, not per layer",
    )
)
register_family(
    Family(
        "qwen2",
        ("qwen2",),
        "Qwen2ForCausalLM",
        attention_bias_key=None,
        qkv_bias_always=True,
        mlp_bias_key=None,
        notes="q/k/v projections carry biases; layer_types holds per-layer attention kind",
    )
)
register_family(
    Family(
        "qwen3",
        ("qwen3",),
        "Qwen3ForCausalLM",
        layer_tensors=_LLAMA_LAYER + ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
        mlp_bias_key=None,
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
