"""Which parameters train: from lmexpand.json, globs, and optional LoRA.

The surgery wrote the names of the tensors it added (``new_parameters``, as saved). Here
they are matched to the model's parameters, and every name must match one: a name that
matches nothing means the lineage and the model disagree, which is an error, never a
silently smaller trainable set.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any

from torch import nn

from lmexpand.errors import ConfigError, SourceError
from lmexpand.train.config import TrainConfig
from lmexpand.jsonio import read_json

log = logging.getLogger("lmexpand")


def read_lineage(model_dir: Path) -> dict[str, Any] | None:
    path = model_dir / "lmexpand.json"
    return read_json(path, what="lmexpand.json (the model's lineage)", expect=dict, error=SourceError,
                     fix="Restore it from the output that wrote it, or delete it to train with --trainable "
                         "instead of its new_parameters.") if path.is_file() else None


def trainable_names(model: nn.Module, model_dir: Path, cfg: TrainConfig) -> set[str]:
    """Names (as in ``named_parameters``) of the parameters to train, before LoRA."""
    params = dict(model.named_parameters())
    chosen: set[str] = set()
    if cfg.trainable == "all":
        chosen = set(params)
    elif cfg.trainable == "none":
        chosen = set()
    elif _named_set(model, cfg.trainable) is not None:  # a composed model's own names (Co-LLM: gate, gate+base)
        chosen = _named_set(model, cfg.trainable)
    elif cfg.trainable == "new":
        lineage = read_lineage(model_dir)
        if lineage is None:
            raise ConfigError(
                f"{model_dir}: no lmexpand.json, so lmexpand does not know which parameters are new. "
                "Run a surgery first, or say what to train: --trainable all (full fine-tuning), "
                "--trainable 'GLOB,...', or --lora."
            )
        from lmexpand.checkpoint.moe_layout import param_name

        # saved names; MoE experts are saved one per expert and held fused by the model
        names = sorted({param_name(n)[0] for n in lineage.get("new_parameters") or []})
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ConfigError(
                f"{model_dir}/lmexpand.json lists {len(unknown)} new parameters the model does not have "
                f"(first: {unknown[0]!r}); the lineage does not belong to these weights."
            )
        chosen = set(names)
    else:
        chosen = _match_globs(params, cfg.trainable, "--trainable")
    if cfg.extra_trainable:
        chosen |= _match_globs(params, cfg.extra_trainable, "--extra-trainable")
    from lmexpand.compose.kinds import composed_kind, read_config

    config = read_config(model_dir)
    if composed_kind(config) is not None:
        _check_composed_trainable(model_dir, config, chosen, cfg)
    if not chosen and cfg.lora is None:
        raise ConfigError(
            f"nothing to train in {model_dir}: the trainable set is empty. Use --trainable all, "
            "globs that match parameter names, or --lora."
        )
    return chosen


def _named_set(model: nn.Module, trainable: Any) -> set[str] | None:
    sets = getattr(model, "trainable_sets", lambda: {})()
    if isinstance(trainable, list) and len(trainable) == 1 and trainable[0] in sets:
        return set(sets[trainable[0]])
    return None


def _check_composed_trainable(model_dir: Path, config: dict, chosen: set[str], cfg: TrainConfig) -> None:
    """A composed directory stores only its own tensors (bridges, heads); its members'
    weights live in their own directories. Training anything else would be lost on save."""
    from lmexpand.checkpoint.reader import CheckpointReader

    own = {t.name for t in CheckpointReader(model_dir, need_family=False)}
    kind = config.get("model_type")
    if not own:
        raise ConfigError(f"nothing to train in {model_dir}: this {config.get('method') or kind} composition has no "
                          "trainable parameters (it combines its members' outputs as they are). Train a member "
                          "instead, then compose again.")
    from lmexpand.compose.kinds import KINDS

    members_ok = KINDS[kind].trainable_members
    outside = sorted(n for n in chosen - own if not n.startswith(members_ok))
    if outside or cfg.lora is not None:
        what = "--lora" if cfg.lora is not None else f"{len(outside):,} parameters of its members (first: {outside[0]!r})"
        raise ConfigError(f"{model_dir} is a composed model ({kind}): it stores only its own tensors "
                          f"({len(own):,}: {sorted(own)[0]}, ...), and {what} would train weights of its members, "
                          "which live in their own directories. Train the default set (--trainable new)"
                          + (f" or {', '.join(p + '*' for p in members_ok)}" if members_ok else "")
                          + ", or fine-tune a member on its own and compose again.")


def _match_globs(params: dict[str, Any], globs: list[str], flag: str) -> set[str]:
    out: set[str] = set()
    for g in globs:
        hits = {n for n in params if fnmatch.fnmatch(n, g)}
        if not hits:
            example = next(iter(params))
            raise ConfigError(f"{flag} {g!r} matches no parameter (names look like {example!r}).")
        out |= hits
    return out


def apply_freezing(model: nn.Module, names: set[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)


def add_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Attach LoRA adapters (peft) to frozen linear modules; the new parameters keep their
    requires_grad, the adapters train, the frozen base stays frozen."""
    from peft import LoraConfig, get_peft_model

    assert cfg.lora is not None
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    leaf_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    unmatched = [t for t in cfg.lora.target_modules if t not in leaf_names]
    if unmatched:
        raise ConfigError(f"--lora-targets: {', '.join(unmatched)} name(s) no linear module of this model, so no "
                          f"adapter would be added there. Linear modules here: {', '.join(sorted(leaf_names))}.")
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, bias="none")
    # exclude modules that train fully anyway (a LoRA on a trained matrix is redundant)
    trained_modules = {n.rsplit(".", 1)[0] for n in keep}
    lora.exclude_modules = sorted(trained_modules) or None
    peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():
        base_name = name.removeprefix("base_model.model.")
        if base_name in keep:
            p.requires_grad_(True)
    return peft_model


def parameter_table(model: nn.Module) -> tuple[list[tuple[str, int, int]], int, int]:
    """Rows (group, trainable, frozen) by top-level block, and totals."""
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        key = name.removeprefix("base_model.model.")
        parts = key.split(".")
        group = ".".join(parts[:3]) if len(parts) > 2 and parts[1] == "layers" else parts[0] + "." + parts[1] if len(parts) > 1 else key
        row = groups.setdefault(group, [0, 0])
        row[0 if p.requires_grad else 1] += p.numel()
    rows = [(g, t, f) for g, (t, f) in groups.items()]
    trainable = sum(r[1] for r in rows)
    frozen = sum(r[2] for r in rows)
    return rows, trainable, frozen


def print_parameter_table(model: nn.Module) -> tuple[int, int]:
    from rich.console import Console
    from rich.table import Table

    rows, trainable, frozen = parameter_table(model)
    table = Table(title="parameters: trainable vs frozen", title_justify="left")
    table.add_column("module")
    table.add_column("trainable", justify="right")
    table.add_column("frozen", justify="right")
    for group, t, f in rows:
        if t or len(rows) <= 40:
            table.add_row(group, f"{t:,}" if t else "", f"{f:,}" if f else "")
    total = trainable + frozen
    table.add_row("[bold]total[/bold]", f"[bold]{trainable:,}[/bold] ({100 * trainable / max(total, 1):.1f} %)", f"[bold]{frozen:,}[/bold]")
    Console(stderr=True).print(table)
    return trainable, frozen
