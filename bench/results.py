"""Every measured result of docs/results.md, from nothing, in one command.

    .venv/bin/python bench/results.py [--plan] [--only STAGE,...] [--doc docs/results.md]

Builds whatever is missing of the reference family (bench/reference_models.py: healed,
math, code, small-cut, small, small-math), then runs every miniature on it:

  expansion     LLaMA-Pro vs full fine-tuning vs LoRA (two learning rates each), one
                fine-grained MoE row and one SOLAR row, one token budget (bench/miniature.py)
  merging       math + code: linear, task arithmetic, TIES, DARE-TIES, SLERP, model_stock,
                greedy soup (bench/merge_miniature.py)
  logit-sum     math + healed, untrained and heads trained; greedy answers before/after
  proxy         healed steered by small-math - small at three alphas
  contrastive   expert healed, amateur small (bench/compose_miniature.py for these three)
  co-llm        base healed, assistant math (bench/co_llm_miniature.py)
  deep-fusion   code-fence experts vs LLaMA-Pro (bench/deep_fusion_miniature.py)
  calm          the key-value composition (bench/calm_miniature.py)

``--plan`` prints every stage with its estimated time (work in token-equivalents of full
fine-tuning of the 135M model, divided by a *measured* tokens/s: the reference family's own
training when it exists, else a 3-step calibration run) and runs nothing else. While it
runs, a line every ``--every`` seconds gives the stage, its training step and the ETA.

Every stage is cached as soon as it ends (OUT/done/STAGE.json: its key, inputs, wall time),
keyed by its inputs: the models' keys, the script's content and its arguments. Inside a stage
each training run, evaluation and model is cached by the stage's own script, and an
interrupted training run resumes from its last checkpoint, so a killed pipeline continues
where it stopped. ``--budget tiny --base DIR`` runs the same pipeline on a tiny model with
tiny budgets (the test of this file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import reference_models as rm  # noqa: E402

FAMILY = [s.name for s in rm.STAGES]
# relative training cost per token of each family stage's model (the small ones: 20 of 30 blocks)
SIZE = {"healed": 1.0, "math": 1.0, "code": 1.0, "small-cut": 0.7, "small": 0.7, "small-math": 0.7}
FORWARD = 1 / 3  # one forward token, in training tokens (forward + backward ~ 3 forwards)

# What each budget gives every stage. "full" is the one docs/results.md reports.
BUDGETS: dict[str, dict[str, Any]] = {
    "full": dict(seq=256, batch=4, eval_tokens=16384, mini_eval_tokens=8192, family_overrides=None,
                 max_segments=None, expansion_steps=80, train_tokens=40960, prompts=100, new_tokens=64, soup_tokens=4096,
                 calm=dict(aug=500, anchor=600, bridge=1000), marker=None, answer_seq=None),
    "tiny": dict(seq=32, batch=2, eval_tokens=128, mini_eval_tokens=128,
                 family_overrides=dict(seq_len=32, batch_size=2, max_steps=2, warmup_steps=1, save_every=0),
                 max_segments=2, expansion_steps=2, train_tokens=128, prompts=2, new_tokens=4, soup_tokens=128,
                 calm=dict(aug=5, anchor=5, bridge=3), marker="(",  # the tiny tokenizer has no ``` token
                 answer_seq=256),  # Co-LLM learns from answers only: a tiny block must reach past the question
}

EXPANSION_ROWS = ["llama-pro@3e-4", "llama-pro@1e-4", "full-ft@3e-5", "full-ft@1e-5", "lora@2e-4", "lora@5e-5",
                  "moe-fg@1e-4", "solar@3e-5"]
# training cost per token of each expansion row, relative to full fine-tuning of the base
ROW_COST = {"llama-pro": 0.9, "full-ft": 1.0, "lora": 0.85, "moe-fg": 1.2, "solar": 1.35}


@dataclass
class Stage:
    name: str
    needs: tuple[str, ...]  # reference models it reads (their keys are part of its key)
    script: str  # under bench/
    args: Callable[[dict, dict[str, str], Path], list[str]]  # (budget, models, out) -> script arguments
    work: Callable[[dict], float]  # budget -> token-equivalents of full fine-tuning
    seconds: float = 0.0  # fixed cost not in tokens (the toy CALM models)
    watch: Callable[[Path], list[Path]] = field(default=lambda out: [out])
    # small result files (globs under the stage's directory) its script reuses when their keys still
    # hold: mirrored into --keep as they appear, and put back from there before the stage runs
    keep: tuple[str, ...] = ()


def _family_stage(name: str) -> Stage:
    size = SIZE[name]

    def work(b: dict) -> float:
        if name == "small-cut":
            return 500.0
        segs = rm.BY_NAME[name].max_segments
        if segs > 1 and b["max_segments"]:
            segs = min(segs, b["max_segments"])
        o = b["family_overrides"] or {}
        per_seg = (o.get("max_steps", 40) * o.get("batch_size", b["batch"]) * o.get("seq_len", b["seq"]))
        evals = (segs + 1) * len(rm.PLATEAU_SETS) * b["eval_tokens"] * FORWARD if segs > 1 else 0
        return size * (segs * per_seg + evals)

    def args(b: dict, models: dict[str, str], out: Path) -> list[str]:
        return ["--only", name, "--no-table", *_family_common(b)]

    return Stage(f"family:{name}", (), "reference_models.py", args, work,
                 watch=lambda out: [_family_root() / ".build"])


FAMILY_CTX: dict[str, Any] = {}  # base, data_root, root: set by main()


def _family_root() -> Path:
    return FAMILY_CTX["root"]


def _family_common(b: dict) -> list[str]:
    a = ["--base", FAMILY_CTX["base"], "--data-root", str(FAMILY_CTX["data_root"]), "--root", str(_family_root()),
         "--eval-tokens", str(b["eval_tokens"]), "--eval-seq", str(b["seq"])]
    if b["family_overrides"]:
        a += ["--overrides", json.dumps(b["family_overrides"], sort_keys=True)]
    if b["max_segments"]:
        a += ["--max-segments", str(b["max_segments"])]
    return a


def _common(b: dict) -> list[str]:
    return ["--eval-tokens", str(b["mini_eval_tokens"]), "--seq-len", str(b["seq"]), "--batch-size", str(b["batch"])]


def _ev(b: dict, models: float, sets: int, tokens: str = "mini_eval_tokens") -> float:
    return models * sets * b[tokens] * FORWARD


STAGES: list[Stage] = [_family_stage(n) for n in FAMILY] + [
    Stage("family-table", tuple(FAMILY), "reference_models.py",
          lambda b, m, out: ["--json", str(out / "family.json"), "--doc", str(out / "family.md"),
                             *_family_common(b)],
          lambda b: _ev(b, 6.1, 4, "eval_tokens")),
    Stage("merging", ("healed", "math", "code"), "merge_miniature.py",
          lambda b, m, out: ["--healed", m["healed"], "--math", m["math"], "--code", m["code"], "--out", str(out),
                             "--soup-tokens", str(b["soup_tokens"]), *_common(b)],
          lambda b: _ev(b, 10, 4) + 9 * 2 * b["soup_tokens"] * FORWARD),
    Stage("logit-sum", ("healed", "math"), "compose_miniature.py",
          lambda b, m, out: ["--only", "sum", "--healed", m["healed"], "--math", m["math"], "--out", str(out),
                             "--train-tokens", str(b["train_tokens"]), "--answer-tokens", str(b["new_tokens"] // 2),
                             *_common(b)],
          lambda b: 0.8 * b["train_tokens"] + _ev(b, 6, 3) + 4 * 8 * b["new_tokens"] // 2 * 1.5),
    Stage("proxy", ("healed", "math", "small", "small-math"), "compose_miniature.py",
          lambda b, m, out: ["--only", "proxy", *[x for n in ("healed", "math", "small", "small-math")
                                                  for x in (f"--{n}", m[n])], "--out", str(out), *_common(b)],
          lambda b: _ev(b, 9.9, 1)),
    Stage("contrastive", ("healed", "small"), "compose_miniature.py",
          lambda b, m, out: ["--only", "cd", "--healed", m["healed"], "--small", m["small"], "--out", str(out),
                             "--prompts", str(b["prompts"]), "--new-tokens", str(b["new_tokens"]), *_common(b)],
          lambda b: 4 * b["prompts"] * (b["new_tokens"] * 1.7 + (32 + b["new_tokens"]) * FORWARD)),
    Stage("co-llm", ("healed", "math"), "co_llm_miniature.py",
          lambda b, m, out: ["--healed", m["healed"], "--math", m["math"], "--out", str(out),
                             "--train-tokens", str(b["train_tokens"]), *_common({**b, "seq": b["answer_seq"] or b["seq"]})],
          lambda b: 3.2 * b["train_tokens"] + _ev(b, 6.4, 4)),
    Stage("deep-fusion", ("healed",), "deep_fusion_miniature.py",
          lambda b, m, out: ["--healed", m["healed"], "--out", str(out), "--train-tokens", str(b["train_tokens"]),
                             *(["--open", b["marker"]] if b["marker"] else []), *_common(b)],
          lambda b: 2.1 * b["train_tokens"] + _ev(b, 3, 3)),
    Stage("calm", (), "calm_miniature.py",
          lambda b, m, out: ["--out", str(out / "run"), "--aug-steps", str(b["calm"]["aug"]), "--anchor-steps",
                             str(b["calm"]["anchor"]), "--bridge-steps", str(b["calm"]["bridge"])],
          lambda b: 0.0, seconds=0.0),
    Stage("expansion", ("healed",), "miniature.py",
          lambda b, m, out: ["--base-dir", m["healed"], "--steps", str(b["expansion_steps"]), "--rows",
                             ",".join(EXPANSION_ROWS), "--out", str(out), *_common(b)],
          lambda b: sum(ROW_COST[r.split("@")[0]] for r in EXPANSION_ROWS) * b["expansion_steps"] * b["batch"]
          * b["seq"] + _ev(b, len(EXPANSION_ROWS) + 1, 3), keep=("rows/*.json", "eval-base-*/results.json")),
]
# the longest miniature last: every other verdict exists hours before it ends
BY_NAME = {s.name: s for s in STAGES}


def calm_seconds(b: dict) -> float:
    """The toy CALM models train at a rate of their own: ~0.2 s per pretraining step and
    ~0.3 s per bridge step on an idle 2-core machine (docs/calm.md)."""
    c = b["calm"]
    return 0.2 * (c["aug"] + c["anchor"]) + 0.3 * c["bridge"] * 2 + 30


# --------------------------------------------------------------------------------------- keys


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def family_keys(b: dict) -> dict[str, str]:
    """The key every reference model will have (bench/reference_models.py's own rule), without
    building anything: a stage's key can be known before its parents exist."""
    base = FAMILY_CTX["base"]
    base_key = base if Path(base).name == base else rm._sha256_dir(Path(base))
    keys: dict[str, str] = {}
    for s in rm.STAGES:
        if b["max_segments"] is not None and s.max_segments > 1:
            from dataclasses import replace

            s = replace(s, max_segments=b["max_segments"])
        parent = base_key if s.parent == "@base" else keys[s.parent]
        keys[s.name] = rm.stage_key(s, parent, FAMILY_CTX["data_root"], b["family_overrides"])
    return keys


def stage_key(stage: Stage, b: dict, keys: dict[str, str]) -> tuple[str, str]:
    """(key, directory key). The directory key: the models' keys and the arguments with model
    directories replaced by their keys (so it does not depend on where the cache is). The key
    adds the scripts' content: a changed script reruns its stage in the same directory, where
    the script's own caches (rows, evaluations, training runs, keyed by what they compute)
    keep what still holds, rather than starting over in a new one."""
    if stage.name.startswith("family"):
        needs = FAMILY if stage.name == "family-table" else [stage.name.split(":", 1)[1]]
        models = {n: keys[n] for n in needs}
    else:
        models = {n: keys[n] for n in stage.needs}
    args = stage.args(b, {n: f"@{n}" for n in FAMILY}, Path("@out"))
    script = (ROOT / "bench" / stage.script).read_bytes()
    extra = [(ROOT / "bench" / f).read_bytes() for f in ("miniature.py", "_common.py")
             if stage.script != f and (ROOT / "bench" / f).is_file()]
    if stage.name.startswith("family"):  # the builder keys its own models; the table adds its eval settings
        parts = [stage.name, models, b["eval_tokens"], b["seq"]]
        if stage.name == "family-table":  # what it writes is this script's doing
            parts += [args[:4]]
        scripts = [_sha(script)] if stage.name == "family-table" else []
    else:
        parts = [stage.name, models, args]
        scripts = [_sha(script), *[_sha(x) for x in extra]]
    dir_key = _sha(json.dumps(parts, sort_keys=True, default=str).encode())[:12]
    return _sha(json.dumps([dir_key, scripts]).encode())[:12], dir_key


# --------------------------------------------------------------------------------- throughput


def _fastest(segments: list[dict]) -> float:
    """The rate of the fastest segment: what the machine does when nothing else runs on it
    (a segment that shared the cores with other work is slower, and would inflate every
    estimate; the plan is for an idle machine)."""
    return max(s["tokens"] / s["seconds"] for s in segments)


def throughput(out: Path, b: dict) -> tuple[float, str]:
    """Tokens/s of full fine-tuning of the base, measured: from the reference family's own
    training when one of its models exists, else from a 3-step calibration run (cached)."""
    root = _family_root()
    for meta in sorted(root.glob("*/lmexpand.json")):
        ref = json.loads(meta.read_text()).get("reference", {})
        if ref.get("name") == "healed" and ref.get("seconds"):
            return _fastest(ref["segments"]), "the healed model's fastest segment"
    for seg_log in sorted(root.glob(".build/healed-*/segments.json")):
        segs = json.loads(seg_log.read_text())
        if segs:
            return _fastest(segs), "the fastest healing segment so far"
    cal = out / "throughput.json"
    if cal.is_file():
        c = json.loads(cal.read_text())
        if c.get("base") == FAMILY_CTX["base"] and c.get("seq") == b["seq"]:
            return c["tokens_per_s"], "a 3-step calibration run"
    run = out / "calibration"
    data = FAMILY_CTX["data_root"] / "general-english" / "openstax-humanities" / "train.txt"
    _run([sys.executable, "-m", "lmexpand", "-q", "train", "--model", FAMILY_CTX["base"], "--data", str(data),
          "--trainable", "all", "--seq-len", str(b["seq"]), "--batch-size", str(b["batch"]), "--max-steps", "3",
          "--warmup-steps", "1", "--val-every", "0", "--save-every", "0", "--no-tensorboard", "--out", str(run),
          "--force"], quiet=True)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    tps = last["tokens_per_s"]
    cal.write_text(json.dumps({"base": FAMILY_CTX["base"], "seq": b["seq"], "tokens_per_s": tps}))
    return tps, "a 3-step calibration run"


def estimate(stage: Stage, b: dict, tps: float) -> float:
    seconds = calm_seconds(b) if stage.name == "calm" else stage.seconds
    return stage.work(b) / tps + seconds


# ------------------------------------------------------------------------------------ keeping


def _dir_name(stage: Stage, dir_key: str) -> str:
    """A stage's directory name, under OUT and under --keep alike."""
    return f"{stage.name.replace(':', '-')}-{dir_key}"


def mirror(stage: Stage, stage_out: Path, kept: Path) -> int:
    """Copy the stage's finished small results (``stage.keep``) into ``kept``: a directory that
    is committed, so a replaced machine loses at most the row that was running. Each file is
    written whole (temporary name, then rename), and only once it parses: returns how many were
    new or changed."""
    n = 0
    for pattern in stage.keep:
        for src in stage_out.glob(pattern):
            dst = kept / src.relative_to(stage_out)
            data = src.read_bytes()
            if dst.is_file() and dst.read_bytes() == data:
                continue
            try:  # a file its script is still writing is taken on the next pass
                json.loads(data)
            except ValueError:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dst)
            n += 1
    return n


