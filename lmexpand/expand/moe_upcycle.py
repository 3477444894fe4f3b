"""MoE upcycling: dense FFNs become experts, exactly, in classes stock transformers loads.

Two styles.

**Copies** (sparse upcycling, Komatsuzaki et al. 2022; Mixtral's layout): each chosen
layer's FFN becomes E identical experts and a router picks top-k of them per token. The
top-k weights are renormalized to sum to 1, and every expert computes the same function,
so the layer computes exactly the dense FFN whatever the router holds (zero, random,
or hidden-state init); only rounding differs. Targets: ``MixtralForCausalLM`` for Llama and
Mistral sources when every layer is upcycled (Mixtral has no dense layers);
``Qwen2MoeForCausalLM`` for Qwen2 sources (q/k/v biases) and for a subset of layers
(``mlp_only_layers`` keeps the rest dense; its always-present shared expert gets a single
unit whose output projection is zero, so it adds exactly nothing); ``Qwen3MoeForCausalLM``
for Qwen3 sources (q/k norms); ``GraniteMoeForCausalLM`` for Granite sources (every layer; the
multipliers carried over). Which targets a family has is family data (``Family.moe_copies``);
a family without one is refused with the reason (``Family.moe_refusal``).

**Fine-grained + shared** (DeepSeekMoE, arXiv 2401.06066): the FFN's intermediate
dimension I is split into M segments of I/M units. The first S segments form the shared
expert (always on); each of the other M - S segments is replicated R times as routed
experts: E = (M - S) R, top-k = M - S. Written as ``Glm4MoeForCausalLM``: with a zero
router every sigmoid score is 0.5, a correction bias of ``bias_gap`` on replica 0 of each
segment makes the top-k pick exactly one replica of every segment, and each routing
weight is 0.5 / (0.5 (M - S)) x ``routed_scaling_factor`` (M - S) = 1 (normalized top-k
weights, so a uniform drift of the scores in training cancels), so shared + routed sum to the dense
FFN (a SwiGLU FFN is a sum over its intermediate units). Glm4Moe keeps the first
``first_k_dense_replace`` layers dense, so the upcycled layers must be a suffix.
See ../shared/notes/moe-stock-targets.md for how these targets were found.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from lmexpand.checkpoint.families import Family
from lmexpand.checkpoint.limits import MAX_EXPERTS
from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.errors import ConfigError
from lmexpand.expand.layer_spec import parse_layer_spec, select_layers
from lmexpand.expand.plan import Concat, Const, NewInit, Noise, Op, Plan, Read, Slice, Stack, TensorPlan, Zeros
from lmexpand.expand.registry import MethodConfig, comma_list, names_matching, register_method

log = logging.getLogger("lmexpand")

# a few fixed, varied prompts for router_init=hidden (no data file needed)
HIDDEN_PROMPTS = (
    "The mitochondria is the powerhouse of the cell, producing ATP through oxidative phosphorylation.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "In 1815 the Congress of Vienna redrew the map of Europe after the defeat of Napoleon.",
    "Dear Sir, I write to inform you that your order has been shipped and will arrive on Monday.",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 10 ORDER BY 2 DESC;",
    "The integral of x squared from zero to three equals nine, by the fundamental theorem of calculus.",
    "Il pleuvait sur la ville, et les passants se hâtaient sous leurs parapluies noirs.",
)


class MoeConfig(MethodConfig):
    experts: int | None = Field(None, ge=2, le=MAX_EXPERTS,
                                description="Copies style: number of experts E per upcycled layer.")
    top_k: int | None = Field(
        None, gt=0, description="Experts per token (copies: default 2; fine-grained: default M-S, "
        "other values are not exact at init).",
    )
    segments: int | None = Field(
        None, ge=2, le=MAX_EXPERTS,
        description="Fine-grained style: split the FFN's intermediate dimension into M segments."
    )
    shared: int = Field(1, ge=1, description="Fine-grained: segments S that form the always-on shared expert.")
    replicas: int = Field(2, ge=1, le=MAX_EXPERTS,
                          description="Fine-grained: copies R of each routed segment (E = (M-S)*R).")
    layers: str = Field(
        "all", description="Layers to upcycle: 'all', 'every:N' (layers N-1, 2N-1, ...) or a list 3,4,5."
    )
    router_init: Literal["zero", "random", "hidden"] = Field(
        "zero", description="Copies style: router weights zero, small random (--router-std), or from the "
        "base model's hidden states on built-in prompts. Fine-grained routers are zero (exactness).",
    )
    router_std: float = Field(0.02, gt=0, description="Std of random router weights (and norm scale for hidden).")
    noise: float = Field(
        0.0, ge=0, description="Std of Gaussian noise added to every expert but the first (copies) or to "
        "replicas other than the first (fine-grained). Breaks exactness: the delta is printed.",
    )
    bias_gap: float = Field(
        1e-3, gt=0, description="Fine-grained: correction bias on replica 0 of each segment (small, so "
        "balancing can move load to the other replicas).",
    )
    trainable: list[str] = Field(
        default_factory=lambda: ["experts"],
        description="What trains afterwards: 'experts' (experts, shared experts and routers of upcycled "
        "layers), 'all', or comma-separated globs.",
    )
    seed: int = Field(0, description="Seed for random routers and noise.")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str) -> str:
        return parse_layer_spec(v, "write 'all', 'every:N' or a list of 0-based layer indices like 3,4,5",
                                every_zero="every:N needs N >= 1")

    @field_validator("trainable", mode="before")
    @classmethod
    def _parse_trainable(cls, v: Any) -> Any:
        return comma_list(v, "'experts', 'all' or globs")

    @model_validator(mode="after")
    def _check(self) -> "MoeConfig":
        if (self.experts is None) == (self.segments is None):
            raise ValueError("give exactly one of --experts E (copies, Mixtral-style) or --segments M "
                             "(fine-grained + shared, DeepSeekMoE-style)")
        if self.experts is not None:
            k = self.top_k or 2
            if self.experts < k:
                raise ValueError(f"--experts {self.experts} is below --top-k {k}: a token cannot use more "
                                 "experts than there are")
        else:
            assert self.segments is not None
            if self.shared >= self.segments:
                raise ValueError(f"--shared {self.shared} must be below --segments {self.segments}: at least one "
                                 "segment must be routed")
            n_routed = (self.segments - self.shared) * self.replicas
            if n_routed > MAX_EXPERTS:
                raise ValueError(f"(M-S)*R = ({self.segments}-{self.shared})*{self.replicas} = {n_routed:,} routed experts "
                                 f"per layer; at most {MAX_EXPERTS:,} are accepted. Lower --segments or --replicas")
            if n_routed < 2:
                raise ValueError(f"(M-S)*R = ({self.segments}-{self.shared})*{self.replicas} = {n_routed} routed expert; "
                                 "Glm4MoeForCausalLM's router needs at least 2 (it ranks the top 2 per group): raise "
                                 "--replicas or --segments")
            if self.top_k is not None and self.top_k > n_routed:
                raise ValueError(f"--top-k {self.top_k} is above the {n_routed} routed experts "
                                 f"((M-S)*R = ({self.segments}-{self.shared})*{self.replicas})")
            if self.router_init != "zero":
                raise ValueError("fine-grained routers start at zero (exactness needs the sigmoid ties); "
                                 "--router-init applies to --experts only")
        return self

    @property
    def fine_grained(self) -> bool:
        return self.segments is not None

    @property
    def k(self) -> int:
        if self.fine_grained:
            assert self.segments is not None
            return self.top_k or (self.segments - self.shared)
        return self.top_k or 2

    @property
    def num_experts(self) -> int:
        if self.fine_grained:
            assert self.segments is not None
            return (self.segments - self.shared) * self.replicas
        assert self.experts is not None
        return self.experts


def _target(family: Family, cfg: MoeConfig, layers: list[int], num_layers: int, reader: CheckpointReader) -> str:
    """The stock class the upcycled model is written as: the family's first MoE target
    (``Family.moe_copies`` / ``moe_fine_grained``) whose structure holds this source."""
    config = reader.config
    if family.swiglu is None or not (family.moe_copies or family.moe_fine_grained):
        raise ConfigError(f"{family.name} models cannot be upcycled: {family.moe_refusal or 'no stock MoE target'}.")
    if config.get("mlp_bias"):
        raise ConfigError("the source's MLPs have biases (mlp_bias: true); no stock MoE class holds expert biases.")
    all_layers = len(layers) == num_layers
    # a window over every layer: only Mixtral holds one (Qwen2-MoE/Glm4-MoE attend globally)
    sliding = bool(config.get("sliding_window")) and not isinstance(config.get("layer_types"), list) \
        and config.get("use_sliding_window", True) is not False
    if cfg.fine_grained:
        if family.moe_fine_grained is None:
            raise ConfigError(f"--segments: no stock class holds fine-grained experts for {family.name} models "
                              f"({', '.join(_CLASS[t] for t in family.moe_copies)} routes copies only); use --experts.")
        if layers != list(range(num_layers - len(layers), num_layers)):
            raise ConfigError(
                f"--layers {cfg.layers}: Glm4MoeForCausalLM keeps only the first layers dense "
                f"(first_k_dense_replace), so fine-grained upcycling needs a suffix of layers, e.g. "
                f"{num_layers // 2},...,{num_layers - 1} or all; got {layers}."
            )
        if sliding:
            raise ConfigError("this Mistral source uses a sliding window, which Glm4MoeForCausalLM does not have.")
        return family.moe_fine_grained
    qkv_bias = family.layer_name(0, "self_attn.q_proj.bias") in reader
    if family.layer_name(0, "self_attn.o_proj.bias") in reader:
        targets = [t for t in family.moe_copies if t in _ATTENTION_BIAS]
        if cfg.fine_grained or not targets:
            raise ConfigError("the source's attention output projection has a bias; the stock MoE classes this "
                              f"{family.name} model could become have none.")
    for target in family.moe_copies:
        if target in _ALL_LAYERS_ONLY and not all_layers:
            continue
        if target == "mixtral" and qkv_bias:
            continue
        if family.layer_name(0, "self_attn.o_proj.bias") in reader and target not in _ATTENTION_BIAS:
            continue
        if sliding and target != "mixtral":
            continue
        return target
    if sliding:
        raise ConfigError("this Mistral source uses a sliding window: only MixtralForCausalLM holds it, and Mixtral "
                          "has no dense layers; use --layers all.")
    names = " / ".join(_CLASS[t] for t in family.moe_copies)
    raise ConfigError(f"--layers {cfg.layers}: {names} has no dense layers, so every layer of a {family.name} model must "
                      "be upcycled; use --layers all.")


# targets whose attention projections all take a bias from attention_bias (o_proj's too)
_ATTENTION_BIAS = ("granitemoe", "qwen3_moe")
# targets whose every layer is a MoE layer (no mlp_only_layers / first_k_dense_replace)
_ALL_LAYERS_ONLY = ("mixtral", "granitemoe")
# config keys a target class takes over from the source as they are (multipliers that matter
# for the function: Granite's embedding, residual, attention and logit scales)
_CARRIED = {"granitemoe": ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")}


def _base_config(config: dict[str, Any]) -> dict[str, Any]:
    """The source config as transformers standardizes it (rope_parameters, head_dim)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    std = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config)).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "dtype", "rope_parameters")
    out = {k: std[k] for k in keep if k in std}
    out["head_dim"] = std.get("head_dim") or std["hidden_size"] // std["num_attention_heads"]
    return out


