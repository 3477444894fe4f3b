"""YAML recipes: one file describes a job, section by section (surgery, train, eval, export).

:func:`load_job` validates the whole file into a typed :class:`Job` (the surgery planned
once, from headers, before any work); :func:`run_job` runs its stages through the stage
functions of :mod:`lmexpand.stages`, the ones the single commands call, skipping the stages
whose inputs did not change since they completed.

Relative paths in a recipe are relative to the recipe file, so a recipe and its data can
move together; embedded model names (smollm2-135m) stay names. A relative path that stays
inside the recipe's directory as written must stay inside it once symlinks are followed:
a link planted beside a recipe cannot send its reads or writes elsewhere (absolute paths
and paths written with ``..`` say where they go, and are taken as given).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from lmexpand.errors import ConfigError, SourceError
from lmexpand.faults import kill_point
from lmexpand.stages.merge import MergeRequest, PreparedMerge
from lmexpand.stages.surgery import PlannedSurgery, SurgeryRequest
from lmexpand.validation import STRICT, validate
from lmexpand.jsonio import read_json

if TYPE_CHECKING:
    from lmexpand.expand.registry import MethodConfig
    from lmexpand.train.config import TrainConfig

log = logging.getLogger("lmexpand")

_PATH_KEYS = ("model", "out", "source")


def _resolve(base: Path, value: Any) -> Any:
    from lmexpand.checkpoint.sources import EMBEDDED

    if isinstance(value, str) and re.match(r"^@[A-Za-z_]", value):
        # the stage templates of bench/reference_models.py hold @parent and @data/...: never a path
        name = re.match(r"^@[A-Za-z_]\w*", value).group(0)  # type: ignore[union-attr]
        raise ConfigError(
            f"recipe value {value!r}: {name} is a placeholder, not a path ({name} in the stage templates under "
            "bench/reference_recipes/ is filled by bench/reference_models.py, which runs them). Write the model "
            "or data path itself, or run the template through bench/reference_models.py."
        )
    if isinstance(value, str) and value not in EMBEDDED and not Path(value).is_absolute():
        lexical = os.path.normpath(base / value)
        if _inside(lexical, str(base)):
            real = os.path.realpath(lexical)
            if not _inside(real, os.path.realpath(base)):
                raise ConfigError(
                    f"recipe path {value!r} resolves through a symlink to {real}, outside the recipe's directory "
                    f"{base}. Relative paths in a recipe must stay inside its directory; write the absolute path "
                    "in the recipe if that location is meant."
                )
        return lexical
    return value


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def load_recipe(path: Path) -> dict[str, Any]:
    from lmexpand.yamlio import load_yaml

    doc = load_yaml(path, "recipe")
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with sections surgery, train, eval, export.")
    return doc


def load_recipe_section(path: Path, section: str) -> dict[str, Any]:
    """One section of a recipe as plain values, relative paths resolved."""
    doc = load_recipe(path)
    if not isinstance(doc.get(section), dict):
        raise ConfigError(f"{path}: no `{section}:` section (a mapping) in the recipe.")
    values = dict(doc[section])
    base = path.resolve().parent
    for key in _PATH_KEYS:
        if key in values:
            values[key] = _resolve(base, values[key])
    _resolve_data(base, values)
    return values


def _resolve_data(base: Path, values: dict[str, Any]) -> None:
    """Data entries' paths, relative to the recipe file."""
    if isinstance(values.get("data"), list):
        values["data"] = [
            {**d, "path": _resolve(base, d["path"])} if isinstance(d, dict) and "path" in d else d
            for d in values["data"]
        ]


# -- whole-job recipes: `lmexpand run RECIPE.yaml` ------------------------------------------


class _Section(BaseModel):
    model_config = STRICT


class SurgerySection(_Section):
    method: str
    source: str | list[str] | None = Field(None, description="the source model; a list for methods with several "
                                           "(calm: [anchor, augmenting model]; logit-sum: [A, B, ...]); none for merge (its config names them)")
    out: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    allow_pickle: bool = Field(False, description="accept pickle-only sources (pytorch_model.bin), weights-only")
    eval_data: str | None = Field(None, description="method merge, merge_method greedy_soup: held-out text "
                                  "(.txt/.jsonl) ranking the candidates by perplexity (`lmexpand merge --eval-data`)")
    eval_tokens: int = Field(16384, ge=64, description="tokens of eval_data scored per candidate")