def restore(stage: Stage, stage_out: Path, kept: Path) -> int:
    """Put the kept results back into a stage directory that lacks them (a new machine): the
    stage's script then reuses every one whose key still holds, and recomputes the rest."""
    n = 0
    for pattern in stage.keep:
        for src in kept.glob(pattern):
            dst = stage_out / src.relative_to(kept)
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
                n += 1
    return n


def prune(keep: Path, current: set[str]) -> None:
    """Drop kept directories that no stage's present inputs name any more."""
    if keep.is_dir():
        for d in keep.iterdir():
            if d.is_dir() and d.name not in current:
                shutil.rmtree(d)


# ------------------------------------------------------------------------------------ running


def _run(cmd: list[str], quiet: bool = False, log: Path | None = None) -> None:
    env = {**os.environ, "LMEXPAND_BENCH_DATA": str(FAMILY_CTX["data_root"]), "LMEXPAND_NO_PROGRESS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(log, "a") if log else open(os.devnull, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                sink.write(line)
                tail = (tail + [line])[-40:]
                if not quiet and log is None:
                    print("    " + line, end="", flush=True)
            code = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
    if code:
        raise SystemExit(f"results: `{' '.join(cmd)}` exited {code}:\n{''.join(tail)}")


def training_progress(dirs: list[Path]) -> str:
    """The newest training run under the stage's directories: 'run NAME step S/T'."""
    newest, when = None, 0.0
    for d in dirs:
        if d.is_dir():
            for m in d.rglob("metrics.jsonl"):
                t = m.stat().st_mtime
                if t > when:
                    newest, when = m, t
    if newest is None or time.time() - when > 900:
        return ""
    try:
        step = json.loads(newest.read_text().splitlines()[-1])["step"]
        total = json.loads((newest.parent / "train_config.json").read_text())["max_steps"]
    except (OSError, ValueError, KeyError, IndexError):
        return ""
    return f", training {newest.parent.name} step {step}/{total}"


def _fmt(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, m = divmod(seconds // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{seconds % 60:02d}s"


def print_plan(plan: list[tuple[Stage, str, str, float, bool]], tps: float, source: str) -> None:
    print(f"results: {tps:.0f} training tokens/s (measured: {source})")
    print(f"{'stage':<20} {'key':<13} {'estimate':>9}  state")
    total = 0.0
    for stage, key, _, est, done in plan:
        print(f"{stage.name:<20} {key:<13} {_fmt(est):>9}  {'cached' if done else 'to run'}")
        total += 0 if done else est
    print(f"{'left to run':<20} {'':<13} {_fmt(total):>9}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", action="store_true", help="print the stages with their estimated time; run nothing")
    ap.add_argument("--only", default=None, help="comma-separated stages (default: all; the family is built "
                                                   "first whenever a stage needs it)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "results")
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    ap.add_argument("--base", default="smollm2-135m", help="the model the family descends from")
    ap.add_argument("--data-root", type=Path, default=rm.SHARED_DATA)
    ap.add_argument("--family-root", type=Path, default=None, help="default $LMEXPAND_CACHE/reference")
    ap.add_argument("--every", type=float, default=60.0, help="seconds between progress lines")
    ap.add_argument("--doc", type=Path, default=None, help="write the measured tables into this Markdown file")
    ap.add_argument("--keep", type=Path, default=None,
                    help="where each stage's finished rows are mirrored as they appear (default: bench/results-kept "
                         "for the full budget, committed; OUT/kept otherwise)")
    a = ap.parse_args(argv)
    b = BUDGETS[a.budget]
    FAMILY_CTX.update(base=a.base, data_root=a.data_root.resolve(),
                      root=(a.family_root or rm.cache_root()).resolve())
    out = a.out.resolve()
    (out / "done").mkdir(parents=True, exist_ok=True)
    keep = (a.keep or (ROOT / "bench" / "results-kept" if a.budget == "full" else out / "kept")).resolve()
    wanted = [s.strip() for s in a.only.split(",")] if a.only else [s.name for s in STAGES]
    unknown = [w for w in wanted if w not in BY_NAME]
    if unknown:
        print(f"results: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    if a.only:  # the family models a chosen stage reads come first
        need = {n for w in wanted for n in BY_NAME[w].needs}
        for n in list(need):
            s = rm.BY_NAME[n]
            while s.parent != "@base":
                need.add(s.parent)
                s = rm.BY_NAME[s.parent]
        wanted = [s.name for s in STAGES if s.name in wanted or s.name.split(":", 1)[-1] in need]
    keys = family_keys(b)
    tps, source = throughput(out, b)
    plan = []
    for s in STAGES:
        if s.name in wanted:
            key, dir_key = stage_key(s, b, keys)
            marker = out / "done" / f"{s.name.replace(':', '-')}.json"
            done = marker.is_file() and json.loads(marker.read_text()).get("key") == key
            plan.append((s, key, dir_key, estimate(s, b, tps), done))
    print_plan(plan, tps, source)
    if a.plan:
        return 0
    prune(keep, {_dir_name(s, stage_key(s, b, keys)[1]) for s in STAGES if s.keep})
    left = sum(e for _, _, _, e, d in plan if not d)
    t_all = time.perf_counter()
    for i, (stage, key, dir_key, est, done) in enumerate(plan, 1):
        label = f"[{i}/{len(plan)} {stage.name}]"
        if done:
            print(f"{label} cached", flush=True)
            continue
        stage_out = out / _dir_name(stage, dir_key)
        stage_out.mkdir(parents=True, exist_ok=True)
        kept = keep / stage_out.name
        if restore(stage, stage_out, kept):
            print(f"{label} reusing the rows kept in {kept}", flush=True)
        models = {n: _model_dir(n, keys) for n in stage.needs}
        cmd = [sys.executable, str(ROOT / "bench" / stage.script), *stage.args(b, models, stage_out)]
        print(f"{label} start (estimate {_fmt(est)}; pipeline left {_fmt(left)})", flush=True)
        t0 = time.perf_counter()
        stop = threading.Event()

        def beat(stage=stage, stage_out=stage_out, est=est, t0=t0, left=left, label=label) -> None:
            while not stop.wait(a.every):
                mirror(stage, stage_out, kept)
                el = time.perf_counter() - t0
                print(f"{label} {_fmt(el)} of ~{_fmt(est)}{training_progress(stage.watch(stage_out))}; "
                      f"pipeline ETA {_fmt(max(left - el, est - el, 0))}", flush=True)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            _run(cmd, log=stage_out / "log.txt")
        finally:
            stop.set()
            mirror(stage, stage_out, kept)
        seconds = time.perf_counter() - t0
        record = {"stage": stage.name, "key": key, "script": f"bench/{stage.script}",
                  "args": stage.args(b, {n: f"@{n}" for n in FAMILY}, Path("@out")),
                  "models": {n: {"dir": models[n], "key": keys[n]} for n in stage.needs},
                  "budget": a.budget, "seconds": round(seconds, 1), "estimate_s": round(est, 1),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "out": str(stage_out)}
        marker = out / "done" / f"{stage.name.replace(':', '-')}.json"
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, marker)
        left -= est
        print(f"{label} done in {_fmt(seconds)} (estimate {_fmt(est)})", flush=True)
    print(f"results: every stage done ({_fmt(time.perf_counter() - t_all)} this run)", flush=True)
    if a.doc:
        from bench.results_doc import write_doc

        write_doc(out, a.doc)
    return 0


def _model_dir(name: str, keys: dict[str, str]) -> str:
    d = _family_root() / f"{name}-{keys[name]}"
    if not (d / "lmexpand.json").is_file():
        raise SystemExit(f"results: reference model {name} ({d}) is missing: run its family stage first")
    return str(d)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("results: interrupted; the next run continues where this one stopped", file=sys.stderr)
        sys.exit(130)
