"""The merge stage: a mergekit configuration, as is, on lmexpand's streaming executor
(``lmexpand merge CONFIG OUT`` and a recipe's ``surgery: {method: merge}``), the greedy soup
included: its candidates are ranked by held-out perplexity, scored here with lmexpand's
evaluation (the soup itself, in :mod:`lmexpand.expand.merging.soup`, takes any scorer)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from lmexpand.errors import UsageError

log = logging.getLogger("lmexpand")


@dataclass(frozen=True)
class MergeRequest:
    config: Union[str, Path, dict]  # a mergekit YAML file, or its content inline (recipes)
    out: Path | str | None
    dry_run: bool = False
    seed: int | None = None
    threads: int | None = None  # default: CPU cores, at most 8
    device: str = "cpu"
    match_mergekit: bool = False
    eval_data: str | None = None  # greedy_soup: held-out text ranking the candidates
    eval_tokens: int = 16384
    force: bool = False
    max_shard_size: str | int = "5GB"
    allow_pickle: bool = False
    # the command's log lines (notes, the seed drawn, what was written); a recipe's run
    # reports per stage instead
    announce: bool = True


@dataclass
class PreparedMerge:
    """A merge checked from headers, before any value is read: its models opened and, for a
    method other than greedy_soup, its plan (a soup is planned once its candidates are
    scored)."""

    request: MergeRequest
    resolved: Any  # lmexpand.expand.merging.planner.Resolved
    where: str
    text: str  # the configuration's source text (recorded in lmexpand.json)
    device: str
    threads: int
    max_shard_size: int
    plan: Any = None  # lmexpand.expand.plan.Plan; None for a greedy soup

    @property
    def is_soup(self) -> bool:
        return self.resolved.method is None


@dataclass(frozen=True)
class MergeResult:
    summary: dict[str, Any] | None  # see :func:`merge_summary`; None: a soup's dry run
    output: Path | None  # None: a dry run
    preview: str = ""  # a soup's dry run: what it would score


def prepare_merge(request: MergeRequest, *, check_out: bool = True) -> PreparedMerge:
    """Load the configuration, open its models and check OUT (``check_out``: a recipe checks
    every output against the others itself); a greedy soup's candidates are checked, any
    other method is planned."""
    from lmexpand.checkpoint.writer import check_output
    from lmexpand.expand.merging import load_config
    from lmexpand.expand.merging.planner import open_models, resolve_device
    from lmexpand.units import parse_size

    shard = parse_size(request.max_shard_size, "--max-shard-size")
    device = resolve_device(request.device)
    if request.out is None and not request.dry_run:
        raise UsageError("missing argument OUT (the output directory); or use --dry-run")
    threads = request.threads or max(1, min(8, os.cpu_count() or 1))
    file, where, text, directory = load_config(request.config)
    resolved = open_models(file, where, allow_pickle=request.allow_pickle, relative_to=directory)
    if check_out and request.out is not None:
        inputs = [("config", Path(request.config))] if not isinstance(request.config, dict) else []
        inputs += [("model", r.path) for r in resolved.readers]
        if request.eval_data:
            inputs.append(("--eval-data", Path(request.eval_data)))
        check_output(Path(request.out), inputs=inputs, force=request.force, label="OUT")
    prepared = PreparedMerge(request, resolved, where, text, device, threads, shard)
    if resolved.method is None:
        from lmexpand.expand.merging.soup import soup_inputs

        if not request.eval_data:
            raise UsageError("merge_method greedy_soup ranks its candidates by held-out perplexity: give --eval-data FILE")
        prepared.resolved = soup_inputs(resolved, where)
        return prepared
    if request.eval_data:
        raise UsageError("--eval-data is for merge_method: greedy_soup")
    prepared.plan = _plan(prepared, resolved)
    return prepared


def _plan(prepared: PreparedMerge, resolved: Any, soup_record: dict | None = None):
    """The merge's plan with its files (tokenizer, chat template), checked against the limits."""
    from lmexpand.expand.merging.files import add_files
    from lmexpand.expand.merging.planner import plan_merge

    request = prepared.request
    plan = plan_merge(resolved, prepared.where, seed=request.seed, source_text=prepared.text,
                      match_mergekit=request.match_mergekit, device=prepared.device)
    if soup_record is not None:
        plan.extra_lineage["merge"]["greedy_soup"] = soup_record
    add_files(plan, resolved, prepared.where)
    plan.validate()  # the output's sizes against the limits (a dry run says so too)
    return plan


def run_merge(request: MergeRequest, prepared: PreparedMerge | None = None) -> MergeResult:
    """Prepare (unless ``prepared`` already holds it), score a greedy soup's candidates, and
    write OUT atomically; a dry run returns the summary and writes nothing."""
    from lmexpand.expand.executor import execute

    prepared = prepared or prepare_merge(request)
    resolved, where = prepared.resolved, prepared.where
    plan = prepared.plan
    if prepared.is_soup:
        from lmexpand.expand.merging.soup import greedy_soup

        if request.dry_run:
            return MergeResult(None, None, f"greedy soup of {len(resolved.models)} candidates, scored on "
                               f"{request.eval_data} ({request.eval_tokens:,} tokens each); a dry run scores nothing")
        scorer = perplexity_scorer(request.eval_data, request.eval_tokens, resolved.readers[0].path)
        soup = greedy_soup(resolved, scorer, where, log=log.info)
        plan = _plan(prepared, soup.resolved, soup.record)
    summary = merge_summary(plan, prepared.threads)
    if request.dry_run:
        return MergeResult(summary, None)
    if request.announce:
        for note in plan.notes:
            log.info("note: %s", note)
        if plan.arguments.get("seed") is not None and request.seed is None:
            log.info("random method: seed %d (give --seed %d to repeat this merge)", plan.arguments["seed"],
                     plan.arguments["seed"])
    path = execute(plan, request.out, force=request.force, max_shard_size=prepared.max_shard_size,
                   threads=prepared.threads)
    if request.announce:
        log.info("wrote %s: %s parameters merged with %s from %d models (every tensor written checked finite)",
                 path, f"{summary['parameters']:,}", summary["merge_method"], len(summary["models"]))
    return MergeResult(summary, path)


def perplexity_scorer(eval_data: str, max_tokens: int, tokenizer_dir: Path):
    """model -> perplexity on the first ``max_tokens`` tokens of ``eval_data`` (windows of 256),
    tokenized once; the file and the tokenizer are checked now, before any model is scored."""
    from lmexpand.checkpoint.tokenizer import load_tokenizer
    from lmexpand.eval.perplexity import parse_text_set, perplexity, token_stream

    ids = token_stream(parse_text_set(eval_data), load_tokenizer(tokenizer_dir), max_tokens)
    if len(ids) < 64:
        raise UsageError(f"--eval-data {eval_data}: only {len(ids)} tokens; give more held-out text")
    return lambda model: perplexity(model, ids, seq_len=256, stride=256)["ppl"]


# -- the summary: what --dry-run and --json show -----------------------------------------------
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


def merge_text(s: dict) -> str:
    """The dry run's text."""
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
