"""Loading any model directory lmexpand writes, composed (CALM) ones included.

A CALM surgery directory holds only the bridges and references to its two source
models; :func:`load_model` assembles the composed model from them after checking that
the sources still are what the surgery read (fingerprints in ``lmexpand.json``). Every
other directory is a plain ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmexpand.errors import CheckpointError, ConfigError

CALM_TYPE = "lmexpand_calm"


def model_type(model_dir: Path) -> str | None:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def is_composed(model_dir: Path) -> bool:
    return model_type(model_dir) == CALM_TYPE


def member_inputs(model_dir: Path) -> list[tuple[str, Path]]:
    """The models a composed directory references (it reads them at run time), as inputs
    for the output checks: an output must not replace a member either."""
    if not is_composed(model_dir):
        return []
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return [(f"{role} (member of the composed model)", Path(p)) for role, p in
            (("anchor", cfg.get("anchor_path")), ("augmenting model", cfg.get("augment_path"))) if p]


def register_if_composed(model_dir: Path) -> None:
    """Make transformers' Auto classes know the composed config (tokenizer loading reads it)."""
    if is_composed(model_dir):
        import lmexpand.calm_modeling  # noqa: F401  (registers on import)


def load_model(model_dir: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    if is_composed(model_dir):
        if kwargs.get("quantization_config") is not None:
            raise ConfigError("4-bit loading is not supported for composed (CALM) models.")
        return load_calm(Path(model_dir), dtype=kwargs.get("dtype"))
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def load_calm(model_dir: Path, dtype: Any = None) -> Any:
    """Bridges from ``model_dir``, both models from the paths the surgery recorded (or,
    in a self-contained export, from the directory itself)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from lmexpand.calm_modeling import CalmConfig, CalmForCausalLM
    from lmexpand.checkpoint.reader import CheckpointReader

    config = CalmConfig.from_pretrained(model_dir)
    dtype = dtype or torch.float32
    if not config.anchor_path:  # self-contained (exported)
        return CalmForCausalLM.from_pretrained(model_dir, dtype=dtype)
    lineage = json.loads((model_dir / "lmexpand.json").read_text()) if (model_dir / "lmexpand.json").is_file() else {}
    _check_sources(model_dir, config, lineage)
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
    reader = CheckpointReader(model_dir, need_family=False)
    state = {t.name: reader.get_tensor(t.name) for t in reader}
    model.bridges.to_empty(device="cpu")
    missing, unexpected = model.bridges.load_state_dict(
        {k[len("bridges."):]: v for k, v in state.items() if k.startswith("bridges.")}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: bridge tensors do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")
    return model.float() if dtype == torch.float32 else model


def _check_sources(model_dir: Path, config: Any, lineage: dict[str, Any]) -> None:
    from lmexpand.checkpoint.reader import CheckpointReader

    recorded = {s.get("path"): s.get("sha256") for s in lineage.get("sources", [])}
    for role, path in (("anchor", config.anchor_path), ("augmenting model", config.augment_path)):
        if not Path(path).is_dir():
            raise CheckpointError(f"{model_dir}: the {role} {path} is gone; the composed model needs it "
                                  "(or export a self-contained copy with `lmexpand export`).")
        want = recorded.get(str(Path(path).resolve()))
        if want and CheckpointReader(path).fingerprint()["sha256"] != want:
            raise CheckpointError(f"{model_dir}: the {role} {path} changed since the surgery (fingerprint "
                                  "differs); the bridges were made for the old weights.")
