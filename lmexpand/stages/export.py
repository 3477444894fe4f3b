"""The export stage: ``lmexpand export`` and a recipe's ``export`` section."""

from __future__ import annotations

from pathlib import Path


def run_export(source: str | Path, out: str | Path, *, eval_dir: Path | None = None, max_shard_size: str | int = "5GB",
               force: bool = False, allow_pickle: bool = False, size_key: str = "--max-shard-size") -> Path:
    """A clean Hugging Face model directory with a model card; ``size_key`` names the shard
    size in a message (the flag, or a recipe's key)."""
    from lmexpand.export import export_model
    from lmexpand.units import parse_size

    return export_model(source, out, force=force, eval_dir=eval_dir,
                        max_shard_size=parse_size(max_shard_size, size_key), allow_pickle=allow_pickle)
