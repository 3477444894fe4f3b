"""What a composed model's directory holds (the on-disk format; the models themselves
are in ``lmexpand/compose/``): its ``model_type``, the tensor prefixes it may contain,
and the member models it references by path.

A composed directory written by a surgery references its members (path + fingerprint in
``lmexpand.json``) and holds only its own new tensors; ``lmexpand export`` makes it
self-contained (members' tensors inside, member paths cleared).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# model_type -> the tensor name prefixes its directory may hold
COMPOSED_TENSOR_PREFIXES: dict[str, tuple[str, ...]] = {
    "lmexpand_calm": ("bridges.", "anchor.", "augment."),
    "lmexpand_logits": ("members.",),
    "lmexpand_co_llm": ("gate.", "base.", "assistant."),
    "lmexpand_deep_fusion": ("experts.", "source."),
}


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def is_composed_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") in COMPOSED_TENSOR_PREFIXES


def member_references(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, path) of every member a composed config references (none once exported)."""
    kind = config.get("model_type")
    if kind == "lmexpand_calm":
        return [(role, p) for role, p in (("anchor", config.get("anchor_path")),
                                          ("augmenting model", config.get("augment_path"))) if p]
    if kind == "lmexpand_deep_fusion":
        return [("source", config["source_path"])] if config.get("source_path") else []
    if kind == "lmexpand_co_llm":
        return [(role, p) for role, p in (("base", config.get("base_path")),
                                          ("assistant", config.get("assistant_path"))) if p]
    if kind == "lmexpand_logits":
        roles = config.get("roles") or []
        return [(roles[i] if i < len(roles) else f"member {i}", p)
                for i, p in enumerate(config.get("member_paths") or []) if p]
    return []


# composed model_type -> member prefix -> (config key of its path, config key of its config).
# A member listed here can be embedded: training that changes its weights writes them into
# the composed directory under the prefix (its path is then cleared).
EMBEDDABLE_MEMBERS: dict[str, dict[str, tuple[str, str]]] = {
    "lmexpand_co_llm": {"base.": ("base_path", "base"), "assistant.": ("assistant_path", "assistant")},
}

# composed model_type -> member prefixes whose weights may train (the rest stay frozen)
TRAINABLE_MEMBERS: dict[str, tuple[str, ...]] = {"lmexpand_co_llm": ("base.",)}
