"""Architecture families as data.

A family says how a decoder-only checkpoint names its tensors, how big each one is, how its
config counts layers, and the few structural facts a surgery needs, so that every surgery is
written once for all families (no ``if "qwen" in name`` in method code). Adding a family is
one :class:`Family` entry in :data:`FAMILIES` (docs/families.md walks through one).

Names are templates relative to a layer prefix (``model.layers.{layer}.``). ``tensors``
lists every tensor one decoder layer may hold, with its shape in config terms and the config
flag that makes it present (biases). ``branch_ends`` are the modules whose output is added to
the residual stream; making them output exactly zero makes a block the identity (the
LLaMA-Pro init): a linear projection gets weight (and bias) 0, a post-norm gets scale 0,
i.e. weight ``-norm_offset`` for norms that compute ``x_hat * (norm_offset + w)`` (Gemma's
``(1 + w)``). The post-norm rather than the projection before it, because a norm turns a
small input back into a unit-size output: a zero projection under a post-norm is exact at
init but its first update would jump to full size, while a zero norm scale grows smoothly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from lmexpand.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a decoder layer (``name`` relative to the layer prefix) or of the model.
    ``shape`` in config terms: ``hidden``, ``inter`` (intermediate), ``q`` (heads x head_dim),
    ``kv`` (kv heads x head_dim), ``head_dim``, ``qkv`` (q + 2 kv, a fused projection),
    ``gate_up`` (2 x inter, a fused projection), ``vocab``. ``when``: the config flag that
    makes the tensor present (a bias); None: always present."""

    name: str
    shape: tuple[str, ...]
    when: str | None = None


def _t(name: str, *shape: str, when: str | None = None) -> TensorSpec:
    return TensorSpec(name, shape, when)


def _linear(module: str, out: str, inp: str, bias: str | None) -> tuple[TensorSpec, ...]:
    """A linear layer: weight [out, in], and a bias [out] when the flag ``bias`` is set
    (``"always"``: always present; None: never)."""
    weight = _t(f"{module}.weight", out, inp)
    if bias is None:
        return (weight,)
    return (weight, _t(f"{module}.bias", out, when=None if bias == "always" else bias))


def _attention(bias: str | None = "attention_bias", qkv_bias: str | None = None) -> tuple[TensorSpec, ...]:
    qkv = qkv_bias or bias
    return (_linear("self_attn.q_proj", "q", "hidden", qkv) + _linear("self_attn.k_proj", "kv", "hidden", qkv)
            + _linear("self_attn.v_proj", "kv", "hidden", qkv) + _linear("self_attn.o_proj", "hidden", "q", bias))


def _swiglu(bias: str | None = "mlp_bias") -> tuple[TensorSpec, ...]:
    return (_linear("mlp.gate_proj", "inter", "hidden", bias) + _linear("mlp.up_proj", "inter", "hidden", bias)
            + _linear("mlp.down_proj", "hidden", "inter", bias))


_PRE_NORMS = (_t("input_layernorm.weight", "hidden"), _t("post_attention_layernorm.weight", "hidden"))
_LLAMA = _PRE_NORMS + _attention() + _swiglu()
_GEMMA_NORMS = _PRE_NORMS + (_t("pre_feedforward_layernorm.weight", "hidden"),
                             _t("post_feedforward_layernorm.weight", "hidden"))
_POST_NORMS = (_t("post_attention_layernorm.weight", "hidden"), _t("post_feedforward_layernorm.weight", "hidden"))
_PER_HEAD_QK_NORMS = (_t("self_attn.q_norm.weight", "head_dim"), _t("self_attn.k_norm.weight", "head_dim"))
_WHOLE_QK_NORMS = (_t("self_attn.q_norm.weight", "q"), _t("self_attn.k_norm.weight", "kv"))

# Config keys of the logit post-processing transformers applies after ``lm_head`` (any model
# type, MoE targets included): ``z = lm_head(h) * logit_scale / logits_scaling``, then
# ``cap * tanh(z / cap)`` with ``cap = final_logit_softcapping``. A loss or a composition that
# computes ``h @ W`` itself must apply them (:func:`logit_postprocessing`).
LOGIT_MULTIPLIER_KEYS = ("logit_scale",)
LOGIT_DIVISOR_KEYS = ("logits_scaling",)
LOGIT_SOFTCAP_KEYS = ("final_logit_softcapping",)


