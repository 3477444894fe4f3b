"""Limits on the sizes a config may ask for.

A config is read before anything is built from it; sizes beyond these are not a model
anyone can hold, so a config asking for them (corrupted or hostile) is refused before a
loop or an allocation follows it.
"""

from __future__ import annotations

from typing import Any, Mapping

from lmexpand.errors import SourceError

# Sizes beyond these are not a model anyone can hold; a config asking for them is refused
# before anything is built from it (a hostile or corrupted config.json).
MAX_LAYERS = 10_000  # a surgery's output, like any config, may not exceed this many layers
MAX_EXPERTS = 4_096  # routed experts per layer a surgery may create (the largest MoEs have 384-512)
# |weight| of a member's logits in a logit composition (proxy-tuning's alpha, contrastive's
# beta, logit-sum weights). Real logits stay within ~1e3, so sums of weights this large stay
# far from fp32's 3.4e38 (a weight of 1e36 made every logit Inf and generate print nothing);
# the papers use 0.5-2.
MAX_LOGIT_WEIGHT = 1_000.0
# optimizer steps a training option may ask for: --max-steps, and Co-LLM's gate
# initialisation (100,000 init steps ran for hours before the first training step)
MAX_STEPS = 10_000_000
MAX_INIT_STEPS = 10_000

SIZE_LIMITS: Mapping[str, int] = {
    "num_hidden_layers": MAX_LAYERS,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 24,
    "moe_intermediate_size": 1 << 24,
    "vocab_size": 1 << 24,
    "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14,
    "head_dim": 1 << 16,
    "num_local_experts": 1 << 16,
    "num_experts": 1 << 16,
    "n_routed_experts": 1 << 16,
    "n_shared_experts": 1 << 16,
    "max_position_embeddings": 1 << 31,
}


def check_config_sizes(config: Mapping[str, Any], where: str, *, output: bool = False) -> None:
    """Refuse absurd sizes (non-integers, negatives, beyond :data:`SIZE_LIMITS`) before any
    allocation or loop over them. ``output``: the config is what a plan (surgery, merge)
    would write, so the limit is the user's request, not a broken file: checked before a
    byte is written, whatever the method (one rule for --slices, --add, a merge's slices)."""
    sections = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, Mapping)]
    for section in sections:
        for key, limit in SIZE_LIMITS.items():
            if key not in section or section[key] is None:
                continue
            value = section[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SourceError(f"{where}: {key} = {value!r} is not a non-negative integer; the config is "
                                  "broken. Fix config.json or re-download the model.")
            if value > limit and output:
                from lmexpand.errors import ConfigError

                raise ConfigError(f"{where}: the output would have {key} = {value:,}, beyond the {limit:,} any "
                                  "model holds (docs/reliability.md, limits). Ask for a smaller output: fewer "
                                  "slices, layers or experts.")
            if value > limit:
                raise SourceError(f"{where}: {key} = {value:,} is absurd (at most {limit:,} is accepted); the "
                                  "config is corrupted or hostile. Refusing it before building anything: fix "
                                  "config.json or re-download the model.")


