"""Optional bridge to lm-evaluation-harness (`pip install lm-eval`; not a dependency).

An lmexpand output is a plain Hugging Face directory, so the harness's own command works:

    lm_eval --model hf --model_args pretrained=runs/pro/model,dtype=float32 --tasks gsm8k --batch_size 8

`lmexpand eval --lm-eval TASKS` runs the harness in-process on the model the report has just
scored (the same object: composed models, CALM and Co-LLM included), on the device lmexpand
picks (CUDA when there is one, else the CPU) or ``--lm-eval-device``, and puts its scores
into ``results.json`` and ``report.md`` (the harness's full output goes to ``lm_eval.json``).

lmexpand never downloads: the harness runs with the Hub and datasets offline, so a task's
data must be in the local datasets cache, or the task must be a local YAML file
(``--lm-eval-include DIR``) whose ``dataset_path``/``data_files`` point at local files.
Everything that can be checked is checked before the perplexity work starts: the harness is
installed, the include directory holds task YAML files, every task name exists, every task's
data loads, the device exists.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmexpand.errors import ConfigError

_INSTALL = ("--lm-eval needs lm-evaluation-harness, which is not installed here: `pip install lm-eval` "
            "(or `pip install -e '.[lm-eval]'`). Or run the harness yourself on the model directory: "
            "lm_eval --model hf --model_args pretrained=MODEL_DIR --tasks TASKS")


@dataclass(frozen=True)
class LmEvalSettings:
    """What ``--lm-eval*`` asked for. ``batch_size`` is a count or 'auto'; ``limit`` a
    number of documents per task (>= 1) or a fraction of each task (< 1); ``device`` None
    means lmexpand's choice (CUDA if available, else CPU)."""

    tasks: tuple[str, ...]
    include: Path | None = None
    limit: float | None = None
    batch_size: int | str = 1
    device: str | None = None
    num_fewshot: int | None = None

    @classmethod
    def parse(cls, tasks: str, *, include: str | None = None, limit: float | None = None,
              batch_size: str | None = None, device: str | None = None, num_fewshot: int | None = None) -> "LmEvalSettings":
        names = tuple(t.strip() for t in tasks.split(",") if t.strip())
        if not names:
            raise ConfigError(f"--lm-eval {tasks!r}: name at least one task, e.g. --lm-eval hellaswag,arc_easy.")
        if limit is not None and not limit > 0:
            raise ConfigError(f"--lm-eval-limit {limit}: give a positive number of documents per task "
                              "(e.g. 100) or a fraction below 1 (e.g. 0.1).")
        if limit is not None and limit >= 1 and limit != int(limit):
            raise ConfigError(f"--lm-eval-limit {limit}: a count of documents is a whole number (or a fraction below 1).")
        batch_size = batch_size or "1"
        size: int | str = batch_size
        if batch_size != "auto":
            try:
                size = int(batch_size)
            except ValueError:
                size = 0
            if size < 1:
                raise ConfigError(f"--lm-eval-batch-size {batch_size!r}: a positive whole number or 'auto'.")
        if num_fewshot is not None and num_fewshot < 0:
            raise ConfigError(f"--lm-eval-fewshot {num_fewshot}: zero or more examples.")
        inc = Path(include) if include else None
        return cls(names, inc, limit, size, device, num_fewshot)


