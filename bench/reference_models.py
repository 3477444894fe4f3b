"""Reference models for every miniature: a healed SmolLM2 and specialists of one tokenizer.

    .venv/bin/python bench/reference_models.py [--only NAME,...] [--no-table]

The embedded SmolLM2-135M is a dequantized Q4_1 GGUF: any training repairs some of that
rounding and lowers perplexity on *all* text, which confounds every "gains the domain, keeps
general skill" comparison. So the miniatures start from models built here, each with
lmexpand's own recipes (stage templates in ``bench/reference_recipes/*.yaml``), cached under
``$LMEXPAND_CACHE/reference/NAME-KEY`` (KEY: a hash of the recipe, the settings below, the
content of every data file it reads, and the parent's KEY):

  healed      the embedded model, full fine-tuning on general English (novels + OpenStax
              train), in segments of 40,960 tokens until the validation perplexity of both
              general sets improves by less than 1 % in a segment (at most 3 segments:
              the budget of docs/reference-models.md);
              the curve is drawn in healed.png
  math        healed, full fine-tuning on GSM8K train
  code        healed, full fine-tuning on the Python code train split
  small-cut   20 of healed's 30 blocks: the first 12 and the last 8 (surgery upscale
              --slices 0-12,22-30; the measured choice is in small-cut.yaml)
  small       small-cut healed like healed at 10x the learning rate (heal-small.yaml: a cut
              model has more to repair than rounding), same rule, at most 2 segments
  small-math  small, full fine-tuning on GSM8K train

It resumes: a finished model is reused, a finished segment too, and an interrupted
segment continues from its last checkpoint (``lmexpand run`` does that). It prints, and
writes to docs/reference-models.md (with --doc), every model's perplexity on GSM8K test,
OpenStax valid, novels valid and code valid (first 16,384 tokens, windows of 256, as
docs/results.md), with wall time and tokens seen.

Tests call :func:`build` with a tiny base, tiny data and tiny budgets (``overrides``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "bench" / "reference_recipes"
SHARED_DATA = ROOT.parent / "shared" / "data"
TEMPLATE = "Question: {question}\nAnswer: {answer}"

# name -> file under the data root, and the template / text field it is read with
EVAL_SETS = {
    "gsm8k": ("gsm8k/test.jsonl", TEMPLATE),
    "openstax": ("general-english/openstax-humanities/valid.txt", None),
    "novels": ("general-english/novels-1902-1927/valid.txt", None),
    "code": ("code/valid.jsonl", None),
}
PLATEAU_SETS = ("openstax", "novels")


@dataclass(frozen=True)
class Stage:
    name: str
    recipe: str
    parent: str  # another stage's name, or "@base" (the embedded model, or the test's tiny base)
    max_segments: int = 1  # > 1: repeat the recipe until the plateau rule holds
    plateau: float = 0.01  # stop when every PLATEAU_SETS perplexity improves by less than this


STAGES = [
    Stage("healed", "heal.yaml", "@base", max_segments=3),
    Stage("math", "math.yaml", "healed"),
    Stage("code", "code.yaml", "healed"),
    Stage("small-cut", "small-cut.yaml", "healed"),
    Stage("small", "heal-small.yaml", "small-cut", max_segments=2),
    Stage("small-math", "math.yaml", "small"),
]
BY_NAME = {s.name: s for s in STAGES}


def cache_root() -> Path:
    return Path(os.environ.get("LMEXPAND_CACHE") or Path.home() / ".cache" / "lmexpand") / "reference"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _data_files(doc: dict) -> list[str]:
    train = doc.get("train") or {}
    return sorted({d["path"] for d in train.get("data", []) if isinstance(d, dict) and "path" in d})


def render(stage: Stage, parent: str, data_root: Path, overrides: dict[str, Any] | None = None,
           seed: int = 0) -> dict:
    """The stage's recipe as a plain recipe: ``@parent`` and ``@data/`` filled in, training
    settings overridden (tests use tiny budgets), ``seed`` set for this segment."""
    import yaml

    text = (RECIPES / stage.recipe).read_text()
    doc = yaml.safe_load(text.replace("@data/", str(data_root).rstrip("/") + "/"))

    def fill(value: Any) -> Any:
        if value == "@parent":
            return parent
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    doc = fill(doc)
    if "train" in doc:
        doc["train"] = {**doc["train"], **(overrides or {}), "seed": seed}
    return doc


def stage_key(stage: Stage, parent_key: str, data_root: Path, overrides: dict[str, Any] | None) -> str:
    """Changes when the recipe, the stage's settings, a data file's content, the parent or
    the overrides change; not otherwise (paths and mtimes do not count)."""
    import yaml

    raw = (RECIPES / stage.recipe).read_bytes()
    doc = yaml.safe_load(raw.decode().replace("@data/", str(data_root).rstrip("/") + "/"))
    data = [_sha256(Path(p)) for p in _data_files(doc)]
    plateau = [_sha256(data_root / EVAL_SETS[n][0]) for n in PLATEAU_SETS] if stage.max_segments > 1 else []
    parts = [stage.recipe, hashlib.sha256(raw).hexdigest(), stage.max_segments, stage.plateau, data, plateau,
             parent_key, sorted((overrides or {}).items())]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def lmx(*args: str, quiet: bool = True) -> None:
    """One lmexpand command, in this process (no interpreter start per stage); stdout
    (`run` prints its outputs as JSON) is dropped."""
    import contextlib
    import io

    from lmexpand.cli import main as lmexpand_main

    argv = [*(["-q"] if quiet else []), *args]
    with contextlib.redirect_stdout(io.StringIO()):
        code = lmexpand_main(argv)
    if code:
        raise SystemExit(f"reference models: `lmexpand {' '.join(argv)}` exited {code}")


def evaluate(model: Path, out: Path, data_root: Path, sets: tuple[str, ...], max_tokens: int, seq_len: int) -> dict:
    """Perplexity per set (cached in out/*/results.json). Sets with another template (or none)
    are scored by separate `lmexpand eval` calls: its --template applies to every JSONL set."""
    ppl: dict[str, float] = {}
    groups: dict[str | None, list[str]] = {}
    for name in sets:
        groups.setdefault(EVAL_SETS[name][1], []).append(name)
    for template, names in groups.items():
        part = out / ("templated" if template else "plain")
        res = part / "results.json"
        if not res.is_file():
            args = ["eval", str(model), "--out", str(part), "--max-tokens", str(max_tokens), "--seq-len",
                    str(seq_len), "--no-samples", *(["--template", template] if template else [])]
            for name in names:
                args += ["--data", f"{name}={data_root / EVAL_SETS[name][0]}"]
            lmx(*args)
        r = json.loads(res.read_text())
        ppl.update({k: v["ppl"] for k, v in r["perplexity"]["model"].items()})
    return ppl


def _write_recipe(doc: dict, path: Path) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def check(base: str, data_root: Path, work: Path, overrides: dict[str, Any] | None = None) -> list[Path]:
    """Render every stage's recipe (parents: ``base``) and validate it with ``lmexpand run --check``."""
    paths = []
    for stage in STAGES:
        path = _write_recipe(render(stage, base, data_root, overrides), work / f"{stage.name}.yaml")
        lmx("run", str(path), "--check")
        paths.append(path)
    return paths


def _model_of(workdir: Path, doc: dict) -> Path:
    return workdir / ("train/model" if "train" in doc else "expanded")


def build_stage(stage: Stage, parent_dir: str, parent_key: str, data_root: Path, root: Path,
                overrides: dict[str, Any] | None, eval_tokens: int, eval_seq: int) -> tuple[Path, str]:
    key = stage_key(stage, parent_key, data_root, overrides)
    final = root / f"{stage.name}-{key}"
    if (final / "lmexpand.json").is_file():
        print(f"{stage.name}: cached ({final})", flush=True)
        return final, key
    build = root / ".build" / f"{stage.name}-{key}"
    build.mkdir(parents=True, exist_ok=True)
    log_path = build / "segments.json"
    segments = json.loads(log_path.read_text()) if log_path.is_file() else []
    current = parent_dir
    start = time.perf_counter()
    if segments:
        current = segments[-1]["model"]
    prev = segments[-1]["ppl"] if segments else None
    if prev is None and stage.max_segments > 1:
        prev = evaluate(Path(parent_dir), build / "eval-parent", data_root, PLATEAU_SETS, eval_tokens, eval_seq)
    done = bool(segments) and (len(segments) >= stage.max_segments or segments[-1].get("flat", False))
    while not done:
        k = len(segments) + 1
        doc = render(stage, current, data_root, overrides, seed=k - 1)
        seg = build / f"seg-{k:02d}"
        doc["workdir"] = str(seg)
        recipe = _write_recipe(doc, build / f"seg-{k:02d}.yaml")
        t0 = time.perf_counter()
        print(f"{stage.name}: segment {k}" + (f"/{stage.max_segments}" if stage.max_segments > 1 else ""),
              flush=True)
        lmx("run", str(recipe))
        model = _model_of(seg, doc)
        train = doc.get("train") or {}
        tokens = int(train.get("max_steps", 0)) * int(train.get("batch_size", 0)) * int(train.get("seq_len", 0)) \
            * int(train.get("grad_accum", 1))
        entry: dict[str, Any] = {"segment": k, "model": str(model), "tokens": tokens,
                                 "seconds": round(time.perf_counter() - t0, 1)}
        if stage.max_segments > 1:
            ppl = evaluate(model, build / f"eval-{k:02d}", data_root, PLATEAU_SETS, eval_tokens, eval_seq)
            gains = {n: (prev[n] - ppl[n]) / prev[n] for n in PLATEAU_SETS}
            entry.update(ppl=ppl, gain=gains, flat=all(g < stage.plateau for g in gains.values()))
            prev = ppl
        segments.append(entry)
        log_path.write_text(json.dumps(segments, indent=2))
        current = str(model)
        done = len(segments) >= stage.max_segments or entry.get("flat", True)
    # the finished model: the last segment's, with the reference lineage added to lmexpand.json
    last = Path(segments[-1]["model"])
    meta_path = last / "lmexpand.json"
    meta = json.loads(meta_path.read_text())
    meta["reference"] = {
        "name": stage.name, "key": key, "recipe": f"bench/reference_recipes/{stage.recipe}", "parent": stage.parent,
        "parent_dir": parent_dir, "parent_key": parent_key, "overrides": overrides or {},
        "segments": segments, "tokens": sum(s["tokens"] for s in segments),
        "seconds": round(sum(s["seconds"] for s in segments), 1),
        "plateau": stage.plateau if stage.max_segments > 1 else None,
    }
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    if final.exists():
        shutil.rmtree(final)
    os.replace(last, final)
    if stage.max_segments > 1:
        _plot_curve(stage, segments, build / "eval-parent", root / f"{stage.name}.png")
    shutil.rmtree(build)  # the segments' intermediate models and checkpoints (our own files only)
    print(f"{stage.name}: built in {time.perf_counter() - start:.0f} s ({final})", flush=True)
    return final, key


def _plot_curve(stage: Stage, segments: list[dict], parent_eval: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parent = json.loads((parent_eval / "plain" / "results.json").read_text())["perplexity"]["model"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    tokens = [0]
    for s in segments:
        tokens.append(tokens[-1] + s["tokens"])
    for n in PLATEAU_SETS:
        ys = [parent[n]["ppl"]] + [s["ppl"][n] for s in segments]
        ax.plot([t / 1000 for t in tokens], ys, marker="o", label=f"{n} valid")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{stage.name}: full fine-tuning on general English, stop at < {stage.plateau:.0%} per segment")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def build(base: str = "smollm2-135m", data_root: Path = SHARED_DATA, root: Path | None = None,
          only: list[str] | None = None, overrides: dict[str, Any] | None = None,
          eval_tokens: int = 16384, eval_seq: int = 256, max_segments: int | None = None) -> dict[str, dict]:
    """Build (or reuse) every stage in order; returns name -> {dir, key}. ``max_segments``
    caps the healing stages (tests); it is part of the cache key like the overrides."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    wanted = set(only or BY_NAME)
    for name in list(wanted):  # parents first
        s = BY_NAME[name]
        while s.parent != "@base":
            wanted.add(s.parent)
            s = BY_NAME[s.parent]
    built: dict[str, dict] = {}
    base_key = base if Path(base).name == base else _sha256_dir(Path(base))
    for stage in STAGES:
        if stage.name not in wanted:
            continue
        if max_segments is not None and stage.max_segments > 1:
            stage = replace(stage, max_segments=max_segments)
        parent_dir, parent_key = (base, base_key) if stage.parent == "@base" else \
            (built[stage.parent]["dir"], built[stage.parent]["key"])
        d, key = build_stage(stage, str(parent_dir), parent_key, data_root, root, overrides, eval_tokens, eval_seq)
        built[stage.name] = {"dir": str(d), "key": key}
    return built


def _sha256_dir(path: Path) -> str:
    """A local base model's identity: its weights' and config's content."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".json"):
            h.update(f.name.encode() + _sha256(f).encode())
    return h.hexdigest()[:16]


def resolve(name: str) -> Path:
    """The cached directory of a built reference model (for the miniatures): the newest
    build of that name; an error naming the command if there is none."""
    found = sorted(cache_root().glob(f"{name}-*/lmexpand.json"), key=lambda p: p.stat().st_mtime)
    found = [p for p in found if json.loads(p.read_text()).get("reference", {}).get("name") == name]
    if not found:
        raise SystemExit(f"no reference model {name!r} in {cache_root()}: build it first with "
                         f"`.venv/bin/python bench/reference_models.py --only {name}`")
    return found[-1].parent


def table(built: dict[str, dict], data_root: Path, root: Path, base: str, eval_tokens: int, eval_seq: int) -> str:
    rows = [("base (embedded SmolLM2-135M, dequantized Q4_1)", base, None)]
    rows += [(name, info["dir"], json.loads((Path(info["dir"]) / "lmexpand.json").read_text())["reference"])
             for name, info in built.items() if name != "small-cut"]
    lines = ["| model | parent | GSM8K test ppl | OpenStax valid ppl | novels valid ppl | code valid ppl | "
             "tokens seen | wall time |", "|---|---|---|---|---|---|---|---|"]
    for label, model, ref in rows:
        key = ref["key"] if ref else "base"
        ppl = evaluate(Path(model), root / ".evals" / f"{label.split()[0]}-{key}", data_root, tuple(EVAL_SETS),
                       eval_tokens, eval_seq)
        seg = ""
        if ref and ref.get("plateau"):
            seg = f" ({len(ref['segments'])} segments)"
        lines.append(f"| {label} | {ref['parent'] if ref else '—'} | {ppl['gsm8k']:.3f} | {ppl['openstax']:.3f} | "
                     f"{ppl['novels']:.3f} | {ppl['code']:.3f} | {ref['tokens'] if ref else 0:,}{seg} | "
                     f"{ref['seconds'] if ref else 0:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="comma-separated stage names (their parents are built too)")
    ap.add_argument("--no-table", action="store_true", help="build only; skip the perplexity table")
    ap.add_argument("--doc", type=Path, default=None, help="also write the table into this Markdown file")
    ap.add_argument("--json", type=Path, default=None, help="write the built models (name -> dir, key) here")
    # what bench/results.py --tiny (and its test) changes: a tiny base, tiny data, tiny budgets
    ap.add_argument("--base", default="smollm2-135m", help="the model every stage descends from")
    ap.add_argument("--data-root", type=Path, default=SHARED_DATA, help="a tree like ../shared/data")
    ap.add_argument("--root", type=Path, default=None, help="the cache (default $LMEXPAND_CACHE/reference)")
    ap.add_argument("--overrides", default=None, help="JSON object of training settings for every stage")
    ap.add_argument("--max-segments", type=int, default=None, help="cap the healing stages' segments")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--eval-seq", type=int, default=256)
    args = ap.parse_args(argv)
    only = args.only.split(",") if args.only else None
    unknown = [n for n in only or [] if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; stages: {', '.join(BY_NAME)}")
    overrides = json.loads(args.overrides) if args.overrides else None
    root = args.root or cache_root()
    t0 = time.perf_counter()
    built = build(base=args.base, data_root=args.data_root, root=root, only=only, overrides=overrides,
                  eval_tokens=args.eval_tokens, eval_seq=args.eval_seq, max_segments=args.max_segments)
    print(json.dumps(built, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(built, indent=2))
    if not args.no_table:
        md = table(built, args.data_root, root, args.base, args.eval_tokens, args.eval_seq)
        print(md)
        if args.doc:
            args.doc.write_text(args.doc.read_text().split("<!-- table -->")[0] + "<!-- table -->\n" + md + "\n"
                                if args.doc.is_file() else md + "\n")
    print(f"reference models: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
