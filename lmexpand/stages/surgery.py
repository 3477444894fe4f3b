"""The surgery stage: plan a registered method from the sources' headers, then stream the
output (``lmexpand surgery METHOD ...`` and a recipe's ``surgery`` section)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lmexpand.errors import ConfigError, UsageError

log = logging.getLogger("lmexpand")


@dataclass(frozen=True)
class SurgeryRequest:
    """One surgery: a method, its sources and its arguments (raw values, validated by the
    method's config; or an already parsed config)."""

    method: Any  # a registered SurgeryMethod
    sources: list[str]
    out: Path | str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    config: Any = None  # the method's parsed config; parsed from ``arguments`` when None
    dry_run: bool = False
    force: bool = False
    max_shard_size: str | int = "5GB"
    allow_pickle: bool = False
    # the command's log lines (notes, what was written) and its max |dlogit| check on
    # methods that are not exact at init; a recipe's run reports per stage instead
    announce: bool = True


@dataclass
class PlannedSurgery:
    """A request with its plan, made from headers only (readers stay usable: they reopen)."""

    request: SurgeryRequest
    config: Any
    readers: list
    plan: Any  # lmexpand.expand.plan.Plan

    def fingerprint_readers(self) -> list:
        """Every source the plan reads (a merge opens its own)."""
        return list(self.plan.readers or self.readers)


@dataclass(frozen=True)
class SurgeryResult:
    summary: dict[str, Any]  # see :func:`plan_summary`; with max_abs_logit_delta once measured
    output: Path | None  # None: a dry run


def split_models_and_out(method, args: list[str], dry_run: bool) -> tuple[list[str], str | None]:
    """``MODEL MODEL ... OUT``: the last argument is OUT, except under --dry-run when it
    names a model (then every argument is a model)."""
    from lmexpand.checkpoint.sources import EMBEDDED

    def is_model(a: str) -> bool:
        return a in EMBEDDED or (Path(a) / "config.json").is_file()

    models, out = (args, None) if dry_run and args and is_model(args[-1]) else (args[:-1], args[-1] if args else None)
    need = len(method.sources)
    if len(models) < need:
        raise ConfigError(f"surgery {method.name} needs at least {need} models, then OUT "
                          f"(`lmexpand surgery {method.name} {' '.join(method.sources)} [...] OUT`); got "
                          f"{len(models)} model(s)" + (f" and OUT {out}" if out else "") + ".")
    return models, out


def plan_surgery(request: SurgeryRequest) -> PlannedSurgery:
    """The method's config, its sources opened and its plan, checked against the sources
    (headers only; nothing is read or written)."""
    from lmexpand.checkpoint.sources import open_source
    from lmexpand.expand.registry import parse_config

    method = request.method
    cfg = request.config
    if cfg is None:
        cfg = parse_config(method, {k: v for k, v in request.arguments.items() if v is not None})
    readers = [open_source(s, allow_pickle=request.allow_pickle) for s in request.sources]
    try:
        return PlannedSurgery(request, cfg, readers, method.checked_plan(readers, cfg))
    except BaseException:
        for r in readers:
            r.close()
        raise


def run_surgery(request: SurgeryRequest, planned: PlannedSurgery | None = None) -> SurgeryResult:
    """Plan (unless ``planned`` already holds the plan), then write OUT atomically; a dry
    run returns the summary and writes nothing."""
    from lmexpand.expand.executor import execute
    from lmexpand.units import parse_size

    max_shard_size = parse_size(request.max_shard_size, "--max-shard-size")
    if request.out is None and not request.dry_run:
        raise UsageError("missing argument OUT (the output directory); or use --dry-run")
    planned = planned or plan_surgery(request)
    plan = planned.plan
    summary = plan_summary(plan) if request.announce or request.dry_run else {}
    if request.dry_run:
        return SurgeryResult(summary, None)
    if request.announce:
        for note in plan.notes:
            log.info("note: %s", note)
    path = execute(plan, request.out, force=request.force, max_shard_size=max_shard_size, readers=planned.readers)
    if request.announce:
        layers = f"{summary['num_layers']} layers, " if summary["num_layers"] else ""
        log.info("wrote %s: %s%s parameters (%s to train)%s", path, layers, f"{summary['parameters_total']:,}",
                 f"{summary['parameters_new']:,}", ", function-preserving at init (by construction)"
                 if plan.function_preserving else "")
        if plan.check_delta:
            from lmexpand.expand.executor import logit_delta

            summary["max_abs_logit_delta"] = delta = logit_delta(plan.sources[0], path)
            log.info("not exact at init: max |dlogit| vs the source = %.3g (fp32, fixed batch of 2x32 tokens)", delta)
    return SurgeryResult(summary, path)


# -- the summary: what --dry-run and --json show -----------------------------------------------
def plan_summary(plan) -> dict[str, Any]:
    """What `--dry-run` shows: layer map, parameter counts, bytes, training memory."""
    return {
        "method": plan.method,
        "arguments": plan.arguments,
        "sources": [str(s) for s in plan.sources],
        "function_preserving": plan.function_preserving,
        "num_layers": len(plan.layer_map) if plan.layer_map else None,
        "layer_map": plan.layer_map,
        "parameters_total": plan.total_params,
        "parameters_new": plan.new_params,
        "tensors_total": len(plan.tensors),
        "tensors_new": len(plan.new_parameters),
        "bytes_to_write": plan.total_bytes,
        "training_memory_bytes": plan.training_memory(),
        "notes": plan.notes,
    }


def compress_layer_map(layer_map: Sequence[Any]) -> list[str]:
    """``[0, 1, 2, "new copy of 2", 3]`` -> ``["0-2 <- 0-2", "3 <- new copy of 2", "4 <- 3"]``:
    runs of plain copies collapse into ranges for people to read."""
    lines: list[str] = []
    i = 0
    while i < len(layer_map):
        entry = layer_map[i]
        if isinstance(entry, int):
            j = i
            while j + 1 < len(layer_map) and isinstance(layer_map[j + 1], int) and layer_map[j + 1] == layer_map[j] + 1:
                j += 1
            lines.append(f"{i} <- {entry}" if i == j else f"{i}-{j} <- {entry}-{layer_map[j]}")
            i = j + 1
        else:
            lines.append(f"{i} <- {entry}")
            i += 1
    return lines


def print_plan(s: dict) -> None:
    """The dry run's table on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    from lmexpand.units import human_bytes, human_count

    console = Console()
    table = Table(title=f"plan: {s['method']} (dry run, nothing written)", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    mem = s["training_memory_bytes"]
    rows = [
        ("arguments", ", ".join(f"{k}={v}" for k, v in s["arguments"].items() if v is not None)),
        ("sources", ", ".join(s["sources"])),
        ("layers", s["num_layers"]),
        ("parameters", f"{s['parameters_total']:,} total ({human_count(s['parameters_total'])}), "
                       f"{s['parameters_new']:,} to train ({human_count(s['parameters_new'])})"),
        ("tensors", f"{s['tensors_total']} total, {s['tensors_new']} to train"),
        ("bytes to write", f"{s['bytes_to_write']:,} ({human_bytes(s['bytes_to_write'])})"),
        ("function-preserving", "yes (exact at init)" if s["function_preserving"] else "no"),
        ("training memory", f"{human_bytes(mem['total'])} = new weights {human_bytes(mem['new_weights'])} "
                            f"+ grads {human_bytes(mem['gradients'])} + AdamW {human_bytes(mem['adamw_states'])} "
                            f"+ frozen weights {human_bytes(mem['frozen_weights'])} (activations not included)"),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)
    if s["layer_map"]:
        console.print("[bold]layer map[/bold] (output <- source):")
        for line in compress_layer_map(s["layer_map"]):
            console.print("  " + line)
    for note in s["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
