"""What a checkpoint is (``lmexpand inspect``): config and tensor headers, nothing else read."""

from __future__ import annotations

import json


def inspect_model(source: str, *, allow_pickle: bool = False) -> dict:
    from lmexpand.checkpoint.inspect import summarize
    from lmexpand.checkpoint.sources import open_source

    with open_source(source, allow_pickle=allow_pickle, need_family=False) as reader:
        return summarize(reader)


def print_summary(s: dict) -> None:
    """The summary as tables on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    from lmexpand.units import human_bytes, human_count

    console = Console()
    table = Table(title=f"{s['path']}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("family", f"{s['family']} ({', '.join(s['architectures'])})"),
        ("layers", s["num_layers"]),
        ("hidden / intermediate", f"{s['hidden_size']} / {s['intermediate_size']}"),
        ("heads / kv heads / head dim", f"{s['num_attention_heads']} / {s['num_key_value_heads']} / {s['head_dim']}"),
        ("vocab", s["vocab_size"]),
        ("tied embeddings", "yes" if s["tie_word_embeddings"] else "no"),
        ("dtype", ", ".join(f"{k} ({human_bytes(v)})" for k, v in s["bytes_by_dtype"].items())),
        ("parameters", f"{s['total_parameters']:,} ({human_count(s['total_parameters'])})"),
        ("bytes", f"{s['total_bytes']:,} ({human_bytes(s['total_bytes'])}) in {len(s['files'])} file(s)"),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)

    layers = Table(title="parameters per layer", title_justify="left")
    layers.add_column("layer", justify="right")
    layers.add_column("parameters", justify="right")
    per_layer = s["per_layer_parameters"]
    for i, n in enumerate(per_layer):
        layers.add_row(str(i), f"{n:,}")
    for name, n in s["non_layer_parameters"].items():
        layers.add_row(name, f"{n:,}")
    console.print(layers)
    if s.get("note"):
        console.print(f"[yellow]note:[/yellow] {s['note']}")
    lineage = s.get("lineage")
    if lineage:
        console.print("[bold]lineage[/bold] (lmexpand.json):")
        console.print_json(json.dumps(lineage))