def logit_postprocessing(config: Mapping[str, Any]) -> tuple[float, float | None]:
    """``(scale, softcap)``: the model's logits are ``softcap(scale * h @ W.T)`` (softcap
    None: none). ``(1.0, None)`` for a plain ``lm_head``."""
    scale = 1.0
    for key in LOGIT_MULTIPLIER_KEYS:
        if config.get(key) is not None:
            scale *= float(config[key])
    for key in LOGIT_DIVISOR_KEYS:
        if config.get(key) is not None:
            scale /= float(config[key])
    cap = next((float(config[k]) for k in LOGIT_SOFTCAP_KEYS if config.get(k)), None)
    return scale, cap


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    causal_lm_class: str
    # every tensor of one decoder layer (with the flag that makes it present, for biases)
    tensors: tuple[TensorSpec, ...] = _LLAMA
    # modules whose output is added to the residual stream (see the module docstring)
    branch_ends: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    branch_ends_are_norms: bool = False
    # a norm computes x_hat * (norm_offset + weight): 0 for most, 1 for Gemma's (1 + w)
    norm_offset: float = 0.0
    mlp_projections: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    # the SwiGLU MLP as (gate, up, down) module names when stored as three matrices (what MoE
    # upcycling splits into experts); None for a fused gate_up (Phi-3) or a two-matrix MLP
    swiglu: tuple[str, str, str] | None = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    layer_prefix: str = "model.layers.{layer}."
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    # model tensors besides embed, final norm and head (a LayerNorm's bias)
    extra_tensors: tuple[TensorSpec, ...] = ()
    num_layers_key: str = "num_hidden_layers"
    # Config entries that hold one value per layer; surgeries that add or remove layers
    # must extend them consistently.
    per_layer_keys: tuple[str, ...] = ("layer_types", "no_rope_layers")
    # values of bias flags a config may omit (the class's default)
    flag_defaults: Mapping[str, bool] = field(default_factory=dict)
    # MoE upcycling (expand/moe_upcycle.py): stock targets for copies, in order of preference
    # (the method takes the first whose conditions hold), the fine-grained target, and why
    # there is none when a tuple is empty
    moe_copies: tuple[str, ...] = ()
    moe_fine_grained: str | None = None
    moe_refusal: str = ""
    notes: str = ""
    layer_tensors: tuple[str, ...] = field(init=False, compare=False)
    optional_layer_tensors: tuple[str, ...] = field(init=False, compare=False)
    _layer_re: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        prefix = re.escape(self.layer_prefix).replace(r"\{layer\}", r"(\d+)")
        object.__setattr__(self, "_layer_re", re.compile("^" + prefix + "(.+)$"))
        object.__setattr__(self, "layer_tensors", tuple(t.name for t in self.tensors if t.when is None))
        object.__setattr__(self, "optional_layer_tensors", tuple(t.name for t in self.tensors if t.when is not None))

    def layer_name(self, layer: int, relative: str) -> str:
        return self.layer_prefix.format(layer=layer) + relative

    def split_layer_name(self, name: str) -> tuple[int, str] | None:
        """``model.layers.3.mlp.up_proj.weight`` -> ``(3, "mlp.up_proj.weight")``; None for
        tensors outside the decoder layers."""
        m = self._layer_re.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    def num_layers(self, config: Mapping[str, Any]) -> int:
        return int(config[self.num_layers_key])

    def branch_end_offset(self, relative: str) -> float | None:
        """For a layer tensor that ends a residual branch: the value ``c`` such that its
        branch output is proportional to ``value + c`` (the norm offset for a post-norm's
        weight, 0 for a projection's weight or any bias); None for every other tensor. The
        identity init sets it to ``-c``; scaling the branch by ``s`` maps ``v`` to
        ``s (v + c) - c``."""
        module, _, leaf = relative.rpartition(".")
        if module not in self.branch_ends:
            return None
        return self.norm_offset if self.branch_ends_are_norms and leaf == "weight" else 0.0

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
        flags = {t.when for t in self.tensors + self.extra_tensors if t.when}
        values = {k: config.get(k, self.flag_defaults.get(k, False)) for k in flags}
        if any(not isinstance(v, bool) for v in values.values()):
            return None
        hidden, inter = config["hidden_size"], config["intermediate_size"]
        q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
        sizes = {"hidden": hidden, "inter": inter, "q": q, "kv": kv, "head_dim": head_dim, "qkv": q + 2 * kv,
                 "gate_up": 2 * inter, "vocab": config["vocab_size"]}

        def build(specs: tuple[TensorSpec, ...]) -> dict[str, tuple[int, ...]]:
            return {t.name: tuple(sizes[s] for s in t.shape) for t in specs if t.when is None or values[t.when]}

        layer = build(self.tensors)
        shapes = {self.layer_name(i, name): shape for i in range(self.num_layers(config)) for name, shape in layer.items()}
        shapes[self.embed] = (config["vocab_size"], hidden)
        shapes[self.final_norm] = (hidden,)
        shapes.update(build(self.extra_tensors))
        shapes[self.lm_head] = (config["vocab_size"], hidden)
        optional = {self.lm_head} if config.get("tie_word_embeddings", False) else set()
        return shapes, optional

    def layer_parameters(self, config: Mapping[str, Any]) -> int | None:
        """Parameters of one decoder layer (None where the config leaves a size to defaults)."""
        known = self.expected_shapes({**config, self.num_layers_key: 1})
        if known is None:
            return None
        return sum(math.prod(s) for n, s in known[0].items() if self.split_layer_name(n))


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    for existing in FAMILIES.values():
        clash = set(existing.model_types) & set(family.model_types)
        if family.name in FAMILIES or clash:
            raise ValueError(f"family {family.name!r} clashes with {existing.name!r}")
    FAMILIES[family.name] = family
    return family


