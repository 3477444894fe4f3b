"""The ``lmexpand`` command line.

Each subcommand parses, validates and calls one library function. Heavy libraries (torch,
transformers) are imported inside the commands, so ``--help`` and ``--version`` are fast.
Logs go to stderr; machine-readable output (``--json``) to stdout. Exit codes: 0 ok,
2 user error (message, no traceback), 1 internal error (traceback: please report it).
"""

from __future__ import annotations

import json
import os
import logging
import sys
from pathlib import Path
from typing import Sequence

import click

from lmexpand import __version__
from lmexpand.errors import ConfigError, LmexpandError

log = logging.getLogger("lmexpand")

EXIT_OK, EXIT_INTERNAL, EXIT_USER, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class Terminated(BaseException):
    """SIGTERM (``kill``, a scheduler, a container stopping), raised in the main thread so
    that every clean-up a Ctrl-C runs (partial outputs removed, checkpoints kept) runs too."""


def _on_sigterm(signum, frame) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean-up: a second TERM does not interrupt it
    raise Terminated()


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
    _third_party_progress(verbose > 0)


# a user's own HF_HUB_DISABLE_PROGRESS_BARS (set before lmexpand started) is kept
_USER_SET_HF_BARS = "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ


def _third_party_progress(show: bool) -> None:
    """transformers' and the hub's own progress bars ("Loading weights" for every model
    loaded) only with -v; lmexpand's own progress is unaffected."""
    if _USER_SET_HF_BARS:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "0" if show else "1"  # read when transformers is imported
    if "transformers" in sys.modules:  # already imported (lmexpand called in-process)
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar() if show else hf_logging.disable_progress_bar()


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

    with open_source(source, allow_pickle=allow_pickle, need_family=False) as reader:
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
    if s.get("note"):
        console.print(f"[yellow]note:[/yellow] {s['note']}")
    lineage = s.get("lineage")
    if lineage:
        console.print("[bold]lineage[/bold] (lmexpand.json):")
        console.print_json(json.dumps(lineage))


