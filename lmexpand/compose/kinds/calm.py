"""CALM (Bansal et al., 2024, arXiv 2401.02412): an anchor reads an augmenting model's layer
representations through trainable cross-attention bridges. Plan: ``expand/calm.py``; model:
``compose/calm_modeling.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from lmexpand.compose.kinds.declaration import ComposedKind


def members(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(role, p) for role, p in (("anchor", config.get("anchor_path")),
                                      ("augmenting model", config.get("augment_path"))) if p]


def load(model_dir: Path, dtype: Any = None) -> Any:
    """Bridges from ``model_dir``, both models from the paths the surgery recorded (or,
    in a self-contained export, from the directory itself)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from lmexpand.compose.calm_modeling import CalmConfig, CalmForCausalLM
    from lmexpand.compose.loading import check_members, load_own

    config = CalmConfig.from_pretrained(model_dir)
    dtype = dtype or torch.float32
    if not config.anchor_path:  # self-contained (exported)
        return CalmForCausalLM.from_pretrained(model_dir, dtype=dtype)
    check_members(model_dir)
    with torch.device("meta"):
        model = CalmForCausalLM(config)
    from transformers.utils import logging as hf_logging

    model.anchor = AutoModelForCausalLM.from_pretrained(config.anchor_path, dtype=dtype)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the augmenting model's lm_head is not needed: no load report for it
    try:
        model.augment = AutoModel.from_pretrained(config.augment_path, dtype=dtype)
    finally:
        hf_logging.set_verbosity(level)
    load_own(model.bridges, model_dir, "bridges.", "bridge")
    return model.float() if dtype == torch.float32 else model


def self_contained(config: dict[str, Any], own: set[str], readers: list) -> list:
    """The anchor's tensors under ``anchor.``, the augmenting model's backbone under
    ``augment.`` (its head is not used)."""
    from lmexpand.checkpoint.reader import CheckpointReader
    from lmexpand.checkpoint.safetensors_format import TensorSlot
    from lmexpand.checkpoint.writer import OutputTensor, RawCopy

    out: list = []
    if config.get("anchor_path"):
        anchor, aug = CheckpointReader(config["anchor_path"]), CheckpointReader(config["augment_path"])
        readers += [anchor, aug]
        out = [OutputTensor(TensorSlot("anchor." + t.name, t.dtype, t.shape), RawCopy(t)) for t in anchor]
        out += [OutputTensor(TensorSlot("augment." + t.name[len("model."):], t.dtype, t.shape), RawCopy(t))
                for t in aug if t.name.startswith("model.")]
    config["anchor_path"] = config["augment_path"] = None
    return out


KIND = ComposedKind(
    model_type="lmexpand_calm",
    title="CALM",
    surgeries=("calm",),
    modeling="calm_modeling",
    config_class="CalmConfig",
    model_class="CalmForCausalLM",
    tensor_prefixes=("bridges.", "anchor.", "augment."),
    members=members,
    load=load,
    self_contained=self_contained,
)