class EvalSection(_Section):
    data: dict[str, str] = Field(min_length=1, description="name -> file")
    template: str | None = None
    text_field: str = "text"
    base: str | None = Field(None, description="default: the surgery's source")
    max_tokens: int = Field(16384, gt=0)
    seq_len: int = Field(256, gt=1)
    stride: int | None = Field(None, gt=0)
    samples: bool = True
    allow_pickle: bool = Field(False, description="accept pickle-only weights (pytorch_model.bin), weights-only")
    out: str | None = None


class ExportSection(_Section):
    out: str | None = None
    max_shard_size: str = "5GB"


class RecipeFile(_Section):
    name: str | None = None
    workdir: str = Field("out", description="stage outputs go here unless a section names its own out")
    surgery: SurgerySection | None = None
    train: dict[str, Any] | list[dict[str, Any]] | None = Field(
        None, description="one training stage, or a list of stages run in order (each trains the model the one "
        "before it wrote: continued pretraining, then SFT)")
    eval: EvalSection | None = None
    export: ExportSection | None = None


@dataclass(frozen=True)
class SurgeryStage:
    """The recipe's surgery, planned once by :func:`load_job` (headers only) and run from
    that plan: a registered method, or a merge (every merge method, greedy_soup included:
    a soup is planned once its candidates are scored)."""

    planned: PlannedSurgery | PreparedMerge
    method: str
    config: "MethodConfig"  # the method's arguments
    sources: list[str]  # as the recipe gives them (a merge's configuration names its own)
    out: Path
    eval_data: str | None = None  # greedy_soup's held-out text


@dataclass(frozen=True)
class EvalStage:
    section: EvalSection  # data paths resolved, base given or the surgery's source
    out: Path


@dataclass(frozen=True)
class ExportStage:
    section: ExportSection
    out: Path


@dataclass
class Job:
    """A validated recipe: every path resolved, every section's settings checked, the
    surgery planned."""

    path: Path
    workdir: Path
    surgery: SurgeryStage | None = None
    train_stages: "list[TrainConfig]" = field(default_factory=list)  # in order
    eval: EvalStage | None = None
    export: ExportStage | None = None
    planned: "ModelFacts | None" = None  # what the surgery will write, from its plan (headers only)

    @property
    def train(self) -> "TrainConfig | None":
        """The last training stage: its model is what eval and export take."""
        return self.train_stages[-1] if self.train_stages else None


@dataclass(frozen=True)
class ModelFacts:
    """What the stages after a model need to know of it before it exists: its config, the
    tensors it stores, the parameters lmexpand.json lists as new (None: no lmexpand.json),
    and where it came from (for messages)."""

    config: dict[str, Any]
    tensors: frozenset[str]
    new_parameters: tuple[str, ...] | None
    what: str  # "the surgery's output (proxy-tune)", "train.model out/x"
    source: str = ""  # the surgery's first source (the eval base by default)
    tokenizer_dir: str = ""  # where its tokenizer is (the surgery copies its source's)

    @classmethod
    def of_dir(cls, model: str, what: str, allow_pickle: bool = False) -> "ModelFacts":
        from lmexpand.checkpoint.reader import CheckpointReader
        from lmexpand.checkpoint.sources import resolve_source

        with CheckpointReader(resolve_source(model), need_family=False, allow_pickle=allow_pickle) as r:
            lineage = r.lineage()
            return cls(dict(r.config), frozenset(t.name for t in r), tuple(lineage.get("new_parameters") or [])
                       if lineage is not None else None, what, tokenizer_dir=str(r.path))

    def after_training(self, key: str) -> "ModelFacts":
        """A trained model keeps its tensors and its lineage (an empty one if it had none)."""
        return ModelFacts(self.config, self.tensors, self.new_parameters or (), f"the model {key} writes",
                          tokenizer_dir=self.tokenizer_dir)


