"""Logit compositions: a weighted sum of members' next-token logits (logit sum,
proxy-tuning, contrastive decoding). Plan: ``expand/logit_compose.py``; model:
``compose/logits_modeling.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from lmexpand.compose.kinds.declaration import ComposedKind


def members(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    roles = config.get("roles") or []
    return [(roles[i] if i < len(roles) else f"member {i}", p)
            for i, p in enumerate(config.get("member_paths") or []) if p]


def load(model_dir: Path, dtype: Any = None) -> Any:
    """Members from the paths the surgery recorded; with trained heads, each member's head
    is replaced by the composition's own untied copy (``members.I.lm_head.weight``)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from lmexpand.compose.loading import check_members, own_tensors
    from lmexpand.compose.logits_modeling import LogitCompositionConfig, LogitCompositionForCausalLM
    from lmexpand.errors import CheckpointError

    config = LogitCompositionConfig.from_pretrained(model_dir)
    dtype = dtype or torch.float32
    if not any(config.member_paths):  # self-contained (exported)
        return LogitCompositionForCausalLM.from_pretrained(model_dir, dtype=dtype)
    check_members(model_dir)
    with torch.device("meta"):
        model = LogitCompositionForCausalLM(config)
    heads = own_tensors(model_dir, "members.")
    for i, path in enumerate(config.member_paths):
        member = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        weight = heads.pop(f"{i}.lm_head.weight", None)
        if config.trained_heads:
            if weight is None:
                raise CheckpointError(f"{model_dir}: members.{i}.lm_head.weight is missing (the trained head of "
                                      f"{path}); the directory is incomplete.")
            head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            head.weight = nn.Parameter(weight.to(torch.float32), requires_grad=True)
            member.lm_head = head
            member.config.tie_word_embeddings = False
        model.members[i] = member
    if heads:
        raise CheckpointError(f"{model_dir}: tensors that match no member head: {sorted(heads)[:3]}.")
    return model.float() if dtype == torch.float32 else model


def self_contained(config: dict[str, Any], own: set[str], readers: list) -> list:
    """Every member under ``members.I.`` (a trained head copy stays the composition's own)."""
    from lmexpand.compose.exporting import embedded_member

    out: list = []
    for i, path in enumerate(config["member_paths"]):
        if path:
            out += embedded_member(f"members.{i}.", path, own, readers)
        config["members"][i]["tie_word_embeddings"] = False
    config["member_paths"] = [None] * len(config["member_paths"])
    return out


KIND = ComposedKind(
    model_type="lmexpand_logits",
    title="logit composition",
    surgeries=("logit-sum", "proxy-tune", "contrastive"),
    modeling="logits_modeling",
    config_class="LogitCompositionConfig",
    model_class="LogitCompositionForCausalLM",
    tensor_prefixes=("members.",),
    members=members,
    load=load,
    self_contained=self_contained,
)
