"""Compositions at the output: a weighted sum of members' logits (one mechanism, three
published methods; the model is :mod:`lmexpand.compose.logits_modeling`).

- ``logit-sum`` (yuyijiong/Combined_LLM): ``z = Σ w_i·z_i`` over 2+ members of any
  family and size that share a tokenizer; only the members' LM heads train. The official
  code trains one head ``[W_1 | W_2]`` over the concatenated hidden states, the same sum.
  A member that ties its head to its input embedding (SmolLM2) gets an untied fp32 copy,
  so training never moves an embedding; the surgery writes only these head copies.
- ``proxy-tune`` (Liu et al. 2024, arXiv 2401.08565): ``z = z_base + α·(z_expert −
  z_anti)``, α = 1 by default; a small tuned/untuned pair steers a large base model.
- ``contrastive`` (O'Brien & Lewis 2023, arXiv 2309.09117): ``(1+β)·z_expert − β·z_amateur``
  where ``z_expert ≥ log α + max z_expert``, −inf elsewhere; β = 0.5, α = 0.1 as in the paper.
  β = 0 is greedy decoding of the expert.

Proxy-tuning and contrastive decoding have no trainable parameters: the surgery writes
only the composition (config, references to the members by path and fingerprint, the
tokenizer). Members must map text to the same ids; vocabularies that differ only by
padding rows are cut to the common prefix.
"""

from __future__ import annotations

from typing import Any, Sequence

from pydantic import Field, field_validator

from lmexpand.checkpoint.limits import MAX_LOGIT_WEIGHT
from lmexpand.checkpoint.families import (LOGIT_DIVISOR_KEYS, LOGIT_MULTIPLIER_KEYS, LOGIT_SOFTCAP_KEYS,
                                          logit_postprocessing)
from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.checkpoint.tokenizer import shared_token_ids
from lmexpand.compose.kinds.logits import KIND
from lmexpand.errors import ConfigError
from lmexpand.expand.plan import Plan, Read, TensorPlan
from lmexpand.expand.registry import MethodConfig, comma_list, register_method



