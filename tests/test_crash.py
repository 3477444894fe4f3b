"""Crash safety: SIGKILL at named points of surgery, train, export and run (in a subprocess),
then the same command again.

After every kill: the target either does not exist or is a complete, verifiable output
(the old one or the new one, never a mix); after the re-run: the same bytes as an
uninterrupted run (surgery, export) or the same losses and final weights (train, run),
and no temporary directory is left beside the target.

The points are the places where a crash could leave something behind: in the middle of a
shard, between shards, after the last shard before the rename, between swapping an old
output out and removing it, inside a training checkpoint, between training steps, between
recipe stages. ``docs/reliability.md`` lists them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmexpand.checkpoint.verify import verify
from tests.conftest import GSM8K_TEST

CMD = [sys.executable, "-m", "lmexpand", "-q"]
ENV = {**os.environ, "LMEXPAND_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("LMEXPAND_KILL_AT", None)
TEMPLATE = "Question: {question}\nAnswer: {answer}"
SHARD = "60KB"  # the tiny models (~220 KB) then write several shards


def cli(args: list, *, kill: str | None = None, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(ENV)
    if kill:
        env["LMEXPAND_KILL_AT"] = kill
    if fault:
        env["LMEXPAND_FAULT"] = fault
    return subprocess.run(CMD + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=600)


def digest(d: Path) -> dict[str, str]:
    """sha256 of every file of an output dir; lmexpand.json without its timestamps."""
    out = {}
    for p in sorted(d.iterdir()):
        data = p.read_bytes()
        if p.name == "lmexpand.json":
            rec = json.loads(data)
            rec.pop("created", None)
            for h in (rec.get("history") or []) + (rec.get("training") or []):
                h.pop("created", None)
                h.pop("finished", None)
            data = json.dumps(rec, sort_keys=True).encode()
        out[p.name] = hashlib.sha256(data).hexdigest()
    return out


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.glob(f".{target.name}.lmexpand-*"))


def shard_names(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def assert_complete_or_absent(target: Path, *allowed: dict[str, str]) -> None:
    if not target.exists():
        return
    report = verify(target, values="all")
    assert report.ok, report.problems
    if allowed:
        assert digest(target) in allowed


# -- surgery ---------------------------------------------------------------------------
def _n_shards(out: Path) -> int:
    return len(list(out.glob("model-*.safetensors"))) or 1


SURGERIES = {
    "llama-pro": ["surgery", "llama-pro", "{src}", "{out}", "--add", "2", "--max-shard-size", SHARD],
    "upscale": ["surgery", "upscale", "{src}", "{out}", "--drop", "1"],
    "moe": ["surgery", "moe", "{src}", "{out}", "--experts", "4", "--top-k", "2"],
}


@pytest.fixture(scope="module")
def references(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash-ref")
    refs = {}
    for name, argv in SURGERIES.items():
        out = root / name
        r = cli([a.format(src=tiny_llama, out=out) for a in argv])
        assert r.returncode == 0, r.stderr
        refs[name] = (digest(out), _n_shards(out))
    return refs


def _surgery_points():
    # (surgery, kill point factory given the reference's shard count)
    yield "llama-pro", lambda n: f"write:mid-shard:{shard_names(n)[0]}"
    yield "llama-pro", lambda n: f"write:after-shard:{shard_names(n)[0]}"
    yield "llama-pro", lambda n: f"write:mid-shard:{shard_names(n)[n // 2]}"
    yield "llama-pro", lambda n: f"write:mid-shard:{shard_names(n)[-1]}"
    yield "llama-pro", lambda n: f"write:after-shard:{shard_names(n)[-1]}"
    yield "llama-pro", lambda n: "write:before-rename"
    yield "upscale", lambda n: "write:mid-shard:model.safetensors"
    yield "upscale", lambda n: "write:before-rename"
    yield "moe", lambda n: "write:mid-shard:model.safetensors"
    yield "moe", lambda n: "write:before-rename"


@pytest.mark.parametrize("surgery, point", list(_surgery_points()),
                         ids=[f"{s}-{i}" for i, (s, _) in enumerate(_surgery_points())])
def test_surgery_killed_then_rerun_gives_the_same_bytes(tiny_llama, references, tmp_path, surgery, point):
    ref, n = references[surgery]
    point = point(n)
    out = tmp_path / "out"
    argv = [a.format(src=tiny_llama, out=out) for a in SURGERIES[surgery]]
    r = cli(argv, kill=point)
    assert r.returncode == -signal.SIGKILL, f"{point} not reached: {r.returncode} {r.stderr}"
    assert not out.exists()  # a fresh target appears only complete
    assert leftovers(out), "the killed run should leave its partial dir (cleaned by the next run)"
    r = cli(argv)
    assert r.returncode == 0, r.stderr
    assert digest(out) == ref
    assert leftovers(out) == []


@pytest.mark.parametrize("point", ["write:before-rename", "write:after-swap", "write:mid-shard:model.safetensors"])
def test_replacing_an_output_killed_keeps_old_or_new_never_a_mix(tiny_llama, references, tmp_path, point):
    out = tmp_path / "out"
    assert cli(["surgery", "llama-pro", tiny_llama, out, "--add", "1"]).returncode == 0
    old = digest(out)
    argv = ["surgery", "upscale", tiny_llama, out, "--drop", "1", "--force"]
    r = cli(argv, kill=point)
    assert r.returncode == -signal.SIGKILL, f"{point} not reached: {r.stderr}"
    assert out.is_dir()
    assert_complete_or_absent(out, old, references["upscale"][0])
    r = cli(argv)
    assert r.returncode == 0, r.stderr
    assert digest(out) == references["upscale"][0] and leftovers(out) == []


def test_killed_at_random_moments(tiny_llama, references, tmp_path):
    """SIGKILL from outside after a random delay (seeded), whatever the process is doing."""
    rng = random.Random(10)
    argv = [a.format(src=tiny_llama, out=tmp_path / "out") for a in SURGERIES["llama-pro"]]
    out = tmp_path / "out"
    t0 = time.perf_counter()
    assert cli(argv).returncode == 0
    full = time.perf_counter() - t0
    for _ in range(4):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        proc = subprocess.Popen(CMD + [str(a) for a in argv], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, full))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_complete_or_absent(out, references["llama-pro"][0])
    r = cli(argv + ["--force"])
    assert r.returncode == 0, r.stderr
    assert digest(out) == references["llama-pro"][0] and leftovers(out) == []


# -- train -----------------------------------------------------------------------------
def train_argv(model: Path, data: Path, out: Path) -> list:
    return ["train", "--model", model, "--data", data, "--template", TEMPLATE, "--out", out, "--seq-len", "32",
            "--batch-size", "4", "--max-steps", "10", "--warmup-steps", "2", "--lr", "3e-3", "--val-every", "5",
            "--save-every", "4", "--no-tensorboard"]


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def train_reference(tiny_pro, gsm8k_small, tmp_path_factory):
    """The uninterrupted run's losses and model digest, and how long the run took (the
    window test_train_killed_at_random_moments draws its kill moments from)."""
    run = tmp_path_factory.mktemp("crash-train") / "run"
    t0 = time.perf_counter()
    r = cli(train_argv(tiny_pro, gsm8k_small, run))
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    return losses(run), digest(run / "model"), seconds


@pytest.mark.parametrize("point", [
    "train:after-step:1",                       # before any checkpoint: start over
    "train:checkpoint-files-written",           # inside the first checkpoint
    "train:checkpoint-before-rename",
    "train:after-step:6",                       # between checkpoints
    "write:mid-shard:model.safetensors",        # writing the final model
    "write:before-rename",
])
def test_train_killed_then_resumed_gives_the_same_losses(tiny_pro, gsm8k_small, train_reference, tmp_path, point):
    ref_losses, ref_model, _ = train_reference
    run = tmp_path / "run"
    argv = train_argv(tiny_pro, gsm8k_small, run)
    r = cli(argv, kill=point)
    assert r.returncode == -signal.SIGKILL, f"{point} not reached: {r.stderr}"
    assert not (run / "model").exists()
    for ckpt in (run / "checkpoints").glob("step-*") if (run / "checkpoints").exists() else []:
        assert (ckpt / "state.json").is_file()  # a checkpoint dir is only ever complete
    has_ckpt = any((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else False
    r = cli(argv + (["--resume"] if has_ckpt else ["--force"]))
    assert r.returncode == 0, r.stderr
    assert losses(run) == ref_losses  # exact, fp32 CPU
    assert digest(run / "model") == ref_model
    assert not list((run / "checkpoints").glob(".step-*")), "half-written checkpoint left behind"


# -- export ----------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["mid-shard:first", "after-shard:second", "before-rename"])
def test_export_killed_then_rerun_gives_the_same_bytes(tiny_pro, tmp_path, point):
    ref = tmp_path / "ref"
    assert cli(["export", tiny_pro, ref, "--max-shard-size", "300KB"]).returncode == 0
    names = shard_names(_n_shards(ref))
    assert len(names) >= 3
    point = "write:" + point.replace(":first", ":" + names[0]).replace(":second", ":" + names[1])
    out = tmp_path / "out"
    argv = ["export", tiny_pro, out, "--max-shard-size", "300KB"]
    r = cli(argv, kill=point)
    assert r.returncode == -signal.SIGKILL, f"{point} not reached: {r.stderr}"
    assert not out.exists()
    r = cli(argv)
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(ref) and leftovers(out) == []


# -- run -------------------------------------------------------------------------------
def _recipe(dirpath: Path, source: Path, data: Path) -> Path:
    import yaml

    dirpath.mkdir(parents=True)
    recipe = {
        "workdir": "work",
        "surgery": {"method": "llama-pro", "source": str(source), "args": {"add": 2}},
        "train": {"data": [{"path": str(data), "template": TEMPLATE}], "seq_len": 32, "batch_size": 2,
                  "max_steps": 6, "warmup_steps": 1, "save_every": 2, "val_every": 3, "tensorboard": False},
        "eval": {"data": {"math": str(GSM8K_TEST)}, "template": TEMPLATE, "max_tokens": 128, "seq_len": 32,
                 "samples": False},
        "export": {},
    }
    (dirpath / "r.yaml").write_text(yaml.safe_dump(recipe))
    return dirpath / "r.yaml"


def _weights(d: Path) -> dict[str, str]:
    return {k: v for k, v in digest(d).items() if k.endswith(".safetensors")}


@pytest.fixture(scope="module")
def run_reference(tiny_llama, gsm8k_small, tmp_path_factory):
    recipe = _recipe(tmp_path_factory.mktemp("crash-run") / "ref", tiny_llama, gsm8k_small)
    r = cli(["run", recipe])
    assert r.returncode == 0, r.stderr
    work = recipe.parent / "work"
    return losses(work / "train"), _weights(work / "export")


@pytest.mark.parametrize("point", ["write:before-rename", "run:after-surgery", "train:after-step:3",
                                   "run:after-train"])
def test_run_killed_then_rerun_finishes_the_same(tiny_llama, gsm8k_small, run_reference, tmp_path, point):
    recipe = _recipe(tmp_path / "job", tiny_llama, gsm8k_small)
    r = cli(["run", recipe], kill=point)
    assert r.returncode == -signal.SIGKILL, f"{point} not reached: {r.stderr}"
    work = recipe.parent / "work"
    for stage in ("expanded", "train/model", "export"):
        assert_complete_or_absent(work / stage)
    r = cli(["run", recipe])
    assert r.returncode == 0, r.stderr
    ref_losses, ref_weights = run_reference
    assert losses(work / "train") == ref_losses
    assert _weights(work / "export") == ref_weights


def _kill_after(argv: list, delay: float) -> None:
    proc = subprocess.Popen(CMD + [str(a) for a in argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_train_killed_at_random_moments(tiny_pro, gsm8k_small, train_reference, tmp_path):
    """Three external SIGKILLs at random moments of one run (seeded), resuming each time;
    the moments are drawn within the duration of the reference run (the same command)."""
    ref_losses, ref_model, full = train_reference
    rng = random.Random(11)
    run = tmp_path / "run"
    argv = train_argv(tiny_pro, gsm8k_small, run)
    started = False
    for _ in range(3):
        has_ckpt = (run / "checkpoints").exists() and any((run / "checkpoints").glob("step-*"))
        extra = ["--resume"] if has_ckpt else (["--force"] if started else [])
        _kill_after(argv + extra, rng.uniform(0.5, full))
        started = True
        assert not (run / "model").exists() or verify(run / "model").ok
        if (run / "model").exists():
            break  # finished before the kill
    has_ckpt = (run / "checkpoints").exists() and any((run / "checkpoints").glob("step-*"))
    if not (run / "model").exists():
        r = cli(argv + (["--resume"] if has_ckpt else ["--force"]))
        assert r.returncode == 0, r.stderr
    assert losses(run) == ref_losses
    assert digest(run / "model") == ref_model


def test_export_killed_at_random_moments(tiny_pro, tmp_path):
    rng = random.Random(12)
    ref, out = tmp_path / "ref", tmp_path / "out"
    argv = ["export", tiny_pro, out, "--max-shard-size", "300KB"]
    t0 = time.perf_counter()
    assert cli(["export", tiny_pro, ref, "--max-shard-size", "300KB"]).returncode == 0
    full = time.perf_counter() - t0
    for _ in range(3):
        if out.exists():
            import shutil

            shutil.rmtree(out)
        _kill_after(argv, rng.uniform(0.3, full))
        assert_complete_or_absent(out, digest(ref))
    r = cli(argv + ["--force"])
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(ref) and leftovers(out) == []