def _must_exist(where: str, value: str) -> None:
    from lmexpand.checkpoint.sources import EMBEDDED

    if value not in EMBEDDED and not Path(value).exists():
        raise ConfigError(f"{where}: {value}: no such file or directory.")


def load_job(path: Path) -> Job:
    """Validate the whole recipe before any work; the first problem found is reported with
    its section and key."""
    from lmexpand.expand.registry import get_method, load_methods, parse_config
    from lmexpand.train.config import TrainConfig

    doc = load_recipe(path)
    recipe = validate(RecipeFile, doc, what=f"{path}", style="key")
    base = path.resolve().parent
    workdir = Path(_resolve(base, recipe.workdir))
    job = Job(path=path, workdir=workdir)
    produced: str | None = None
    source_model: str | None = None
    if recipe.surgery is not None:
        s = recipe.surgery
        methods = load_methods()
        if s.method not in methods:
            raise ConfigError(f"{path}: surgery.method: unknown method {s.method!r}; available: {', '.join(sorted(methods))}.")
        method = get_method(s.method)
        args = dict(s.args)
        if isinstance(args.get("models"), dict):  # more models (upscale): paths relative to the recipe
            args["models"] = {k: _resolve(base, v) for k, v in args["models"].items()}
            for k, v in args["models"].items():
                _must_exist(f"{path}: surgery.args.models.{k}", v)
        try:
            cfg = parse_config(method, args, style="key")
        except ConfigError as e:
            raise ConfigError(f"{path}: surgery.args: {str(e).split(': ', 1)[1]}") from None
        if isinstance(args.get("config"), str):  # a merge configuration file: relative to the recipe
            args["config"] = _resolve(base, args["config"])
            _must_exist(f"{path}: surgery.args.config", args["config"])
            cfg = parse_config(method, args, style="key")
        given = [] if s.source is None else s.source if isinstance(s.source, list) else [s.source]
        if given and not method.sources:
            raise ConfigError(f"{path}: surgery.source: {s.method} names its models in its configuration "
                              "(surgery.args.config); remove surgery.source.")
        need = len(method.sources)
        if method.variadic and len(given) < need:
            raise ConfigError(f"{path}: surgery.source: {s.method} takes at least {need} models; got {len(given)}. "
                              "Write source: [A, B, ...].")
        if not method.variadic and len(given) != need:
            names = ", ".join(x.lower() for x in method.sources)
            raise ConfigError(f"{path}: surgery.source: {s.method} takes {need} source model(s) "
                              f"({names}); got {len(given)}. Write " + ("source: MODEL" if need == 1
                              else f"source: [{names}]") + ".")
        sources = [_resolve(base, x) for x in given]
        for x in sources:
            _must_exist(f"{path}: surgery.source", x)
        out = Path(_resolve(base, s.out)) if s.out else workdir / "expanded"
        eval_data = None
        if s.eval_data is not None:
            if s.method != "merge":
                raise ConfigError(f"{path}: surgery.eval_data ranks the candidates of a greedy soup (method: merge, "
                                  f"merge_method: greedy_soup); {s.method} reads no held-out text. Remove it.")
            eval_data = _resolve(base, s.eval_data)
            _must_exist(f"{path}: surgery.eval_data", eval_data)
        if s.method == "merge":
            planned, job.planned = preflight_merge(str(path), cfg, MergeRequest(
                cfg.config, out, seed=cfg.seed, threads=1, device=cfg.device, match_mergekit=cfg.match_mergekit,
                eval_data=eval_data, eval_tokens=s.eval_tokens, force=True, allow_pickle=s.allow_pickle,
                announce=False))
        else:
            planned, job.planned = preflight_surgery(str(path), SurgeryRequest(
                method, sources, out, config=cfg, force=True, allow_pickle=s.allow_pickle, announce=False))
        job.surgery = SurgeryStage(planned, s.method, cfg, sources, out, eval_data)
        # a merge's configuration names the models: its first is the eval base
        produced, source_model = str(out), (sources or [job.planned.source])[0]
    if recipe.train is not None:
        stages = recipe.train if isinstance(recipe.train, list) else [recipe.train]
        if not stages:
            raise ConfigError(f"{path}: train: an empty list. Give one stage (a mapping) or a list of stages.")
        for i, stage in enumerate(stages):
            key = _stage_key(i, len(stages))
            values = dict(stage)
            for k in ("model", "out"):
                if k in values:
                    values[k] = _resolve(base, values[k])
            values.setdefault("model", produced)  # a later stage trains what the one before wrote
            values.setdefault("out", str(workdir / ("train" if len(stages) == 1 else f"train-{i + 1}")))
            if values["model"] is None:
                raise ConfigError(f"{path}: {key}.model: required when the recipe has no surgery section.")
            _resolve_data(base, values)
            cfg = validate(TrainConfig, values, what=f"{path}: {key}", style="key")
            if produced is None:
                _must_exist(f"{path}: {key}.model", str(cfg.model))
            for d in cfg.data:
                _must_exist(f"{path}: {key}.data", str(d.path))
            produced = str(cfg.out / "model")
            source_model = source_model or str(cfg.model)
            job.train_stages.append(cfg)
    if recipe.eval is not None:
        ev = recipe.eval
        data = {k: _resolve(base, v) for k, v in ev.data.items()}
        for k, v in data.items():
            _must_exist(f"{path}: eval.data.{k}", v)
        ev = ev.model_copy(update={"data": data, "base": _resolve(base, ev.base) if ev.base else source_model})
        if produced is None:
            raise ConfigError(f"{path}: eval: needs a surgery or train section to evaluate.")
        job.eval = EvalStage(ev, Path(_resolve(base, ev.out)) if ev.out else workdir / "eval")
    if recipe.export is not None:
        if produced is None:
            raise ConfigError(f"{path}: export: needs a surgery or train section to export.")
        job.export = ExportStage(recipe.export, Path(_resolve(base, recipe.export.out)) if recipe.export.out
                                 else workdir / "export")
    if not any((job.surgery, job.train, job.eval, job.export)):
        raise ConfigError(f"{path}: the recipe has no section to run (surgery, train, eval, export).")
    _check_job(job, source_model)
    return job


