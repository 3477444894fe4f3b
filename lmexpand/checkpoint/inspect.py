"""What a checkpoint is, from its config and tensor headers alone (no values loaded)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from lmexpand.checkpoint.families import FAMILIES, MOE_CONFIG_KEYS, Family, detect_family
from lmexpand.checkpoint.reader import CheckpointReader, torch_dtype_name
from lmexpand.compose.kinds import is_composed_config  # (the declarations: data every layer may read)
from lmexpand.errors import UnsupportedArchitectureError


def _family_of(reader: CheckpointReader) -> Family | None:
    """The reader's family, detected here when it was opened without one (inspect reads any
    model); None for what lmexpand reads but does not expand (MoE, composed, other types)."""
    if reader.family is not None:
        return reader.family
    try:
        return detect_family(reader.config)
    except UnsupportedArchitectureError:
        return None


def what_it_accepts(cfg: dict[str, Any]) -> str:
    """For a model that is not of an expandable family: what it is, and which commands take it."""
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    model_type = cfg.get("model_type")
    if is_composed_config(cfg):
        return (f"a composed model ({model_type}: several models run together, made by an lmexpand surgery). "
                "`generate`, `eval`, `train` (its own new tensors), `export` and `verify` accept it; surgeries and "
                "`merge` take one of its members instead")
    moe = [k for k in MOE_CONFIG_KEYS if cfg.get(k)]
    if moe:
        return (f"a mixture-of-experts model ({model_type}, {moe[0]}={cfg[moe[0]]}). `train`, `eval`, `generate`, "
                f"`export` and `verify` accept it; surgeries and `merge` start from dense models ({supported})")
    return (f"model_type {model_type!r} is read through transformers' own class: `train`, `eval`, `generate`, "
            f"`export` and `verify` accept it; surgeries and `merge` need one of the families lmexpand expands "
            f"({supported})")


def summarize(reader: CheckpointReader) -> dict[str, Any]:
    family = _family_of(reader)
    cfg = reader.config
    n_layers = family.num_layers(cfg) if family else int(cfg.get("num_hidden_layers") or 0)
    generic = re.compile(r"^.*?\.layers\.(\d+)\.(.+)$")

    def split_layer(name: str) -> tuple[int, str] | None:
        if family:
            return family.split_layer_name(name)
        m = generic.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    per_layer = [0] * n_layers
    other: dict[str, int] = {}
    stray: list[str] = []
    bytes_by_dtype: Counter[str] = Counter()
    for t in reader:
        bytes_by_dtype[torch_dtype_name(t.dtype)] += t.nbytes
        split = split_layer(t.name)
        if split is None:
            other[t.name] = t.numel
        elif split[0] < n_layers:
            per_layer[split[0]] += t.numel
        else:
            stray.append(t.name)
    heads = cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    summary: dict[str, Any] = {
        "path": str(reader.path),
        "family": family.name if family else cfg.get("model_type"),
        "architectures": cfg.get("architectures") or ([family.causal_lm_class] if family else []),
        "num_layers": n_layers,
        "hidden_size": hidden,
        "intermediate_size": cfg.get("intermediate_size"),
        "num_attention_heads": heads,
        "num_key_value_heads": cfg.get("num_key_value_heads", heads),
        "head_dim": cfg.get("head_dim") or (hidden // heads if hidden and heads else None),
        "vocab_size": cfg.get("vocab_size"),
        "max_position_embeddings": cfg.get("max_position_embeddings"),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)) or (
            family is not None and family.lm_head not in reader.tensors),
        "dtype": bytes_by_dtype.most_common(1)[0][0] if bytes_by_dtype else None,
        "bytes_by_dtype": dict(bytes_by_dtype),
        "total_parameters": reader.total_params,
        "total_bytes": reader.total_bytes,
        "num_tensors": len(reader.tensors),
        "files": [f.name for f in reader.weight_files],
        "per_layer_parameters": per_layer,
        "non_layer_parameters": other,
        "lineage": reader.lineage(),
    }
    if family is None:
        summary["note"] = what_it_accepts(cfg)
    if stray:
        summary["tensors_beyond_num_layers"] = stray
    return summary
