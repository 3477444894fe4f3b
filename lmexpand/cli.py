"""The ``lmexpand`` command line.

Each subcommand parses, validates and calls one library function. Heavy libraries (torch,
transformers) are imported inside the commands, so ``--help`` and ``--version`` are fast.
Logs go to stderr; machine-readable output (``--json``) to stdout. Exit codes: 0 ok,
2 user error (message, no traceback), 1 internal error (traceback: please report it).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Sequence

import click

from lmexpand import __version__
from lmexpand.errors import LmexpandError

log = logging.getLogger("lmexpand")

EXIT_OK, EXIT_INTERNAL, EXIT_USER = 0, 1, 2

class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=_CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="lmexpand")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def cli(verbose: int, quiet: bool) -> None:
    """Grow pretrained Hugging Face language models by model surgery.

    \b
    Typical road:
      lmexpand inspect smollm2-135m
      lmexpand surgery llama-pro smollm2-135m out/pro --add 6
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("lmexpand: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


@cli.command()
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout instead of tables.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (pickle) weights. Only for trusted files.")
def inspect(source: str, as_json: bool, allow_pickle: bool) -> None:
    """Show a checkpoint's family, sizes, per-layer parameters and lineage.

    SOURCE is a local Hugging Face model directory or an embedded model name
    (smollm2-135m). Nothing but the config and tensor headers is read.

    \b
    Examples:
      lmexpand inspect smollm2-135m
      lmexpand inspect ./models/my-llama --json | jq .total_parameters
    """
    from lmexpand.checkpoint.inspect import summarize
    from lmexpand.checkpoint.sources import open_source

    with open_source(source, allow_pickle=allow_pickle) as reader:
        summary = summarize(reader)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


def _print_summary(s: dict) -> None:
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
    lineage = s.get("lineage")
    if lineage:
        console.print("[bold]lineage[/bold] (lmexpand.json):")
        console.print_json(json.dumps(lineage))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting (so tests can call it)."""
    try:
        rv = cli.main(args=list(argv) if argv is not None else None, prog_name="lmexpand", standalone_mode=False)
    except LmexpandError as e:
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return EXIT_USER
    except click.Abort:
        click.echo("aborted", err=True)
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception:
        import traceback

        traceback.print_exc()
        click.echo(
            "error: internal error in lmexpand (the traceback above); please report it with the command you ran.",
            err=True,
        )
        return EXIT_INTERNAL
    return rv if isinstance(rv, int) else EXIT_OK


def entry_point() -> None:  # console script
    sys.exit(main())
