"""The training stage: ``lmexpand train`` and every ``train`` stage of a recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmexpand.errors import UsageError


def run_training(cfg: Any, *, resume: bool | Path = False, force: bool = False) -> Path:
    """Train ``cfg`` (a :class:`~lmexpand.train.config.TrainConfig`); returns the final model
    directory (``cfg.out / "model"``). ``resume``: True for the latest checkpoint in
    ``cfg.out``, or a checkpoint directory."""
    from lmexpand.train.loop import train

    return train(cfg, resume=resume, force=force)


def train_config_from_flags(kw: dict, recipe_section: dict | None = None) -> tuple[Any, bool | Path, bool]:
    """(TrainConfig, resume, force) of the command's options; ``recipe_section`` (a
    ``--recipe``'s ``train`` section, paths resolved) gives defaults the flags override."""
    from lmexpand.train.config import parse_train_config

    values: dict = dict(recipe_section) if recipe_section is not None else {}
    style = "flag" if recipe_section is None else "key"
    text_field, template, loss_from = kw.pop("text_field"), kw.pop("template"), kw.pop("loss_from")
    chat = kw.pop("chat")
    data = kw.pop("data")
    if data:
        values["data"] = [data_argument(d) for d in data]
    if text_field or template or loss_from or chat:
        values["data"] = [
            {**d, **({"field": text_field} if text_field else {}), **({"template": template} if template else {}),
             **({"loss_from": loss_from} if loss_from else {}), **({"chat": chat} if chat else {})}
            for d in values.get("data", [])
        ]
    for key in ("model", "out"):
        if kw.get(key):
            values[key] = kw[key]
        kw.pop(key)
    trainable, extra = kw.pop("trainable"), kw.pop("extra_trainable")
    if trainable:
        values["trainable"] = trainable if trainable in ("new", "all", "none") else trainable.split(",")
    if extra:
        values["extra_trainable"] = extra.split(",")
    use_lora, lora_r, lora_targets = kw.pop("use_lora"), kw.pop("lora_r"), kw.pop("lora_targets")
    if lora_r is not None and lora_r < 1:
        raise UsageError(f"{lora_r}: a LoRA rank is at least 1 (8, 16, 64 are common)", param_hint="--lora-r")
    if use_lora or lora_r is not None or lora_targets:
        lora = dict(values.get("lora") or {})
        if lora_r:
            lora["r"] = lora_r
        if lora_targets:
            lora["target_modules"] = lora_targets.split(",")
        values["lora"] = lora
    resume, resume_from, force = kw.pop("resume"), kw.pop("resume_from"), kw.pop("force")
    values.update({k: v for k, v in kw.items() if v is not None})
    for required in ("model", "out"):
        if required not in values:
            raise UsageError(f"missing --{required}")
    if "data" not in values:
        raise UsageError("missing --data (a .txt, .jsonl, .parquet, .arrow or .csv file, or a save_to_disk "
                         "directory)")
    cfg = parse_train_config(values, style=style)
    return cfg, (Path(resume_from) if resume_from else resume), force


def data_argument(text: str) -> dict:
    """--data FILE or FILE:WEIGHT (an existing file whose name ends in :NUMBER is a file)."""
    import math
    import re

    m = re.fullmatch(r"(.+):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan)", text)
    if m is None or Path(text).exists():
        return {"path": text}
    weight = float(m.group(2))
    if not (math.isfinite(weight) and weight > 0):
        raise UsageError(f"{text!r}: the mixture weight {m.group(2)} of {m.group(1)} is not a positive finite "
                         "number. Give e.g. --data math.jsonl:0.7 --data general.txt:0.3", param_hint="--data")
    return {"path": m.group(1), "weight": weight}
