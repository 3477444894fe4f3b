"""Co-LLM (Shen et al. 2024, arXiv 2403.03870): a base model that learns, token by token,
when to defer to an assistant. Plan: ``expand/co_llm.py``; model: ``compose/co_llm_modeling.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from lmexpand.compose.kinds.declaration import ComposedKind


def members(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(role, p) for role, p in (("base", config.get("base_path")),
                                      ("assistant", config.get("assistant_path"))) if p]


def load(model_dir: Path, dtype: Any = None) -> Any:
    """The gate from ``model_dir``, base and assistant from the recorded paths."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmexpand.compose.co_llm_modeling import CoLlmConfig, CoLlmForCausalLM
    from lmexpand.compose.loading import check_members, load_own, member_from_own_tensors

    config = CoLlmConfig.from_pretrained(model_dir)
    dtype = dtype or torch.float32
    if not config.base_path and not config.assistant_path:  # self-contained (exported)
        return CoLlmForCausalLM.from_pretrained(model_dir, dtype=dtype)
    check_members(model_dir)
    with torch.device("meta"):
        model = CoLlmForCausalLM(config)
    for which in ("base", "assistant"):
        path = getattr(config, f"{which}_path")
        if path:
            setattr(model, which, AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
        else:  # trained into this directory (--trainable gate+base)
            setattr(model, which, member_from_own_tensors(model_dir, f"{which}.", config.member_config(which), dtype))
    load_own(model.gate, model_dir, "gate.", "gate")
    model.gate.float()
    return model.float() if dtype == torch.float32 else model


def self_contained(config: dict[str, Any], own: set[str], readers: list) -> list:
    """Base and assistant under ``base.`` and ``assistant.`` (a base trained into the
    directory is already there)."""
    from lmexpand.compose.exporting import embedded_member

    out: list = []
    for key in ("base", "assistant"):
        if config.get(f"{key}_path"):
            out += embedded_member(f"{key}.", config[f"{key}_path"], own, readers)
        config[key]["tie_word_embeddings"] = False
        config[f"{key}_path"] = None
    return out


KIND = ComposedKind(
    model_type="lmexpand_co_llm",
    title="Co-LLM",
    surgeries=("co-llm",),
    modeling="co_llm_modeling",
    config_class="CoLlmConfig",
    model_class="CoLlmForCausalLM",
    tensor_prefixes=("gate.", "base.", "assistant."),
    members=members,
    load=load,
    self_contained=self_contained,
    # the paper's setting trains the base with the gate (--trainable gate+base); the assistant stays frozen
    trainable_members=("base.",),
    embeddable_members={"base.": ("base_path", "base"), "assistant.": ("assistant_path", "assistant")},
    gate_init=True,
    no_gradient="the gate gets no gradient where deferring to the assistant changes nothing (the assistant and "
                "the base agree on every target of the first batch): give data where the assistant helps",
    deferral_gate=True,
)