def _target_config(target: str, src: dict[str, Any], reader: CheckpointReader, cfg: MoeConfig, layers: list[int],
                   num_layers: int) -> dict[str, Any]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fam = reader.family
    assert fam is not None
    # structural facts of the source, from its tensors: q/k/v biases, per-head q/k norms
    qkv_bias = fam.layer_name(0, "self_attn.q_proj.bias") in reader
    qk_norm = fam.layer_name(0, "self_attn.q_norm.weight") in reader
    base = _base_config(src)
    inter = base["intermediate_size"]
    E, k = cfg.num_experts, cfg.k
    dense = [i for i in range(num_layers) if i not in layers]
    if target == "mixtral":
        kw = dict(num_local_experts=E, num_experts_per_tok=k, sliding_window=src.get("sliding_window"))
    elif target == "qwen2_moe":
        kw = dict(num_experts=E, num_experts_per_tok=k, moe_intermediate_size=inter, shared_expert_intermediate_size=1,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=dense, qkv_bias=qkv_bias,
                  use_sliding_window=False)
    elif target == "qwen3_moe":
        kw = dict(num_experts=E, num_experts_per_tok=k, moe_intermediate_size=inter, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=dense, attention_bias=bool(src.get("attention_bias")),
                  use_sliding_window=False)
    elif target == "granitemoe":
        kw = dict(num_local_experts=E, num_experts_per_tok=k, attention_bias=bool(src.get("attention_bias")),
                  **{key: src[key] for key in _CARRIED[target] if key in src})
    else:  # glm4_moe
        assert cfg.segments is not None
        rope = dict(base.get("rope_parameters") or {})
        rope["partial_rotary_factor"] = 1.0  # the class default (0.5) would rotate half of each head
        base["rope_parameters"] = rope
        n_routed_segments = cfg.segments - cfg.shared
        # Normalized top-k weights times (M - S): each weight is exactly 1 while the scores are
        # tied, and a drift of all scores together (routers move fast under Adam) cancels out,
        # unlike sigmoid(0) x 2, which scales every expert with the drift.
        kw = dict(moe_intermediate_size=inter // cfg.segments, n_shared_experts=cfg.shared, n_routed_experts=E,
                  num_experts_per_tok=k, n_group=1, topk_group=1, first_k_dense_replace=len(dense),
                  norm_topk_prob=True, routed_scaling_factor=float(n_routed_segments),
                  attention_bias=qkv_bias, use_qk_norm=qk_norm, num_nextn_predict_layers=0)
    out = CONFIG_MAPPING[target](**base, **kw).to_dict()
    out["architectures"] = [_CLASS[target]]
    return out