def _offline() -> None:
    """No downloads at run time: the harness reads the Hub and datasets caches only."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")


def _quiet_unless_verbose() -> None:
    """The harness's per-task warnings and the datasets library's bars only with -v (the CLI
    turns third-party bars off through HF_HUB_DISABLE_PROGRESS_BARS); the harness's own
    progress over its requests stays: it is the progress of the work asked for."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        return
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def _device(settings: LmEvalSettings) -> str:
    import torch

    want = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kind = want.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--lm-eval-device {want}: this torch sees no CUDA device. Use --lm-eval-device cpu "
                          "(or leave it out: lmexpand picks CUDA only when there is one).")
    if kind not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"--lm-eval-device {want!r}: use cpu, cuda or cuda:N.")
    if kind == "cuda" and ":" in want:
        index = want.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise ConfigError(f"--lm-eval-device {want}: there are {torch.cuda.device_count()} CUDA devices "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    return want


def prepare_lm_eval(settings: LmEvalSettings) -> tuple[Any, str]:
    """Every check before the work; returns the harness's TaskManager (with the include dir)
    and the device to run on."""
    _offline()
    device = _device(settings)
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError:
        raise ConfigError(_INSTALL) from None
    if settings.include is not None:
        inc = settings.include
        if not inc.is_dir():
            raise ConfigError(f"--lm-eval-include {inc}: not a directory. Give the directory that holds your task "
                              "YAML files (each with `task: NAME`).")
        if not any(inc.rglob("*.yaml")) and not any(inc.rglob("*.yml")):
            raise ConfigError(f"--lm-eval-include {inc}: no .yaml task files in it. Each task is a YAML file with "
                              "`task: NAME`, `dataset_path`, `output_type` and the doc_to_* fields "
                              "(see docs/eval-export-recipes.md).")
    _quiet_unless_verbose()
    manager = TaskManager(include_path=str(settings.include) if settings.include else None)
    known = set(manager.all_tasks)
    unknown = [t for t in settings.tasks if t not in known]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, sorted(known), n=3)
            hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = f" or in {settings.include}" if settings.include else " (a local task needs --lm-eval-include DIR)"
        raise ConfigError(f"--lm-eval: no task {', '.join(hints)} in lm-evaluation-harness{where}. "
                          "`lm_eval ls tasks` lists the harness's own tasks.")
    try:
        get_task_dict(list(settings.tasks), manager)  # loads every task's data: missing data fails here
    except Exception as e:  # the harness and datasets raise many kinds for data that is not local
        raise ConfigError(
            f"lm-evaluation-harness could not load the data of {', '.join(settings.tasks)}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. lmexpand runs the harness offline: put the task's "
            "dataset in the local datasets cache (on a machine with internet: "
            "`python -c \"import datasets; datasets.load_dataset(PATH, NAME)\"`), or write the task as a local "
            "YAML whose data_files are local (--lm-eval-include DIR).") from None
    return manager, device


def run_lm_eval(model: Any, tokenizer: Any, settings: LmEvalSettings, prepared: tuple[Any, str],
                out: Path) -> dict[str, Any]:
    """Run the harness on ``model`` (already loaded, in eval mode) with what
    :func:`prepare_lm_eval` returned. Writes ``out/lm_eval.json`` (the harness's results,
    configs and versions) and returns the per-task metrics."""
    from importlib.metadata import version

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager, device = prepared
    moved_from = next(model.parameters()).device
    model.to(device)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, device=device)
        res = lm_eval.simple_evaluate(
            model=lm, tasks=list(settings.tasks), task_manager=manager, limit=settings.limit,
            num_fewshot=settings.num_fewshot, log_samples=False)
    finally:
        model.to(moved_from)
    if res is None:  # non-zero ranks of a distributed run
        return {}
    out.mkdir(parents=True, exist_ok=True)
    keep = {k: res.get(k) for k in ("results", "groups", "configs", "versions", "n-shot", "n-samples")}
    (out / "lm_eval.json").write_text(json.dumps(keep, indent=2, default=str) + "\n")
    summary: dict[str, Any] = {}
    for task, metrics in (res.get("results") or {}).items():
        # "metric,filter" keys (acc,none; acc_stderr,none); bookkeeping such as sample_len is left out
        summary[task] = {k: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
    return {"tasks": summary, "settings": {"limit": settings.limit, "num_fewshot": settings.num_fewshot,
                                          "batch_size": settings.batch_size, "device": device},
            "n_samples": res.get("n-samples"), "version": version("lm_eval")}


def render(r: dict[str, Any]) -> list[str]:
    """Report lines: one row per task and metric (value ± stderr, where the harness gives one)."""
    s = r.get("settings", {})
    limit = s.get("limit")
    scope = f"limit {int(limit) if limit >= 1 else limit} per task" if limit is not None else "every document"
    shots = f"{s['num_fewshot']}-shot" if s.get("num_fewshot") is not None else "the tasks' own few-shot setting"
    lines = ["", "## lm-evaluation-harness", "",
             f"Device {s.get('device')}, {scope}, {shots}; the harness's full output is in lm_eval.json.", "",
             "| task | metric | value | stderr |", "|---|---|---|---|"]
    for task, metrics in r.get("tasks", {}).items():
        for key, value in metrics.items():
            if "_stderr," in key:
                continue
            name, _, filt = key.partition(",")
            err = metrics.get(f"{name}_stderr,{filt}")
            err_text = f"{err:.4f}" if isinstance(err, (int, float)) else "-"
            lines.append(f"| {task} | {name} ({filt}) | {value:.4f} | {err_text} |")
    return lines
