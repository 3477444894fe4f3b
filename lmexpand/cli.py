"""The ``lmexpand`` command line.

Each subcommand parses its flags, calls one stage function (:mod:`lmexpand.stages`, the
same ones ``lmexpand run`` calls for a recipe's stages) and prints what it returns. Heavy
libraries (torch, transformers) are imported inside the commands, so ``--help`` and
``--version`` are fast.
Logs go to stderr; machine-readable output (``--json``) to stdout. Exit codes: 0 ok,
2 user error (message, no traceback), 1 internal error (traceback: please report it).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import click

from lmexpand import __version__
from lmexpand.options import Command, Group, LazyParamsCommand, option_for_field
from lmexpand.process import run_command, setup_logging

log = logging.getLogger("lmexpand")

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=Group, context_settings=_CONTEXT)
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
    setup_logging(verbose, quiet)


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
    from lmexpand.stages.inspect import inspect_model, print_summary

    summary = inspect_model(source, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        print_summary(summary)


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


def _surgery_command(method) -> click.Command:
    if method.variadic:  # MODEL MODEL [MODEL...] OUT: split by split_models_and_out
        params: list[click.Parameter] = [click.Argument(["models_and_out"], nargs=-1,
                                                        metavar=" ".join(method.sources) + " [...] OUT")]
    else:
        params = [click.Argument([s.lower()]) for s in method.sources]
        params.append(click.Argument(["out"], required=False))
    params += [option_for_field(n, f) for n, f in method.config.model_fields.items()]
    params += [
        click.Option(["--dry-run"], is_flag=True, help="Print the plan (layer map, parameters, bytes, training memory); write nothing."),
        click.Option(["--json", "as_json"], is_flag=True, help="Machine-readable output on stdout."),
        click.Option(["--force"], is_flag=True, help="Replace OUT if it exists and is not empty."),
        click.Option(["--max-shard-size"], default="5GB", show_default=True, help="Largest output shard (e.g. 2GB, 500MB)."),
        click.Option(["--allow-pickle"], is_flag=True, help="Accept pytorch_model.bin (pickle) sources. Only for trusted files."),
    ]

    def run(**kw) -> None:
        from lmexpand.stages.surgery import SurgeryRequest, print_plan, run_surgery, split_models_and_out

        if method.variadic:
            sources, out = split_models_and_out(method, list(kw.pop("models_and_out")), kw["dry_run"])
        else:
            sources, out = [kw.pop(s.lower()) for s in method.sources], kw.pop("out")
        flags = {k: kw.pop(k) for k in ("dry_run", "as_json", "force", "allow_pickle", "max_shard_size")}
        result = run_surgery(SurgeryRequest(method, sources, out, kw, dry_run=flags["dry_run"], force=flags["force"],
                                            max_shard_size=flags["max_shard_size"], allow_pickle=flags["allow_pickle"]))
        if result.output is None and not flags["as_json"]:
            print_plan(result.summary)
        elif result.output is None or flags["as_json"]:
            click.echo(json.dumps(result.summary if result.output is None else
                                  {"output": str(result.output), **result.summary}, indent=2))

    return Command(method.name, params=params, callback=run, help=method.help, short_help=method.summary,
                   context_settings=_CONTEXT)


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
    from lmexpand.stages.merge import MergeRequest, merge_text, run_merge

    result = run_merge(MergeRequest(config, out, dry_run=dry_run, seed=seed, threads=threads, device=device,
                                    match_mergekit=match_mergekit, eval_data=eval_data, eval_tokens=eval_tokens,
                                    force=force, max_shard_size=max_shard_size, allow_pickle=allow_pickle))
    if result.output is None:
        click.echo(result.preview if result.summary is None else
                   json.dumps(result.summary, indent=2) if as_json else merge_text(result.summary))
    elif as_json:
        click.echo(json.dumps({"output": str(result.output), **result.summary}, indent=2))


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

    return [option_for_field(n, f) for n, f in TrainConfig.model_fields.items() if n not in _TRAIN_MANUAL]


@cli.command(cls=LazyParamsCommand, params_factory=_train_config_params, context_settings=_CONTEXT)
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
    from lmexpand.stages.train import run_training, train_config_from_flags

    recipe, section = kw.pop("recipe"), None
    if recipe:  # its train section gives the defaults
        from lmexpand.recipe import load_recipe_section

        section = load_recipe_section(Path(recipe), "train")
    cfg, resume, force = train_config_from_flags(kw, section)
    out_model = run_training(cfg, resume=resume, force=force)
    log.info("trained model: %s", out_model)
    click.echo(str(out_model))


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
    from lmexpand.stages.evaluate import eval_request_from_flags, run_evaluation

    lm_eval = {"tasks": lm_eval_tasks, "include": lm_eval_include, "limit": lm_eval_limit,
               "batch_size": lm_eval_batch_size, "fewshot": lm_eval_fewshot, "device": lm_eval_device}
    results = run_evaluation(eval_request_from_flags(model, data, template, text_field, base, compare, out,
                                                     max_tokens, seq_len, stride, no_samples, lm_eval, allow_pickle,
                                                     force))
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
    from lmexpand.eval.generation import GenerationSettings
    from lmexpand.stages.generate import deferral_line, generation_record, run_generation

    settings = GenerationSettings(max_new_tokens=max_new_tokens, chat=chat, system=system, sample=sample,
                                  temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                  stop_at_eos=not ignore_eos, threshold=threshold, show_deferrals=show_deferrals)
    stream = None if as_json or len(prompts) > 1 or show_deferrals else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    result = run_generation(model, prompts, settings, allow_pickle=allow_pickle, on_text=stream)
    if as_json:
        click.echo(json.dumps(generation_record(prompts, result), indent=2))
    elif stream is not None:
        click.echo("")
    elif len(prompts) == 1:
        click.echo((result.marked or result.texts)[0])
    else:
        for p, t in zip(prompts, result.marked or result.texts):
            click.echo(f"### {p}\n{t}\n")
    if result.deferred is not None:
        log.info("%s", deferral_line(result))
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
    from lmexpand.stages.export import run_export

    path = run_export(source, out, eval_dir=Path(eval_dir) if eval_dir else None, max_shard_size=max_shard_size,
                      force=force, allow_pickle=allow_pickle)
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

    from lmexpand.checkpoint.verify import human_report
    from lmexpand.stages.verify import require_ok, verify_model

    path, report = verify_model(source, values=values, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    else:
        for line in human_report(report):
            click.echo(line)
    require_ok(path, report)


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
    return run_command(cli, argv)


def entry_point() -> None:  # console script
    sys.exit(main())