_CLASS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
          "glm4_moe": "Glm4MoeForCausalLM", "granitemoe": "GraniteMoeForCausalLM"}


_PREFIX = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp", "glm4_moe": "mlp",
           "granitemoe": "block_sparse_moe"}
# expert tensor names per target: gate (SwiGLU gate), up, down
_EXPERT = {
    "mixtral": ("experts.{e}.w1.weight", "experts.{e}.w3.weight", "experts.{e}.w2.weight"),
    "qwen2_moe": ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight", "experts.{e}.down_proj.weight"),
}
_EXPERT["qwen3_moe"] = _EXPERT["glm4_moe"] = _EXPERT["qwen2_moe"]


@register_method(
    "moe",
    config=MoeConfig,
    summary="MoE upcycling: FFN -> experts + router (copies, or fine-grained + shared).",
    help="""Turn dense FFNs into mixtures of experts, exactly at init, written as stock
transformers classes: Mixtral / Qwen2-MoE / Qwen3-MoE for copies (--experts E --top-k K),
Glm4-MoE for DeepSeekMoE-style fine-grained + shared experts (--segments M --shared S
--replicas R). Only experts and routers are listed as trainable.

\b
Examples:
  lmexpand surgery moe smollm2-135m out/mix --experts 8 --top-k 2
  lmexpand surgery moe smollm2-135m out/fg --segments 8 --shared 2 --replicas 4
  lmexpand surgery moe smollm2-135m out/half --experts 4 --layers every:2 --router-init hidden
  lmexpand surgery moe smollm2-135m out/fg --segments 4 --dry-run""",
)
def plan_moe(readers: Sequence[CheckpointReader], cfg: MoeConfig) -> Plan:
    (reader,) = readers
    family = reader.family
    assert family is not None
    L = reader.num_layers
    layers = select_layers(cfg.layers, L, name="--layers")
    inter = int(reader.config["intermediate_size"])
    if cfg.fine_grained:
        assert cfg.segments is not None
        if inter % cfg.segments:
            divisors = [d for d in range(2, min(inter, 256) + 1) if inter % d == 0]
            raise ConfigError(f"--segments {cfg.segments} does not divide the intermediate size {inter}; "
                              f"values that do: {', '.join(map(str, divisors))}.")
    target = _target(family, cfg, layers, L, reader)
    config = _target_config(target, reader.config, reader, cfg, layers, L)
    E, k = cfg.num_experts, cfg.k
    routers = _hidden_routers(reader, cfg, layers) if cfg.router_init == "hidden" else {}

    tensors: list[TensorPlan] = []
    new: list[str] = []
    moe_prefix = _PREFIX[target]
    for t in reader:
        split = family.split_layer_name(t.name)
        if split is None:
            tensors.append(TensorPlan(t.name, t.dtype, t.shape, Read(t.name)))
            continue
        layer, rel = split
        if layer in layers and rel.startswith("mlp."):
            continue  # replaced below
        tensors.append(TensorPlan(t.name, t.dtype, t.shape, Read(t.name)))
    for layer in layers:
        p = family.layer_name(layer, f"{moe_prefix}.")
        assert family.swiglu is not None  # (_target refuses the others)
        g, u, d = (reader.info(family.layer_name(layer, f"{module}.weight")) for module in family.swiglu)
        dtype, H = g.dtype, g.shape[1]
        out: list[TensorPlan] = []
        if target == "granitemoe":
            # the layout of Granite-MoE files (transformers 4.x and the Hub; 5.x renames on load):
            # experts stacked, gate rows then up rows in input_linear, routers in router.layer
            out.append(TensorPlan(p + "router.layer.weight", dtype, (E, H), _router_op(cfg, layer, E, H, routers)))
            gate_up = [Concat((_expert_op(cfg, layer, e, g, 0), _expert_op(cfg, layer, e, u, 1)), 0) for e in range(E)]
            out.append(TensorPlan(p + "input_linear.weight", dtype, (E, 2 * g.shape[0], H), Stack(tuple(gate_up))))
            out.append(TensorPlan(p + "output_linear.weight", dtype, (E, *d.shape),
                                  Stack(tuple(_expert_op(cfg, layer, e, d, 2) for e in range(E)))))
        elif not cfg.fine_grained:
            out.append(TensorPlan(p + "gate.weight", dtype, (E, H), _router_op(cfg, layer, E, H, routers)))
            for e in range(E):
                for i, (name, src) in enumerate(zip(_EXPERT[target], (g, u, d))):
                    out.append(TensorPlan(p + name.format(e=e), dtype, src.shape, _expert_op(cfg, layer, e, src, i)))
            if target == "qwen2_moe":
                # the class always has a shared expert: one unit, output projection zero -> adds exactly 0
                out += [
                    TensorPlan(p + "shared_expert.gate_proj.weight", dtype, (1, H), NewInit(cfg.router_std, cfg.seed + layer)),
                    TensorPlan(p + "shared_expert.up_proj.weight", dtype, (1, H), NewInit(cfg.router_std, cfg.seed + layer + 7)),
                    TensorPlan(p + "shared_expert.down_proj.weight", dtype, (H, 1), Zeros()),
                    TensorPlan(p + "shared_expert_gate.weight", dtype, (1, H), Zeros()),
                ]
        else:
            assert cfg.segments is not None
            sz, S, R = inter // cfg.segments, cfg.shared, cfg.replicas
            out += [
                TensorPlan(p + "shared_experts.gate_proj.weight", dtype, (S * sz, H), Slice(Read(g.name), 0, 0, S * sz)),
                TensorPlan(p + "shared_experts.up_proj.weight", dtype, (S * sz, H), Slice(Read(u.name), 0, 0, S * sz)),
                TensorPlan(p + "shared_experts.down_proj.weight", dtype, (H, S * sz), Slice(Read(d.name), 1, 0, S * sz)),
                TensorPlan(p + "gate.weight", dtype, (E, H), Zeros()),
            ]
            for e in range(E):
                j, rho = S + e // R, e % R
                for name, src, dim in zip(_EXPERT[target], (g, u, d), (0, 0, 1)):
                    op = Slice(Read(src.name), dim, j * sz, (j + 1) * sz)
                    if cfg.noise and rho > 0:
                        op = Noise(op, cfg.noise, seed=cfg.seed * 1_000_003 + layer * 1009 + e * 3 + dim + (src is u))
                    shape = (sz, H) if dim == 0 else (H, sz)
                    out.append(TensorPlan(p + name.format(e=e), dtype, shape, op))
            bias = [cfg.bias_gap if e % R == 0 else 0.0 for e in range(E)]
            out.append(TensorPlan(p + "gate.e_score_correction_bias", "F32", (E,), _const(bias, "correction bias")))
        tensors += out
        new += [t.name for t in out if not t.name.endswith("e_score_correction_bias")]  # a buffer, not trained

    trainable = _trainable(cfg.trainable, tensors, new)
    exact = cfg.noise == 0 and (not cfg.fine_grained or k == (cfg.segments or 0) - cfg.shared)
    notes = [f"target class {_CLASS[target]}: {len(layers)} of {L} layers upcycled "
             f"({_ranges(layers)}), {E} routed experts, top-{k}"]
    if target == "qwen2_moe":
        notes.append("Qwen2MoE always has a shared expert: it gets 1 unit whose output projection is zero (adds nothing)")
    if not exact:
        notes.append("not exact at init (" + ", ".join(
            (["expert noise"] if cfg.noise else []) + (["top-k != M-S"] if cfg.fine_grained and k != (cfg.segments or 0) - cfg.shared else [])
        ) + "): the surgery prints max |dlogit| vs the source")
    layer_map = list(range(L))  # layers keep their place; the upcycled ones are in the notes and lineage
    return Plan(
        method="moe",
        arguments=cfg.model_dump(mode="json"),
        sources=[reader.path],
        config=config,
        tensors=tensors,
        new_parameters=trainable,
        function_preserving=exact,
        check_delta=not exact,
        layer_map=layer_map,
        notes=notes,
        extra_lineage={
            "trainable_default": "new_parameters",
            "moe": {"style": "fine-grained" if cfg.fine_grained else "copies", "target": target,
                    "layers": layers, "num_experts": E, "top_k": k,
                    **({"segments": cfg.segments, "shared": cfg.shared, "replicas": cfg.replicas,
                        "bias_gap": cfg.bias_gap} if cfg.fine_grained else {"router_init": cfg.router_init})},
        },
    )