def recipe_keys(message: str, fields: Any, prefix: str) -> str:
    """A message written for the command line, for a recipe: each `--flag` that is one of
    ``fields`` becomes its key (``--open`` -> ``surgery.args.open``)."""
    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)",
                  lambda m: prefix + m.group(1).replace("-", "_") if m.group(1).replace("-", "_") in fields
                  else m.group(0), message)


def preflight_surgery(where: str, request: SurgeryRequest) -> tuple[PlannedSurgery, ModelFacts]:
    """The surgery stage's checks, before any value is read: its plan from the sources'
    headers (arguments against the models: layers, markers, tokenizers, vocabularies...).
    Returns the plan, which the run executes, and what the stages after it need to know of
    its output."""
    from lmexpand.stages.surgery import plan_surgery

    method, cfg = request.method, request.config
    try:
        planned = plan_surgery(request)  # its readers stay open for the run (a pickle's are loaded)
    except ConfigError as e:
        raise ConfigError(f"{where}: surgery ({method.name}): "
                          + recipe_keys(str(e), cfg.model_fields, "surgery.args.")) from None
    plan = planned.plan
    source = str(plan.sources[plan.carry_from])
    return planned, ModelFacts(dict(plan.config), frozenset(t.name for t in plan.tensors), tuple(plan.new_parameters),
                               f"the surgery's output ({method.name})", source=source, tokenizer_dir=source)