class LogitSumConfig(MethodConfig):
    weights: list[float] | None = Field(
        None, description="One weight per model, comma-separated (e.g. 1,1); z = sum of weight x logits.  "
        "[default: 1 each]")

    @field_validator("weights", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return comma_list(v, "one number per model, e.g. 1,1")

    @field_validator("weights")
    @classmethod
    def _bounded(cls, v: list[float] | None) -> list[float] | None:
        for w in v or []:
            if abs(w) > MAX_LOGIT_WEIGHT:
                raise ValueError(f"weight {w:g} is beyond +-{MAX_LOGIT_WEIGHT:g}: the weighted logits would overflow "
                                 "(the method uses weights near 1)")
        return v


class ProxyTuneConfig(MethodConfig):
    alpha: float = Field(1.0, ge=0, le=MAX_LOGIT_WEIGHT, description="Strength of the steering: z = z_base + alpha x (z_expert - z_anti); "
                         "0 is the base model.")


class ContrastiveConfig(MethodConfig):
    beta: float = Field(0.5, ge=0, le=MAX_LOGIT_WEIGHT, description="Contrast strength: (1+beta) x z_expert - beta x z_amateur; 0 is the "
                        "expert alone.")
    alpha: float = Field(0.1, gt=0, le=1, description="Plausibility: only tokens with p_expert >= alpha x max p_expert "
                         "are candidates (0 < alpha <= 1).")


def _check_members(readers: Sequence[CheckpointReader], roles: list[str]) -> tuple[int, list[str]]:
    """The common vocabulary size and notes; refuses tokenizers that differ and vocabularies
    that differ beyond padding (a composed member is refused when its source is opened)."""
    n_ids = shared_token_ids([(role, r.path) for r, role in zip(readers, roles)])
    sizes = [int(r.config["vocab_size"]) for r in readers]
    common = min(sizes)
    notes = []
    if n_ids > common:
        small = roles[sizes.index(common)]
        raise ConfigError(f"the members' vocabularies differ beyond padding: their tokenizer uses ids up to "
                          f"{n_ids - 1:,} but {small} {readers[sizes.index(common)].path} has only {common:,} rows "
                          f"(vocab_size {', '.join(f'{s:,}' for s in sizes)}). Compose models with the same "
                          "vocabulary.")
    if len(set(sizes)) > 1:
        notes.append(f"vocab_size differs ({', '.join(f'{role} {s:,}' for role, s in zip(roles, sizes))}): the "
                     f"composition uses the common first {common:,} rows (the tokenizer uses {n_ids:,} ids; the rest "
                     "are padding)")
    return common, notes


def _head_source(reader: CheckpointReader) -> str:
    """The tensor a member computes its logits with: its LM head, or its input embedding
    when the two are tied and only the embedding is stored."""
    fam = reader.family
    if fam.lm_head in reader:
        return fam.lm_head
    if fam.embed in reader:
        return fam.embed
    raise ConfigError(f"{reader.path}: neither {fam.lm_head} nor {fam.embed} is stored; cannot find its LM head.")


def plan_composition(readers: Sequence[CheckpointReader], *, method: str, arguments: dict[str, Any],
                     roles: list[str], weights: list[float], trained_heads: bool = False,
                     plausibility: dict[str, Any] | None = None) -> Plan:
    common, notes = _check_members(readers, roles)
    tensors: list[TensorPlan] = []
    if trained_heads:
        for i, (r, role) in enumerate(zip(readers, roles)):
            # families whose logits are not a plain `lm_head(h)` (soft-capping, scaling): the logit
            # sum's training loss computes `[W_1|W_2]·[h_1;h_2]`, which would skip them
            if logit_postprocessing(r.config) != (1.0, None):
                keys = [k for k in LOGIT_MULTIPLIER_KEYS + LOGIT_DIVISOR_KEYS + LOGIT_SOFTCAP_KEYS if r.config.get(k)]
                raise ConfigError(f"{role} {r.path}: its logits are post-processed ("
                                  + ", ".join(f"{k} = {r.config[k]}" for k in keys) + "); a logit sum trains plain "
                                  "heads (z = W·h) and would change them. Use members without logit softcapping or "
                                  "scaling (proxy-tune and contrastive take any member).")
            src = _head_source(r)
            shape = tuple(r.info(src).shape)
            tensors.append(TensorPlan(f"members.{i}.lm_head.weight", "F32", shape, Read(src, model=i)))
            if src != r.family.lm_head:
                notes.append(f"{role} ties its head to its input embedding: the composition trains an untied copy "
                             "(the embedding never moves)")
    first = readers[0].config
    config = {
        "model_type": KIND.model_type,
        "architectures": [KIND.model_class],
        "method": method,
        "members": [dict(r.config) for r in readers],
        "member_paths": [str(r.path.resolve()) for r in readers],
        "roles": roles,
        "weights": [float(w) for w in weights],
        "trained_heads": trained_heads,
        "plausibility": plausibility,
        "vocab_size": common,
        "hidden_size": first.get("hidden_size"),
        "num_hidden_layers": first.get("num_hidden_layers"),
        "max_position_embeddings": min(int(r.config.get("max_position_embeddings") or 10**9) for r in readers),
        "bos_token_id": first.get("bos_token_id"),
        "eos_token_id": first.get("eos_token_id"),
        "pad_token_id": first.get("pad_token_id"),
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    formula = " + ".join(f"{w:g}·z({role})" for w, role in zip(weights, roles)).replace("+ -", "- ")
    notes.append(f"logits = {formula}" + (f", tokens with z({roles[plausibility['member']]}) < log({plausibility['alpha']:g}) "
                                          "+ max masked" if plausibility else ""))
    return Plan(
        method=method,
        arguments=arguments,
        sources=[r.path for r in readers],
        config=config,
        tensors=tensors,
        new_parameters=[t.name for t in tensors],
        function_preserving=False,
        notes=notes,
        extra_lineage={"trainable_default": "new_parameters",
                       "composition": {"roles": roles, "weights": config["weights"], "plausibility": plausibility}},
    )


@register_method(
    "logit-sum",
    config=LogitSumConfig,
    sources=("MODEL", "MODEL"),
    variadic=True,
    summary="Sum two or more models' logits; only their LM heads train.",
    help="""Compose 2+ models that share a tokenizer by summing their next-token logits
(z = w1*z1 + w2*z2 + ...; a product of experts). Members may have any architecture and
size. Only each member's LM head trains (`lmexpand train` with the default trainable
set); a member that ties its head to its input embedding gets an untied copy. OUT holds
the heads and references to the members; `lmexpand export` makes it self-contained.

\b
Examples:
  lmexpand surgery logit-sum ./math ./chat out/sum
  lmexpand surgery logit-sum ./a ./b ./c out/sum --weights 1,0.5,0.5""",
)
def plan_logit_sum(readers: Sequence[CheckpointReader], cfg: LogitSumConfig) -> Plan:
    if len(readers) < 2:
        raise ConfigError(f"logit-sum needs at least two models; got {len(readers)}. Name every member, then OUT: "
                          "`lmexpand surgery logit-sum A B OUT`.")
    weights = cfg.weights or [1.0] * len(readers)
    if len(weights) != len(readers):
        raise ConfigError(f"--weights {','.join(f'{w:g}' for w in weights)}: {len(weights)} weights for "
                          f"{len(readers)} models; give one per model, in order.")
    roles = [f"member {i}" for i in range(len(readers))]
    return plan_composition(readers, method="logit-sum", arguments=cfg.model_dump(mode="json"), roles=roles,
                            weights=weights, trained_heads=True)


@register_method(
    "proxy-tune",
    config=ProxyTuneConfig,
    sources=("BASE", "EXPERT", "ANTI"),
    summary="Proxy-tuning: steer a base model by a tuned/untuned pair (no training).",
    help="""Proxy-tuning (Liu et al. 2024): z = z_base + alpha * (z_expert - z_anti), where
EXPERT is a (small) tuned model and ANTI the same model before tuning. The base's weights
are never touched; nothing trains. All three must share a tokenizer.

\b
Example:
  lmexpand surgery proxy-tune ./large ./small-math ./small out/proxy --alpha 1""",
)
def plan_proxy_tune(readers: Sequence[CheckpointReader], cfg: ProxyTuneConfig) -> Plan:
    return plan_composition(readers, method="proxy-tune", arguments=cfg.model_dump(mode="json"),
                            roles=["base", "expert", "anti-expert"], weights=[1.0, cfg.alpha, -cfg.alpha])


@register_method(
    "contrastive",
    config=ContrastiveConfig,
    sources=("EXPERT", "AMATEUR"),
    summary="Contrastive decoding: expert minus amateur over the expert's plausible tokens.",
    help="""Contrastive decoding (Li et al. 2023; O'Brien & Lewis 2023): logits
(1+beta) * z_expert - beta * z_amateur over the tokens with p_expert >= alpha * max p_expert
(the rest get -inf). AMATEUR is a smaller or weaker model with the same tokenizer. beta = 0
is the expert alone. Nothing trains.

\b
Example:
  lmexpand surgery contrastive ./large ./small out/cd --beta 0.5 --alpha 0.1""",
)
def plan_contrastive(readers: Sequence[CheckpointReader], cfg: ContrastiveConfig) -> Plan:
    return plan_composition(readers, method="contrastive", arguments=cfg.model_dump(mode="json"),
                            roles=["expert", "amateur"], weights=[1.0 + cfg.beta, -cfg.beta],
                            plausibility={"member": 0, "alpha": cfg.alpha})