_NO_MOE_TARGET = ("no stock transformers MoE class has {what}, so the experts could not be written as a class "
                  "transformers loads")

register_family(Family("llama", ("llama",), "LlamaForCausalLM", moe_copies=("mixtral", "qwen2_moe"),
                       moe_fine_grained="glm4_moe"))
register_family(
    Family(
        "mistral",
        ("mistral",),
        "MistralForCausalLM",
        tensors=_PRE_NORMS + _attention(bias=None) + _swiglu(bias=None),
        moe_copies=("mixtral", "qwen2_moe"),
        moe_fine_grained="glm4_moe",
        notes="sliding_window is one global value, not per layer",
    )
)
register_family(
    Family(
        "qwen2",
        ("qwen2",),
        "Qwen2ForCausalLM",
        tensors=_PRE_NORMS + _attention(bias=None, qkv_bias="always") + _swiglu(bias=None),
        moe_copies=("qwen2_moe",),
        moe_fine_grained="glm4_moe",
        notes="q/k/v projections carry biases; layer_types holds per-layer attention kind",
    )
)
register_family(
    Family(
        "qwen3",
        ("qwen3",),
        "Qwen3ForCausalLM",
        tensors=_PRE_NORMS + _attention() + _PER_HEAD_QK_NORMS + _swiglu(bias=None),
        moe_copies=("qwen3_moe",),
        moe_fine_grained="glm4_moe",
        notes="per-head RMSNorm on q and k",
    )
)
register_family(
    Family(
        "gemma2",
        ("gemma2",),
        "Gemma2ForCausalLM",
        tensors=_GEMMA_NORMS + _attention() + _swiglu(bias=None),
        branch_ends=("post_attention_layernorm", "post_feedforward_layernorm"),
        branch_ends_are_norms=True,
        norm_offset=1.0,
        moe_refusal=_NO_MOE_TARGET.format(what="Gemma-2's post-norms and (1 + w) RMSNorm"),
        notes="(1 + w) RMSNorm, post-norms after attention and MLP, embeddings scaled by sqrt(hidden), attention and "
              "final logit soft-capping, sliding/global layers in layer_types",
    )
)
register_family(
    Family(
        "gemma3_text",
        ("gemma3_text",),
        "Gemma3ForCausalLM",
        tensors=_GEMMA_NORMS + _attention() + _PER_HEAD_QK_NORMS + _swiglu(bias=None),
        branch_ends=("post_attention_layernorm", "post_feedforward_layernorm"),
        branch_ends_are_norms=True,
        norm_offset=1.0,
        moe_refusal=_NO_MOE_TARGET.format(what="Gemma-3's post-norms and (1 + w) RMSNorm"),
        notes="as gemma2, plus per-head (1 + w) q/k norms; sliding/global layers in layer_types",
    )
)
register_family(
    Family(
        "phi3",
        ("phi3",),
        "Phi3ForCausalLM",
        tensors=_PRE_NORMS + (_t("self_attn.qkv_proj.weight", "qkv", "hidden"), _t("self_attn.o_proj.weight", "hidden", "q"),
                              _t("mlp.gate_up_proj.weight", "gate_up", "hidden"), _t("mlp.down_proj.weight", "hidden", "inter")),
        mlp_projections=("mlp.gate_up_proj", "mlp.down_proj"),
        swiglu=None,
        moe_refusal="PhiMoE, the stock MoE class of the Phi family, normalizes with LayerNorm (mean-subtracted, with "
                    "bias) where Phi-3 uses RMSNorm, and routes with sparsemixer; no stock class computes a Phi-3 "
                    "layer with experts",
        notes="fused qkv_proj (q, k, v rows) and gate_up_proj (gate rows, then up rows)",
    )
)
_OLMO2 = dict(
    tensors=_POST_NORMS + _attention() + _WHOLE_QK_NORMS + _swiglu(bias=None),
    branch_ends=("post_attention_layernorm", "post_feedforward_layernorm"),
    branch_ends_are_norms=True,
    moe_refusal="OLMoE, the OLMo MoE class, is pre-norm where OLMo-2 puts its norms after attention and MLP; "
                + _NO_MOE_TARGET.format(what="OLMo-2's post-norms"),
)
register_family(Family("olmo2", ("olmo2",), "Olmo2ForCausalLM", **_OLMO2,
                       notes="norms after attention and MLP only (no pre-norm); q/k RMSNorm over the whole projection"))