def preflight_merge(where: str, cfg: Any, request: MergeRequest) -> tuple[PreparedMerge, ModelFacts]:
    """A merge's checks, before any value is read: its configuration and models, and its
    plan (a greedy soup's candidates are checked and its output described by the uniform
    merge of them all: the same config and tensors whichever it keeps)."""
    from dataclasses import replace

    from lmexpand.checkpoint.verify import require_structure
    from lmexpand.expand.merging.planner import plan_merge, resolve_device
    from lmexpand.stages.merge import prepare_merge

    try:
        request = replace(request, device=resolve_device(cfg.device, "device:"))
        prepared = prepare_merge(request, check_out=False)  # the outputs are checked together, by _check_job
        if prepared.is_soup:
            from lmexpand.expand.merging.soup import uniform_merge

            from lmexpand.stages.merge import perplexity_scorer

            plan = plan_merge(uniform_merge(prepared.resolved, prepared.where), prepared.where)
            source = str(prepared.resolved.readers[0].path)
            perplexity_scorer(request.eval_data, request.eval_tokens, Path(source))  # enough text, now
        else:
            plan = prepared.plan
            for reader in plan.readers:  # as every surgery's plan is checked (SurgeryMethod.checked_plan)
                require_structure(reader)
            source = str(plan.sources[plan.carry_from])
    except ConfigError as e:
        raise ConfigError(f"{where}: surgery (merge): " + recipe_keys(str(e), cfg.model_fields, "surgery.args.")
                          .replace("--eval-data FILE", "surgery.eval_data: FILE (held-out .txt or .jsonl text)")
                          .replace("--eval-data", "surgery.eval_data")) from None
    return prepared, ModelFacts(dict(plan.config), frozenset(t.name for t in plan.tensors),
                                tuple(plan.new_parameters), "the surgery's output (merge)", source=source,
                                tokenizer_dir=source)


def preflight_train(where: str, key: str, cfg: Any, model: ModelFacts) -> None:
    """The training stage's checks that depend on the model it will train, known before that
    model exists (the run calls this for every stage before the first one starts; the same
    rules as :func:`lmexpand.train.loop.train`, worded with the recipe's keys)."""
    from lmexpand.compose.kinds import composed_kind

    kind = model.config.get("model_type")
    declared = composed_kind(model.config)
    composed = declared is not None
    if composed and not model.tensors:
        raise ConfigError(f"{where}: {key}: nothing to train: {model.what} is a {model.config.get('method') or kind} "
                          "composition without trainable parameters (it combines its members' outputs as they are). "
                          f"Remove the `{key}` section, or train a member first and compose it afterwards.")
    if cfg.trainable == "new" and cfg.lora is None and not cfg.extra_trainable:
        if model.new_parameters is None:
            raise ConfigError(f"{where}: {key}.trainable: {model.what} has no lmexpand.json, so the default "
                              "trainable set (trainable: new, the parameters a surgery added) is unknown. Set "
                              f"{key}.trainable: all (full fine-tuning) or a list of globs, or add {key}.lora.")
        if not model.new_parameters:
            raise ConfigError(f"{where}: {key}.trainable: {model.what} has no new parameters, so the default "
                              "trainable set (trainable: new) is empty. Set "
                              f"{key}.trainable: all (full fine-tuning) or a list of globs, or add {key}.lora.")
    if cfg.co_llm_init_steps and not (declared and declared.gate_init):
        raise ConfigError(f"{where}: {key}.co_llm_init_steps initialises a Co-LLM gate; {model.what} is a {kind} "
                          "model. Remove the key, or make the surgery co-llm.")
    if cfg.document_masking and composed:
        raise ConfigError(f"{where}: {key}.document_masking: {model.what} is a composed model, whose members take no "
                          f"position ids from lmexpand. Remove the key, or set {key}.pack: false.")
    if composed and cfg.trainable == "all":
        members_ok = declared.trainable_members
        raise ConfigError(f"{where}: {key}.trainable: all would train every weight of {model.what}, a composed model "
                          f"({kind}) whose members' weights live in their own directories and stay frozen. Leave "
                          f"{key}.trainable out (the default: its own new tensors)"
                          + (f" or name {', '.join(p + '*' for p in members_ok)}" if members_ok else "")
                          + ", or fine-tune a member on its own and compose again.")
    if composed and cfg.lora is not None:
        raise ConfigError(f"{where}: {key}.lora: {model.what} is a composed model ({kind}); LoRA would train its "
                          f"members' weights, which live in their own directories. Remove {key}.lora.")
    _check_markers_in_data(where, key, cfg, model)