# -- surgery ----------------------------------------------------------------------------
class _SurgeryGroup(click.Group):
    """Subcommands come from the method registry, loaded only when `surgery` is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from lmexpand.expand.registry import load_methods

        return sorted(load_methods())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from lmexpand.expand.registry import load_methods

        method = load_methods().get(name)
        return _surgery_command(method) if method else None


@cli.group(cls=_SurgeryGroup)
def surgery() -> None:
    """Expand a model: lmexpand surgery METHOD SOURCE OUT [options].

    Every method plans first (from the config and tensor headers), then streams the output
    into OUT atomically. --dry-run prints the plan and writes nothing.

    \b
    Example:
      lmexpand surgery llama-pro smollm2-135m out/pro --add 6 --dry-run
    """


def _option_for_field(name: str, field) -> click.Option:
    import types
    import typing

    from lmexpand.validation import flag_name

    annotation = field.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    is_optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1
    base = args[0] if is_optional else annotation
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    if isinstance(default, list):
        default = ",".join(map(str, default)) or None
    if isinstance(default, dict):
        default = None
    help_text = (field.description or "") + ("  [required]" if field.is_required() else
                                             "" if default is None else f"  [default: {default}]")
    flag = flag_name(name)
    if base is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=help_text)
    if typing.get_origin(base) is typing.Literal:
        return click.Option([flag, name], type=click.Choice([str(c) for c in typing.get_args(base)]), default=None, help=help_text)
    if typing.get_origin(base) is list and typing.get_args(base) == (int,):
        def split(ctx, param, value):
            if value is None:
                return None
            try:
                return [int(x) for x in value.split(",") if x.strip()]
            except ValueError:
                raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 3,7,11") from None

        return click.Option([flag, name], type=str, default=None, callback=split, help=help_text, metavar="I,J,...")
    click_type = {int: click.INT, float: click.FLOAT, str: click.STRING}.get(base, click.STRING)
    return click.Option([flag, name], type=click_type, default=None, help=help_text)


def _surgery_command(method) -> click.Command:
    if method.variadic:  # MODEL MODEL [MODEL...] OUT: split in _run_surgery
        params: list[click.Parameter] = [click.Argument(["models_and_out"], nargs=-1,
                                                        metavar=" ".join(method.sources) + " [...] OUT")]
    else:
        params = [click.Argument([s.lower()]) for s in method.sources]
        params.append(click.Argument(["out"], required=False))
    params += [_option_for_field(n, f) for n, f in method.config.model_fields.items()]
    params += [
        click.Option(["--dry-run"], is_flag=True, help="Print the plan (layer map, parameters, bytes, training memory); write nothing."),
        click.Option(["--json", "as_json"], is_flag=True, help="Machine-readable output on stdout."),
        click.Option(["--force"], is_flag=True, help="Replace OUT if it exists and is not empty."),
        click.Option(["--max-shard-size"], default="5GB", show_default=True, help="Largest output shard (e.g. 2GB, 500MB)."),
        click.Option(["--allow-pickle"], is_flag=True, help="Accept pytorch_model.bin (pickle) sources. Only for trusted files."),
    ]

    def run(**kw) -> None:
        _run_surgery(method, kw)

    return click.Command(method.name, params=params, callback=run, help=method.help,
                         short_help=method.summary, context_settings=_CONTEXT)


def _run_surgery(method, kw: dict) -> None:
    from lmexpand.checkpoint.sources import open_source
    from lmexpand.expand.executor import execute
    from lmexpand.expand.plan import plan_summary
    from lmexpand.expand.registry import parse_config
    from lmexpand.units import parse_size

    if method.variadic:
        sources, out = _split_models_and_out(method, list(kw.pop("models_and_out")), kw["dry_run"])
        kw["out"] = out
    else:
        sources = [kw.pop(s.lower()) for s in method.sources]
    out, dry_run, as_json = kw.pop("out"), kw.pop("dry_run"), kw.pop("as_json")
    force, allow_pickle = kw.pop("force"), kw.pop("allow_pickle")
    max_shard_size = parse_size(kw.pop("max_shard_size"), "--max-shard-size")
    if out is None and not dry_run:
        raise click.UsageError("missing argument OUT (the output directory); or use --dry-run")
    cfg = parse_config(method, {k: v for k, v in kw.items() if v is not None})
    readers = [open_source(s, allow_pickle=allow_pickle) for s in sources]
    plan = method.checked_plan(readers, cfg)
    summary = plan_summary(plan)
    if dry_run:
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        else:
            _print_plan(summary)
        return
    for note in plan.notes:
        log.info("note: %s", note)
    path = execute(plan, out, force=force, max_shard_size=max_shard_size, readers=readers)
    layers = f"{summary['num_layers']} layers, " if summary["num_layers"] else ""
    log.info("wrote %s: %s%s parameters (%s to train)%s", path, layers, f"{summary['parameters_total']:,}",
             f"{summary['parameters_new']:,}", ", function-preserving at init (by construction)"
             if plan.function_preserving else "")
    if plan.check_delta:
        from lmexpand.expand.executor import logit_delta

        summary["max_abs_logit_delta"] = delta = logit_delta(plan.sources[0], path)
        log.info("not exact at init: max |dlogit| vs the source = %.3g (fp32, fixed batch of 2x32 tokens)", delta)
    if as_json:
        click.echo(json.dumps({"output": str(path), **summary}, indent=2))


def _split_models_and_out(method, args: list[str], dry_run: bool) -> tuple[list[str], str | None]:
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


def _print_plan(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from lmexpand.expand.plan import compress_layer_map
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


# -- merge --------------------------------------------------------------------------------
@cli.command(context_settings=_CONTEXT)
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("out", required=False)
@click.option("--dry-run", is_flag=True, help="Print the resolved parameters per tensor group, bytes and memory; write nothing.")
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed of the random methods (dare_*, della*): mergekit's --random-seed.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads computing tensors  [default: CPU cores, at most 8]")
@click.option("--device", default="cpu", show_default=True, help="Where tensors are computed: cpu, cuda, cuda:N or auto (cuda if there is one); inputs are read and outputs written from the CPU, tensor by tensor.")
@click.option("--match-mergekit", is_flag=True, help="Magnitude trimming (ties) by mergekit's argsort, for its exact bytes where equal magnitudes tie at the threshold; default: O(n) selection, ties kept by lowest index.")
@click.option("--eval-data", default=None, help="Held-out text (.txt/.jsonl) ranking a greedy_soup's candidates by perplexity.")
@click.option("--eval-tokens", type=click.IntRange(min=64), default=16384, show_default=True, help="Tokens of --eval-data scored per candidate.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 2GB, 500MB).")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (pickle) inputs. Only for trusted files.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def merge(config: str, out: str | None, dry_run: bool, seed: int | None, threads: int | None, device: str,
          match_mergekit: bool, eval_data: str | None, eval_tokens: int, force: bool, max_shard_size: str,
          allow_pickle: bool, as_json: bool) -> None:
    """Merge models in weight space from a mergekit YAML file, as is.

    Methods: linear (SPHINX mix, uniform soup), task_arithmetic, slerp, nuslerp, multislerp,
    karcher, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear,
    sce, ram, ramplus_tl, nearswap, arcee_fusion, model_stock, passthrough, and greedy_soup
    (needs --eval-data). Everything is checked from headers before a value is read; tensors
    stream through worker threads.

    \b
    Examples:
      lmexpand merge sphinx.yaml out/mix --dry-run
      lmexpand merge ties.yaml out/ties --threads 8 --device auto
      lmexpand merge soup.yaml out/soup --eval-data valid.txt
    """
    import os

    from lmexpand.checkpoint.writer import check_output
    from lmexpand.expand.executor import execute
    from lmexpand.expand.merging import load_config
    from lmexpand.expand.merging.planner import open_models, resolve_device
    from lmexpand.units import parse_size

    shard = parse_size(max_shard_size, "--max-shard-size")
    device = resolve_device(device)
    if out is None and not dry_run:
        raise click.UsageError("missing argument OUT (the output directory); or use --dry-run")
    threads = threads or max(1, min(8, os.cpu_count() or 1))
    file, where, text, directory = load_config(config)
    resolved = open_models(file, where, allow_pickle=allow_pickle, relative_to=directory)
    inputs = [("config", Path(config))] + [("model", r.path) for r in resolved.readers]
    if eval_data:
        inputs.append(("--eval-data", Path(eval_data)))
    if out is not None:
        check_output(Path(out), inputs=inputs, force=force, label="OUT")
    soup = None
    if resolved.method is None:
        from lmexpand.expand.merging.soup import greedy_soup, soup_inputs

        if not eval_data:
            raise click.UsageError("merge_method greedy_soup ranks its candidates by held-out perplexity: give --eval-data FILE")
        resolved = soup_inputs(resolved, where)
        if dry_run:
            click.echo(f"greedy soup of {len(resolved.models)} candidates, scored on {eval_data} "
                       f"({eval_tokens:,} tokens each); a dry run scores nothing")
            return
        scorer = _perplexity_scorer(eval_data, eval_tokens, resolved.readers[0].path)
        soup = greedy_soup(resolved, scorer, where, log=log.info)
        resolved = soup.resolved
    elif eval_data:
        raise click.UsageError("--eval-data is for merge_method: greedy_soup")
    from lmexpand.expand.merging.files import add_files
    from lmexpand.expand.merging.planner import plan_merge

    plan = plan_merge(resolved, where, seed=seed, source_text=text, match_mergekit=match_mergekit, device=device)
    if soup is not None:
        plan.extra_lineage["merge"]["greedy_soup"] = soup.record
    add_files(plan, resolved, where)
    plan.validate()  # the output's sizes against the limits (a dry run says so too)
    summary = merge_summary(plan, threads)
    if dry_run:
        click.echo(json.dumps(summary, indent=2) if as_json else _merge_text(summary))
        return
    for note in plan.notes:
        log.info("note: %s", note)
    if plan.arguments.get("seed") is not None and seed is None:
        log.info("random method: seed %d (give --seed %d to repeat this merge)", plan.arguments["seed"],
                 plan.arguments["seed"])
    path = execute(plan, out, force=force, max_shard_size=shard, threads=threads)
    log.info("wrote %s: %s parameters merged with %s from %d models (every tensor written checked finite)", path,
             f"{summary['parameters']:,}", summary["merge_method"], len(summary["models"]))
    if as_json:
        click.echo(json.dumps({"output": str(path), **summary}, indent=2))


def merge_summary(plan, threads: int) -> dict:
    """Per tensor group (layer index folded into *): the op with its resolved parameters."""
    import re

    from lmexpand.units import human_bytes

    groups: dict[str, dict] = {}
    for t in plan.tensors:
        key = re.sub(r"\.\d+\.", ".*.", t.name)
        desc = t.op.describe()
        g = groups.setdefault(key, {"tensors": 0, "bytes": 0, "ops": {}})
        g["tensors"] += 1
        g["bytes"] += t.nbytes
        g["ops"][desc] = g["ops"].get(desc, 0) + 1
    largest = max((t.nbytes for t in plan.tensors), default=0)
    n_inputs = max((len(t.op.reads()) for t in plan.tensors), default=1)
    merge = plan.extra_lineage["merge"]
    memory = (n_inputs + 2) * largest * threads
    return {
        "merge_method": merge["method"], "models": merge["models"], "seed": merge["seed"],
        "tensors": len(plan.tensors), "parameters": plan.total_params, "bytes_to_write": plan.total_bytes,
        "threads": threads, "largest_tensor_bytes": largest,
        "memory_estimate_bytes": memory,
        "memory_estimate": f"~{human_bytes(memory)} = ({n_inputs} inputs + 2) x largest tensor "
                           f"{human_bytes(largest)} x {threads} threads, plus the runtime",
        "groups": groups, "notes": plan.notes,
    }


def _merge_text(s: dict) -> str:
    from lmexpand.units import human_bytes

    lines = [f"merge plan: {s['merge_method']} of {len(s['models'])} models (dry run, nothing written)"]
    for i, m in enumerate(s["models"]):
        lines.append(f"  m{i}: {m}")
    lines.append(f"{s['tensors']} tensors, {s['parameters']:,} parameters, {human_bytes(s['bytes_to_write'])} to write")
    lines.append(f"memory: {s['memory_estimate']}")
    for key, g in s["groups"].items():
        for desc, n in g["ops"].items():
            lines.append(f"  {key} ({n}x): {desc}")
    lines += [f"note: {n}" for n in s["notes"]]
    return "\n".join(lines)


def _perplexity_scorer(eval_data: str, max_tokens: int, tokenizer_dir: Path):
    """model -> perplexity on the first ``max_tokens`` tokens of ``eval_data`` (windows of 256),
    tokenized once; the file and the tokenizer are checked now, before any model is scored."""
    from lmexpand.checkpoint.tokenizer import load_tokenizer
    from lmexpand.eval.perplexity import parse_text_set, perplexity, token_stream

    ids = token_stream(parse_text_set(eval_data), load_tokenizer(tokenizer_dir), max_tokens)
    if len(ids) < 64:
        raise click.UsageError(f"--eval-data {eval_data}: only {len(ids)} tokens; give more held-out text")
    return lambda model: perplexity(model, ids, seq_len=256, stride=256)["ppl"]


@cli.command("extract-lora", context_settings=_CONTEXT)
@click.argument("tuned")
@click.argument("base")
@click.argument("out")
@click.option("--rank", type=click.IntRange(min=1), required=True, help="LoRA rank r (per module at most its smaller dimension).")
@click.option("--device", default="cpu", show_default=True, help="Where the SVDs run: cpu, cuda, cuda:N or auto.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (pickle) inputs. Only for trusted files.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def extract_lora_command(tuned: str, base: str, out: str, rank: int, device: str, force: bool, allow_pickle: bool,
                         as_json: bool) -> None:
    """Extract a fine-tune's change over its base as a PEFT LoRA adapter.

    Truncated SVD of each linear projection's weight change (rank R), changed biases in
    lora_B.bias, other changed tensors (embeddings, norms, head) stored whole; prints the
    relative error per module. Load it with peft: PeftModel.from_pretrained(base_model, OUT).

    \b
    Example:
      lmexpand extract-lora out/full-ft smollm2-135m out/full-ft-lora --rank 32
    """
    from lmexpand.expand.merging.extract_lora import extract_lora, summary_line
    from lmexpand.expand.merging.planner import resolve_device

    report = extract_lora(tuned, base, out, rank, force=force, device=resolve_device(device),
                          allow_pickle=allow_pickle, progress=log.debug)
    if as_json:
        click.echo(json.dumps({"output": out, **report}, indent=2))
    else:
        log.info("wrote %s", summary_line(report, Path(out)))


# -- train --------------------------------------------------------------------------------
_TRAIN_MANUAL = {"model", "data", "out", "lora", "betas", "trainable", "extra_trainable"}


def _train_config_params() -> list[click.Parameter]:
    """One option per scalar TrainConfig field (the others are spelled out on the command)."""
    from lmexpand.train.config import TrainConfig

    return [_option_for_field(n, f) for n, f in TrainConfig.model_fields.items() if n not in _TRAIN_MANUAL]


class _LazyParamsCommand(click.Command):
    """Builds part of its options on first use, so `lmexpand --help` stays light."""

    def __init__(self, *args, params_factory, **kwargs):
        super().__init__(*args, **kwargs)
        self._params_factory = params_factory

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._params_factory is not None:
            self.params.extend(self._params_factory())
            self._params_factory = None
        return super().get_params(ctx)


@cli.command(cls=_LazyParamsCommand, params_factory=_train_config_params, context_settings=_CONTEXT)
@click.option("--model", "model", help="Expanded model directory (with lmexpand.json), or an embedded name.")
@click.option("--data", "data", multiple=True, help="Training data: .txt, .jsonl, .parquet, .arrow, .csv or a datasets.save_to_disk directory; repeat for several; FILE:WEIGHT for a weighted mixture (math.jsonl:0.7).")
@click.option("--text-field", default=None, help="Field (column) with the text  [default: text]")
@click.option("--template", default=None, help="Template over fields, e.g. 'Question: {question}\\nAnswer: {answer}'.")
@click.option("--chat", type=click.Choice(["auto", "messages", "alpaca", "sharegpt"]), default=None, help="Records are conversations, rendered with the chat template; loss on assistant turns only.")
@click.option("--loss-from", default=None, help="Train only on what follows this text in each document (e.g. 'Answer:'); the prompt is context.")
@click.option("--out", "out", help="Run directory: metrics, checkpoints, and the final model in OUT/model.")
@click.option("--trainable", default=None, help="new (default: lmexpand.json's new_parameters), all, none, or comma-separated globs.")
@click.option("--extra-trainable", default=None, help="Comma-separated globs added to the trainable set, e.g. '*norm*'.")
@click.option("--lora", "use_lora", is_flag=True, help="Add LoRA adapters to frozen linear modules (peft).")
@click.option("--lora-r", type=int, default=None, help="LoRA rank  [default: 8]")
@click.option("--lora-targets", default=None, help="Comma-separated module names for LoRA  [default: q_proj,k_proj,v_proj,o_proj]")
@click.option("--recipe", type=click.Path(dir_okay=False), default=None, help="YAML recipe; its `train` section gives defaults that flags override.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--resume-from", type=click.Path(file_okay=False), default=None, help="Continue from this checkpoint directory.")
@click.option("--force", is_flag=True, help="Start over in a non-empty --out (deletes it).")
def train(**kw) -> None:
    """Train only the new parameters of an expanded model (continued pretraining).

    Everything that is not trainable stays bitwise unchanged; the final model in OUT/model
    copies those tensors from the source byte for byte. Any option of the training
    configuration can be given (see `lmexpand train --help`); run multi-GPU or multi-node
    with `accelerate launch -m lmexpand train ...`.

    \b
    Examples:
      lmexpand train --model out/pro --data ../shared/data/gsm8k/train.jsonl \\
          --template 'Question: {question}\\nAnswer: {answer}' --out runs/pro --max-steps 200
      lmexpand train --model out/pro --data corpus.txt --out runs/pro --resume
      accelerate launch --config_file recipes/accelerate/ddp.yaml -m lmexpand train --model out/pro ...
    """
    from lmexpand.train.loop import train as run_training

    cfg, resume, force = _train_config_from_cli(kw)
    out_model = run_training(cfg, resume=resume, force=force)
    log.info("trained model: %s", out_model)
    click.echo(str(out_model))


def _train_config_from_cli(kw: dict):
    from pathlib import Path

    from lmexpand.train.config import parse_train_config

    values: dict = {}
    style = "flag"
    recipe = kw.pop("recipe")
    if recipe:
        from lmexpand.recipe import load_recipe_section

        values = load_recipe_section(Path(recipe), "train")
        style = "key"
    text_field, template, loss_from = kw.pop("text_field"), kw.pop("template"), kw.pop("loss_from")
    chat = kw.pop("chat")
    data = kw.pop("data")
    if data:
        values["data"] = [_data_argument(d) for d in data]
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
        raise click.BadParameter(f"{lora_r}: a LoRA rank is at least 1 (8, 16, 64 are common)",
                                 param_hint="--lora-r")
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
            raise click.UsageError(f"missing --{required}")
    if "data" not in values:
        raise click.UsageError("missing --data (a .txt, .jsonl, .parquet, .arrow or .csv file, or a save_to_disk "
                               "directory)")
    cfg = parse_train_config(values, style=style)
    return cfg, (Path(resume_from) if resume_from else resume), force


def _data_argument(text: str) -> dict:
    """--data FILE or FILE:WEIGHT (an existing file whose name ends in :NUMBER is a file)."""
    import math
    import re
    from pathlib import Path

    m = re.fullmatch(r"(.+):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan)", text)
    if m is None or Path(text).exists():
        return {"path": text}
    weight = float(m.group(2))
    if not (math.isfinite(weight) and weight > 0):
        raise click.BadParameter(f"{text!r}: the mixture weight {m.group(2)} of {m.group(1)} is not a positive finite "
                                 "number. Give e.g. --data math.jsonl:0.7 --data general.txt:0.3",
                                 param_hint="--data")
    return {"path": m.group(1), "weight": weight}


# -- eval ---------------------------------------------------------------------------------
@cli.command(name="eval", context_settings=_CONTEXT)
@click.argument("model")
@click.option("--data", "data", multiple=True, required=True, help="NAME=FILE (.txt or .jsonl) to score; repeat.")
@click.option("--template", default=None, help="JSONL template for every .jsonl set, e.g. 'Question: {question}\\nAnswer: {answer}'.")
@click.option("--text-field", default="text", show_default=True, help="JSONL field with the text.")
@click.option("--base", default=None, help="Base model to compare with (perplexity rows and max |Δlogit|).")
@click.option("--compare", multiple=True, help="LABEL=MODEL: another model to score, e.g. expanded=out/pro.")
@click.option("--out", required=True, help="Directory for results.json, report.md and the plots.")
@click.option("--max-tokens", type=int, default=16384, show_default=True, help="Tokens scored per set.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Window length.")
@click.option("--stride", type=int, default=None, help="Window stride (default: --seq-len, disjoint windows).")
@click.option("--no-samples", is_flag=True, help="Skip the sample generations.")
@click.option("--lm-eval", "lm_eval_tasks", default=None, help="Also run lm-evaluation-harness TASKS (comma-separated; needs the lm-eval extra; offline: local task data or --lm-eval-include).")
@click.option("--lm-eval-include", default=None, help="Directory of task YAML files for --lm-eval (local tasks).")
@click.option("--lm-eval-limit", type=float, default=None, help="Documents per --lm-eval task (a fraction if below 1).")
@click.option("--lm-eval-batch-size", default=None, help="Batch size for --lm-eval (a number or 'auto')  [default: 1]")
@click.option("--lm-eval-fewshot", type=int, default=None, help="Few-shot examples for --lm-eval  [default: each task's own]")
@click.option("--lm-eval-device", default=None, help="Device for --lm-eval: cpu, cuda, cuda:N  [default: cuda if available, else cpu]")
@click.option("--json", "as_json", is_flag=True, help="Print results.json on stdout.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out (its report files are replaced).")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (pickle) weights for MODEL, --base and --compare (loaded weights-only). Only for trusted files.")
def eval_command(model: str, data, template, text_field, base, compare, out, max_tokens, seq_len, stride,
                 no_samples, lm_eval_tasks, lm_eval_include, lm_eval_limit, lm_eval_batch_size, lm_eval_fewshot,
                 lm_eval_device, as_json, force, allow_pickle) -> None:
    """Perplexity per text set against a base, function preservation, parameters, samples.

    MODEL is a model directory, a training run directory (its model/ and metrics.jsonl are
    used: the report then plots the loss curves), or an embedded name.

    \b
    Example:
      lmexpand eval runs/pro --base smollm2-135m --compare expanded=out/pro \\
          --data domain=../shared/data/gsm8k/test.jsonl \\
          --data general=../shared/data/general-english/openstax-humanities/valid.txt \\
          --template $'Question: {question}\\nAnswer: {answer}' --out reports/pro
    """
    from pathlib import Path

    from lmexpand.eval.perplexity import parse_text_set
    from lmexpand.eval.report import run_eval

    if max_tokens <= 0 or seq_len <= 1 or (stride is not None and stride <= 0):
        raise ConfigError("--max-tokens, --seq-len and --stride must be positive (--seq-len at least 2).")
    pairs = []
    for c in compare:
        label, sep, spec = c.partition("=")
        if not sep or not label or not spec:
            raise ConfigError(f"--compare {c!r}: use LABEL=MODEL, e.g. expanded=out/pro")
        pairs.append((label, spec))
    harness = None
    if lm_eval_tasks is not None:
        from lmexpand.eval.harness import LmEvalSettings

        harness = LmEvalSettings.parse(lm_eval_tasks, include=lm_eval_include, limit=lm_eval_limit,
                                       batch_size=lm_eval_batch_size, device=lm_eval_device, num_fewshot=lm_eval_fewshot)
    elif any(v is not None for v in (lm_eval_include, lm_eval_limit, lm_eval_batch_size, lm_eval_fewshot,
                                      lm_eval_device)):
        raise ConfigError("the --lm-eval-* options set up lm-evaluation-harness: add --lm-eval TASKS "
                          "(e.g. --lm-eval hellaswag), or leave them out.")
    sets = [parse_text_set(d, template, text_field) for d in data]
    results = run_eval(model, sets, Path(out), base=base, compare=pairs, max_tokens=max_tokens, seq_len=seq_len,
                       stride=stride, samples=not no_samples, allow_pickle=allow_pickle, lm_eval=harness, force=force)
    log.info("report: %s", Path(out) / "report.md")
    if as_json:
        click.echo(json.dumps(results, indent=2))


# -- generate -----------------------------------------------------------------------------
@cli.command(context_settings=_CONTEXT)
@click.argument("model")
@click.option("--prompt", "prompts", multiple=True, help="Text to continue; repeat for a batch (left-padded).  [required]")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Tokens to generate per prompt.")
@click.option("--chat", is_flag=True, help="Format each prompt with the tokenizer's chat template (a user turn).")
@click.option("--system", default=None, help="With --chat: a system message before the prompt.")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="With --sample: softmax temperature.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="With --sample: nucleus sampling mass (0, 1].")
@click.option("--top-k", type=int, default=0, show_default=True, help="With --sample: keep the K likeliest tokens (0: off).")
@click.option("--seed", type=int, default=0, show_default=True, help="With --sample: random seed.")
@click.option("--ignore-eos", is_flag=True, help="Generate --max-new-tokens even past an end-of-sequence token.")
@click.option("--threshold", type=float, default=None, help="Co-LLM: deferral threshold for this run (the assistant writes where the gate > it)  [default: the model's]")
@click.option("--show-deferrals", is_flag=True, help="Co-LLM: mark the tokens the assistant produced as «token».")
@click.option("--json", "as_json", is_flag=True, help="Print {prompts, texts, tokens, seconds, tokens_per_second} as JSON.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (pickle) weights (weights-only). Only for trusted files.")
def generate(model: str, prompts, max_new_tokens, chat, system, sample, temperature, top_p, top_k, seed, ignore_eos,
             threshold, show_deferrals, as_json, allow_pickle) -> None:
    """Generate text from any model lmexpand can load: stock, expanded, MoE, CALM, composed.

    MODEL is a model directory, a training run directory (its model/), or an embedded
    name. One prompt streams its continuation to stdout; several run as one batch. The
    speed (new tokens per second) goes to stderr at the end.

    \b
    Examples:
      lmexpand generate smollm2-135m --prompt "The capital of France is"
      lmexpand generate out/sum --chat --prompt "What is 12 * 7?" --max-new-tokens 48
      lmexpand generate out/cd --prompt "Once upon a time" --sample --top-p 0.9 --seed 1
    """
    from lmexpand.eval.generation import GenerationSettings, generate as run_generate
    from lmexpand.export import resolve_export_source

    settings = GenerationSettings(max_new_tokens=max_new_tokens, chat=chat, system=system, sample=sample,
                                  temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                  stop_at_eos=not ignore_eos, threshold=threshold, show_deferrals=show_deferrals)
    settings.check()
    if not prompts:
        raise ConfigError("give a prompt: --prompt TEXT (repeat it for a batch).")
    model_dir = resolve_export_source(model)
    stream = None if as_json or len(prompts) > 1 or show_deferrals else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    result = run_generate(model_dir, list(prompts), settings, allow_pickle=allow_pickle, on_text=stream)
    if as_json:
        click.echo(json.dumps({"prompts": list(prompts), "texts": result.texts, "tokens": result.new_tokens,
                               **({"deferred": result.deferred} if result.deferred is not None else {}),
                               "seconds": round(result.seconds, 3),
                               "tokens_per_second": round(result.tokens_per_second, 2)}, indent=2))
    elif stream is not None:
        click.echo("")
    elif len(prompts) == 1:
        click.echo((result.marked or result.texts)[0])
    else:
        for p, t in zip(prompts, result.marked or result.texts):
            click.echo(f"### {p}\n{t}\n")
    if result.deferred is not None:
        n = sum(len(r) for r in result.deferred)
        log.info("deferred %d of %d tokens to the assistant (%.0f %%)", sum(map(sum, result.deferred)), n,
                 100 * sum(map(sum, result.deferred)) / max(n, 1))
    log.info("%d new tokens in %.2f s: %.1f tokens/s", result.new_tokens, result.seconds, result.tokens_per_second)


# -- export -------------------------------------------------------------------------------
@cli.command(context_settings=_CONTEXT)
@click.argument("source")
@click.argument("out")
@click.option("--eval", "eval_dir", default=None, help="An `lmexpand eval` output dir whose table goes into the model card (default: RUN/eval if present).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (pickle) weights (loaded weights-only; written as safetensors). Only for trusted files.")
def export(source: str, out: str, eval_dir: str | None, max_shard_size: str, force: bool, allow_pickle: bool) -> None:
    """Write a clean Hugging Face model directory with a model card.

    SOURCE is a model directory or a training run directory (its model/). Tensors are
    streamed into fresh safetensors shards; the config loses private keys; tokenizer,
    chat template and generation config come along; README.md records the lineage and the
    evaluation table.

    \b
    Example:
      lmexpand export runs/pro exported/smollm2-pro-math --eval reports/pro
    """
    from pathlib import Path

    from lmexpand.export import export_model
    from lmexpand.units import parse_size

    path = export_model(source, out, force=force, eval_dir=Path(eval_dir) if eval_dir else None,
                        max_shard_size=parse_size(max_shard_size, "--max-shard-size"), allow_pickle=allow_pickle)
    log.info("exported: %s", path)
    click.echo(str(path))


@cli.command(context_settings=_CONTEXT)
@click.argument("source")
@click.option("--values", type=click.Choice(["written", "new", "all", "none"]), default="written", show_default=True,
              help="Which tensors to scan for NaN/Inf: every tensor lmexpand wrote (the files lmexpand.json records), "
                   "those it lists as new, all, or none.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (pickle) weights (loaded weights-only). Only for trusted files.")
def verify(source: str, values: str, as_json: bool, allow_pickle: bool) -> None:
    """Check a model directory: shard sha256 against lmexpand.json, tensors against the config.

    Recomputes the sha256 of every weight file lmexpand recorded when it wrote SOURCE;
    checks that the tensor names and shapes are exactly what the config's architecture
    expects (built on the meta device, nothing allocated); scans every tensor lmexpand wrote
    (or the new ones, or all) for NaN/Inf. Exit code 0 when all pass, 2 with the list of problems otherwise.

    \b
    Example:
      lmexpand verify out/pro
    """
    from dataclasses import asdict

    from lmexpand.checkpoint.sources import open_source
    from lmexpand.checkpoint.verify import human_report
    from lmexpand.checkpoint.verify import verify as run_verify
    from lmexpand.errors import CheckpointError

    with open_source(source, need_family=False, allow_pickle=allow_pickle) as reader:
        path = reader.path
    report = run_verify(path, values=values, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        for line in human_report(report):
            click.echo(line)
    if not report.ok:
        only_values = all("NaN/Inf values" in p for p in report.problems)
        if only_values and report.hashes == "match":
            # the files are what lmexpand wrote: the values came with them (source or training)
            raise CheckpointError(
                f"{path}: {len(report.problems)} tensor(s) hold NaN/Inf, first: {report.problems[0]}. The files are "
                "exactly as written (their sha256 match), so the values came from the source model or the step that "
                "wrote them: check the source with `lmexpand verify SOURCE --values all` and re-run that step.")
        raise CheckpointError(
            f"{path}: {len(report.problems)} problem(s), first: {report.problems[0]}. The directory is damaged "
            "or was modified after lmexpand wrote it: restore it or re-run the step that wrote it.")


# -- run --------------------------------------------------------------------------------
@cli.command(context_settings=_CONTEXT)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Validate the recipe and exit (no work).")
def run(recipe: str, check: bool) -> None:
    """Run a whole job from one YAML recipe: surgery, train, eval, export.

    Every section is optional; the whole recipe is validated before any work. Stages whose
    inputs did not change since they completed are skipped, so re-running a crashed job
    continues where it stopped (training resumes from its last checkpoint).

    \b
    Example:
      lmexpand run recipes/quickstart.yaml
      lmexpand run recipes/llama-pro.yaml --check
    """
    from pathlib import Path

    from lmexpand.recipe import load_job, run_job

    job = load_job(Path(recipe))
    if check:
        log.info("%s: valid", recipe)
        return
    outputs = run_job(job)
    for stage, path in outputs.items():
        log.info("%s: %s", stage, path)
    click.echo(json.dumps(outputs, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting (so tests can call it)."""
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
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
    except (KeyboardInterrupt, click.Abort):  # click turns Ctrl-C into Abort
        click.echo("interrupted (Ctrl-C): stopped; no half-written output was left in place (a training run keeps its "
                   "checkpoints for --resume) and the inputs are untouched", err=True)
        return EXIT_INTERRUPTED
    except Terminated:
        click.echo("terminated (SIGTERM): stopped; no half-written output was left in place (a training run keeps its "
                   "checkpoints for --resume) and the inputs are untouched", err=True)
        return EXIT_TERMINATED
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
