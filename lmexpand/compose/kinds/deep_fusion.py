"""Deep-fusion experts (CogVLM, Wang et al. 2023, arXiv 2311.03079, for text): expert copies of
chosen projections, used by the tokens inside marked spans. Plan: ``expand/deep_fusion.py``;
model: ``compose/deep_fusion_modeling.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from lmexpand.compose.kinds.declaration import ComposedKind


def members(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [("source", config["source_path"])] if config.get("source_path") else []


def load(model_dir: Path, dtype: Any = None) -> Any:
    """Experts from ``model_dir``, the source from the recorded path; routing re-attached."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmexpand.compose.deep_fusion_modeling import DeepFusionConfig, DeepFusionForCausalLM
    from lmexpand.compose.loading import check_members, load_own

    config = DeepFusionConfig.from_pretrained(model_dir)
    dtype = dtype or torch.float32
    if not config.source_path:  # self-contained (exported)
        return DeepFusionForCausalLM.from_pretrained(model_dir, dtype=dtype)
    check_members(model_dir)
    with torch.device("meta"):
        model = DeepFusionForCausalLM(config)
    model.source = AutoModelForCausalLM.from_pretrained(config.source_path, dtype=dtype)
    load_own(model.experts, model_dir, "experts.", "expert")
    model.attach()
    return model.float() if dtype == torch.float32 else model


def self_contained(config: dict[str, Any], own: set[str], readers: list) -> list:
    """The source under ``source.``."""
    from lmexpand.compose.exporting import embedded_member

    out: list = []
    if config.get("source_path"):
        out += embedded_member("source.", config["source_path"], own, readers)
    config["source"]["tie_word_embeddings"] = False
    config["source_path"] = None
    return out


KIND = ComposedKind(
    model_type="lmexpand_deep_fusion",
    title="deep fusion",
    surgeries=("deep-fusion",),
    modeling="deep_fusion_modeling",
    config_class="DeepFusionConfig",
    model_class="DeepFusionForCausalLM",
    tensor_prefixes=("experts.", "source."),
    members=members,
    load=load,
    self_contained=self_contained,
    span_markers=True,
    no_gradient="a deep-fusion model's experts run only on tokens inside marked spans, and no block of the "
                "first batch holds a marker ({markers}): give data with the markers the surgery was made "
                "for (code fences, formulas), or make the surgery with markers this data has",
)