def _check_markers_in_data(where: str, key: str, cfg: Any, model: ModelFacts) -> None:
    """Deep fusion trains experts that run only inside marked spans: data without any marker
    cannot train them (training would stop at its first batch; known now). Chat data is
    rendered by the template, so its markers are left to that check."""
    from lmexpand.compose.kinds import composed_kind
    from lmexpand.train.data import text_found

    declared = composed_kind(model.config)
    ids = list(model.config.get("open_ids") or []) if declared and declared.span_markers else []
    if not ids or not model.tokenizer_dir or any(d.chat for d in cfg.data):
        return
    from lmexpand.checkpoint.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(model.tokenizer_dir), what=model.what)
    markers = sorted({tokenizer.decode([i]).strip() for i in ids} - {""})
    if markers and not any(text_found(d, m) for d in cfg.data for m in markers):
        raise ConfigError(f"{where}: {key}.data: no document holds a span marker of {model.what} "
                          f"({', '.join(map(repr, markers[:4]))}), so its experts, which run only inside marked "
                          "spans, would get no gradient and training would change nothing. Give data with those "
                          "markers (code fences, formulas), or make the surgery with markers this data has.")


def preflight_eval(where: str, ev: "EvalSection", model: ModelFacts) -> None:
    """The eval stage's checks that depend on the model it will score, and its text sets
    read as eval reads them (field, template)."""
    from lmexpand.eval.perplexity import TextSet, check_text_set
    from lmexpand.eval.report import unscorable

    reason = unscorable(model.config)
    if reason:
        raise ConfigError(f"{where}: eval: {model.what} {reason} Remove the `eval` section.")
    for name, p in ev.data.items():
        try:
            check_text_set(TextSet(name, Path(p), ev.text_field, ev.template))
        except ConfigError as e:
            raise ConfigError(f"{where}: eval.data.{name}: {e}".replace("--text-field", "eval.text_field")
                              .replace("--template", "eval.template")) from None


def _stage_key(i: int, n: int) -> str:
    """How messages and outputs name training stage i of n: `train`, or `train.1`, `train.2`, ..."""
    return "train" if n == 1 else f"train.{i + 1}"


def _check_job(job: Job, source_model: str | None) -> None:
    """What each stage will need, checked now so that a recipe `--check` calls valid does
    not fail later for a reason it could have known: the workdir, every stage's output
    against every input (the recipe itself included) and against the other outputs, the
    training data (fields, --loss-from), the model's tokenizer and max positions."""
    from lmexpand.checkpoint.sources import resolve_source
    from lmexpand.checkpoint.tokenizer import load_tokenizer
    from lmexpand.checkpoint.writer import check_output
    from lmexpand.train.data import check_sources

    where = str(job.path)
    if job.workdir.exists() and not job.workdir.is_dir():
        raise ConfigError(f"{where}: workdir {job.workdir} is a file. Give a directory (it is created if missing).")
    inputs: list[tuple[str, Path]] = [("recipe", job.path)]
    outputs: list[tuple[str, Path, bool]] = []  # (key, path, replaced when the stage runs)
    if job.surgery is not None:
        inputs += [("surgery.source", resolve_source(x)) for x in job.surgery.sources]
        if job.surgery.eval_data:
            inputs.append(("surgery.eval_data", Path(job.surgery.eval_data)))
        outputs.append(("surgery.out", job.surgery.out, True))
    n = len(job.train_stages)
    for i, stage in enumerate(job.train_stages):
        inputs += [(f"{_stage_key(i, n)}.data", d.path) for d in stage.data]
        if job.surgery is None and i == 0:
            inputs.append(("train.model", resolve_source(stage.model)))
        outputs.append((f"{_stage_key(i, n)}.out", stage.out, True))
    if job.eval is not None:
        inputs += [(f"eval.data.{k}", Path(v)) for k, v in job.eval.section.data.items()]
        if job.eval.section.base:
            inputs.append(("eval.base", resolve_source(job.eval.section.base)))
        outputs.append(("eval.out", job.eval.out, False))
    if job.export is not None:
        outputs.append(("export.out", job.export.out, True))
    for i, (key, out, replaces) in enumerate(outputs):
        others = [(k, p) for j, (k, p, _) in enumerate(outputs) if j != i]
        check_output(out, inputs=[*inputs, *others], force=True, replaces=replaces, label=key, where=where)
    for stage in job.train_stages:
        check_sources(stage.data)
    model_facts = job.planned if job.surgery is not None else (
        ModelFacts.of_dir(str(job.train_stages[0].model), f"{_stage_key(0, n)}.model {job.train_stages[0].model}",
                          job.train_stages[0].allow_pickle) if job.train_stages else None)
    for i, stage in enumerate(job.train_stages):
        assert model_facts is not None
        preflight_train(where, _stage_key(i, n), stage, model_facts)
        model_facts = model_facts.after_training(_stage_key(i, n))
    if job.eval is not None and model_facts is not None:
        preflight_eval(where, job.eval.section, model_facts)
    model = source_model if job.surgery is not None else (str(job.train.model) if job.train is not None else None)
    if model is not None:
        model_dir = resolve_source(model)
        tokenizer = load_tokenizer(model_dir, what=f"{where}: the model")
        seq_lens = []
        for i, stage in enumerate(job.train_stages):
            seq_lens.append((f"{_stage_key(i, n)}.seq_len", stage.seq_len))
            if any(d.chat for d in stage.data):  # a model without a chat template, known now
                from lmexpand.train.chat import resolve_chat_template

                try:
                    resolve_chat_template(tokenizer, stage.chat_template, model)
                except ConfigError as e:
                    raise ConfigError(f"{where}: {_stage_key(i, n)}: {e}") from None
        seq_lens += [("eval.seq_len", job.eval.section.seq_len)] if job.eval is not None else []
        cfg = read_json(model_dir / "config.json", what="config.json", expect=dict, error=SourceError,
                        fix="Fix the model's config.json or re-download it.") \
            if (model_dir / "config.json").is_file() else {}
        max_pos = cfg.get("max_position_embeddings")
        for key, n in seq_lens:
            if isinstance(max_pos, int) and n > max_pos:
                raise ConfigError(f"{where}: {key}: {n} exceeds the model's max_position_embeddings ({max_pos}). "
                                  f"Use {max_pos} or less.")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _marker(job: Job, stage: str) -> Path:
    return job.workdir / ".lmexpand-run" / f"{stage}.json"