def _expert_op(cfg: MoeConfig, layer: int, e: int, src: Any, which: int) -> Op:
    """Expert ``e``'s copy of the dense matrix ``src`` (which: 0 gate, 1 up, 2 down), with the
    optional noise on every expert but the first."""
    op: Op = Read(src.name)
    if cfg.noise and e > 0:
        op = Noise(op, cfg.noise, seed=cfg.seed * 1_000_003 + layer * 1009 + e * 3 + which)
    return op


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def _const(values: list[float], what: str) -> Const:
    import torch

    return Const(torch.tensor(values, dtype=torch.float32), what)


def _router_op(cfg: MoeConfig, layer: int, E: int, H: int, routers: dict[int, Any]) -> Op:
    if cfg.router_init == "zero":
        return Zeros()
    if cfg.router_init == "random":
        return NewInit(cfg.router_std, seed=cfg.seed * 7919 + layer)
    return Const(routers[layer], f"router from hidden states (layer {layer})")


def _hidden_routers(reader: CheckpointReader, cfg: MoeConfig, layers: list[int]) -> dict[int, Any]:
    """Router rows from the base model's MLP inputs on built-in prompts: for each layer, E
    token states chosen far apart (farthest-point sampling from a seeded start), scaled to
    the norm a random row of std ``router_std`` would have."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(reader.path)
    except Exception as e:  # noqa: BLE001 - any tokenizer problem means the same thing here
        raise ConfigError(f"--router-init hidden needs the source's tokenizer ({reader.path}): {e}") from None
    model = AutoModelForCausalLM.from_pretrained(reader.path, dtype=torch.float32).eval()
    states: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [model.model.layers[i].post_attention_layernorm.register_forward_hook(
        lambda mod, inp, out, i=i: states[i].append(out.detach().reshape(-1, out.shape[-1]))) for i in layers]
    with torch.no_grad():
        for text in HIDDEN_PROMPTS:
            model(**tok(text, return_tensors="pt"))
    for h in hooks:
        h.remove()
    E = cfg.num_experts
    gen = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for i in layers:
        x = torch.nn.functional.normalize(torch.cat(states[i]), dim=-1)
        if x.shape[0] < E:
            raise ConfigError(f"--router-init hidden: the built-in prompts give {x.shape[0]} tokens, fewer than {E} experts.")
        picked = [int(torch.randint(x.shape[0], (1,), generator=gen))]
        dist = 1 - x @ x[picked[0]]
        for _ in range(E - 1):
            picked.append(int(dist.argmax()))
            dist = torch.minimum(dist, 1 - x @ x[picked[-1]])
        out[i] = x[picked] * (cfg.router_std * x.shape[1] ** 0.5)
    del model
    return out


def _trainable(choice: list[str], tensors: list[TensorPlan], new: list[str]) -> list[str]:
    if choice == ["experts"]:
        return new
    names = [t.name for t in tensors if not t.name.endswith("e_score_correction_bias")]
    return names if choice == ["all"] else names_matching(names, choice)