register_family(Family("olmo3", ("olmo3",), "Olmo3ForCausalLM", **_OLMO2,
                       notes="as olmo2, plus sliding/global layers in layer_types"))
register_family(
    Family(
        "granite",
        ("granite",),
        "GraniteForCausalLM",
        moe_copies=("granitemoe",),
        notes="embedding, residual and attention multipliers; logits divided by logits_scaling",
    )
)
register_family(
    Family(
        "starcoder2",
        ("starcoder2",),
        "Starcoder2ForCausalLM",
        tensors=(_t("input_layernorm.weight", "hidden"), _t("input_layernorm.bias", "hidden"),
                 _t("post_attention_layernorm.weight", "hidden"), _t("post_attention_layernorm.bias", "hidden"))
        + _attention(bias="use_bias") + _linear("mlp.c_fc", "inter", "hidden", "use_bias")
        + _linear("mlp.c_proj", "hidden", "inter", "use_bias"),
        branch_ends=("self_attn.o_proj", "mlp.c_proj"),
        mlp_projections=("mlp.c_fc", "mlp.c_proj"),
        swiglu=None,
        extra_tensors=(_t("model.norm.bias", "hidden"),),
        flag_defaults={"use_bias": True},
        moe_refusal=_NO_MOE_TARGET.format(what="StarCoder2's two-matrix GELU MLP with biases and LayerNorm"),
        notes="LayerNorm with bias; two-matrix GELU MLP (c_fc, c_proj); every projection has a bias (use_bias)",
    )
)
register_family(
    Family(
        "smollm3",
        ("smollm3",),
        "SmolLM3ForCausalLM",
        moe_refusal=_NO_MOE_TARGET.format(what="SmolLM3's layers without rotary positions (no_rope_layers)"),
        notes="Llama tensors; no_rope_layers says per layer whether it rotates positions",
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
    from lmexpand.compose.kinds import is_composed_config  # (the declarations: data every layer may read)

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