def _done(job: Job, stage: str, fp: str, output: Path) -> bool:
    m = _marker(job, stage)
    return m.is_file() and json.loads(m.read_text()).get("fingerprint") == fp and output.exists()


def _mark(job: Job, stage: str, fp: str, output: Path, state: str = "done") -> None:
    m = _marker(job, stage)
    m.parent.mkdir(parents=True, exist_ok=True)
    tmp = m.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fp, "output": str(output), "state": state}))
    os.replace(tmp, m)


def run_job(job: Job) -> dict[str, str]:
    """Run the stages in order; a stage whose inputs (fingerprints) did not change since it
    completed is skipped, so a crashed run continues where it stopped. One run per workdir
    at a time: a second one is refused, naming the first."""
    with _workdir_lock(job):
        return _run_stages(job)


class _workdir_lock:
    """An exclusive ``flock`` on WORKDIR/.lmexpand-run/lock, held for the whole run (the
    kernel drops it when the process dies, so a killed run never blocks the next one)."""

    def __init__(self, job: Job):
        self.path = job.workdir / ".lmexpand-run" / "lock"
        self.fd: int | None = None

    def __enter__(self) -> "_workdir_lock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{self.path.parent.parent}: another `lmexpand run` (pid {holder}) is working in this "
                              "workdir. Wait for it to finish, or give this recipe another workdir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _run_stages(job: Job) -> dict[str, str]:
    from lmexpand.checkpoint.reader import CheckpointReader
    from lmexpand.checkpoint.sources import resolve_source

    outputs: dict[str, str] = {}
    upstream = ""
    if job.surgery is not None:
        outputs["surgery"], upstream = str(job.surgery.out), _run_surgery_stage(job, job.surgery)
        kill_point("run:after-surgery")
    for i, cfg in enumerate(job.train_stages):
        from lmexpand.stages.train import run_training
        from lmexpand.train.data import fingerprint_sources

        stage = _stage_key(i, len(job.train_stages))
        model_fp = upstream or CheckpointReader(resolve_source(cfg.model)).fingerprint()["sha256"]
        fp = _digest("train", cfg.model_dump(mode="json"), model_fp, fingerprint_sources(cfg.data, cfg.chat_template))
        final = cfg.out / "model"
        if _done(job, stage, fp, final):
            log.info("%s: up to date (%s), skipped", stage, final)
        else:
            m = _marker(job, stage)
            started = m.is_file() and json.loads(m.read_text()).get("fingerprint") == fp
            from lmexpand.train.state import latest_checkpoint

            resume = started and latest_checkpoint(cfg.out) is not None
            if resume:
                log.info("%s: resuming the interrupted run in %s", stage, cfg.out)
            _mark(job, stage, fp, final, state="started")
            run_training(cfg, resume=resume, force=not resume)
            _mark(job, stage, fp, final)
        outputs[stage], upstream = str(final), fp
        kill_point("run:after-train")
    if len(job.train_stages) > 1:  # the last stage's model is what eval and export take
        outputs["train"] = outputs[_stage_key(len(job.train_stages) - 1, len(job.train_stages))]
    model_dir = Path(outputs.get("train") or outputs["surgery"])
    if job.eval is not None:
        from lmexpand.eval.perplexity import TextSet
        from lmexpand.stages.evaluate import EvalRequest, run_evaluation

        ev, out = job.eval.section, job.eval.out
        fp = _digest("eval", ev.model_dump(), upstream)
        if _done(job, "eval", fp, out / "results.json"):
            log.info("eval: up to date (%s), skipped", out)
        else:
            sets = [TextSet(n, Path(p), ev.text_field, ev.template) for n, p in ev.data.items()]
            compare = [("expanded", outputs["surgery"])] if "surgery" in outputs and "train" in outputs else []
            compare += [(_stage_key(i, len(job.train_stages)), outputs[_stage_key(i, len(job.train_stages))])
                        for i in range(len(job.train_stages) - 1)]  # every stage before the last
            spec = str(Path(outputs["train"]).parent) if "train" in outputs else str(model_dir)
            run_evaluation(EvalRequest(spec, sets, out, base=ev.base, compare=compare, max_tokens=ev.max_tokens,
                                       seq_len=ev.seq_len, stride=ev.stride, samples=ev.samples,
                                       allow_pickle=ev.allow_pickle, force=True))
            _mark(job, "eval", fp, out / "results.json")
        outputs["eval"] = str(out / "report.md")
        upstream = _digest(upstream, fp)
    if job.export is not None:
        from lmexpand.stages.export import run_export

        out = job.export.out
        fp = _digest("export", job.export.section.model_dump(), upstream)
        if _done(job, "export", fp, out):
            log.info("export: up to date (%s), skipped", out)
        else:
            run_export(model_dir, out, eval_dir=job.eval.out if job.eval is not None else None,
                       max_shard_size=job.export.section.max_shard_size, force=True, size_key="export.max_shard_size")
            _mark(job, "export", fp, out)
        outputs["export"] = str(out)
    return outputs


def _run_surgery_stage(job: Job, stage: SurgeryStage) -> str:
    """Run the surgery from the plan :func:`load_job` made, unless it is up to date; returns
    its fingerprint (the settings, every source read, a soup's held-out text)."""
    from lmexpand.stages.merge import run_merge
    from lmexpand.stages.surgery import run_surgery

    planned = stage.planned
    if isinstance(planned, PreparedMerge):  # a soup: its candidates; else every model the plan reads
        readers = planned.resolved.readers if planned.is_soup else planned.plan.readers
    else:
        readers = planned.fingerprint_readers()
    parts: list[Any] = ["surgery", stage.method, stage.config.model_dump(mode="json"),
                        [r.fingerprint()["sha256"] for r in readers]]
    if stage.eval_data:
        parts.append([hashlib.sha256(Path(stage.eval_data).read_bytes()).hexdigest(), planned.request.eval_tokens])
    fp = _digest(*parts)
    if _done(job, "surgery", fp, stage.out):
        log.info("surgery: up to date (%s), skipped", stage.out)
    else:
        if isinstance(planned, PreparedMerge):
            run_merge(planned.request, planned)
        else:
            run_surgery(planned.request, planned)
        _mark(job, "surgery", fp, stage.out)
    return fp
