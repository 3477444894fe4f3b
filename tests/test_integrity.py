"""Integrity and fault tests: recorded shard hashes, `lmexpand verify`, disk-full and I/O
errors injected into real runs, hostile indexes, HF-cache symlinks, absurd configs, and
concurrent use of the data cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.checkpoint.verify import verify
from lmexpand.cli import main

CMD = [sys.executable, "-m", "lmexpand", "-q"]
ENV = {**os.environ, "LMEXPAND_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
TEMPLATE = "Question: {question}\nAnswer: {answer}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): sha256(p) for p in sorted(d.rglob("*")) if p.is_file()}


# -- recorded hashes and verify ----------------------------------------------------------
@pytest.mark.parametrize("shard", ["5GB", "100KB"])
def test_every_written_shard_has_its_sha256_recorded(tiny_llama, tmp_path, shard):
    out = tmp_path / "pro"
    assert main(["surgery", "llama-pro", str(tiny_llama), str(out), "--add", "2", "--max-shard-size", shard]) == 0
    shards = json.loads((out / "lmexpand.json").read_text())["shards"]
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(shards) == files and (len(files) > 1) == (shard == "100KB")
    for name, rec in shards.items():
        assert rec == {"sha256": sha256(out / name), "bytes": (out / name).stat().st_size}


def test_export_and_trained_model_record_hashes(tiny_pro, gsm8k_small, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_pro), "--data", str(gsm8k_small), "--template", TEMPLATE, "--out",
                 str(run), "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1",
                 "--save-every", "1", "--no-tensorboard"]) == 0
    exported = tmp_path / "export"
    assert main(["export", str(run), str(exported)]) == 0
    for d in (run / "model", exported):
        shards = json.loads((d / "lmexpand.json").read_text())["shards"]
        assert {n: r["sha256"] for n, r in shards.items()} == {n: sha256(d / n) for n in shards}
        assert verify(d).ok
    ckpt = json.loads((run / "checkpoints" / "step-000001" / "state.json").read_text())
    assert ckpt["sha256"]["trainable.safetensors"] == sha256(run / "checkpoints" / "step-000001" / "trainable.safetensors")


def test_verify_passes_then_names_each_kind_of_damage(tiny_pro, tmp_path, capsys):
    assert main(["verify", str(tiny_pro)]) == 0
    assert "OK" in capsys.readouterr().out

    flipped = tmp_path / "flipped"
    shutil.copytree(tiny_pro, flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    (flipped / "model.safetensors").write_bytes(bytes(data))
    assert main(["verify", str(flipped)]) == 2
    out, err = capsys.readouterr()
    assert "FAILED" in out and "sha256 differs" in err

    # shapes that disagree with the config (hashes untouched: the config is not hashed)
    reshaped = tmp_path / "reshaped"
    shutil.copytree(tiny_pro, reshaped)
    cfg = json.loads((reshaped / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (reshaped / "config.json").write_text(json.dumps(cfg))
    report = verify(reshaped)
    assert not report.ok and any("mlp.up_proj.weight: shape" in p for p in report.problems)

    # a tensor the architecture does not have, and one missing
    extra = tmp_path / "extra"
    shutil.copytree(tiny_pro, extra)
    from safetensors.torch import load_file, save_file

    state = load_file(extra / "model.safetensors")
    state["model.layers.0.surprise"] = torch.zeros(3)
    del state["model.norm.weight"]
    save_file(state, extra / "model.safetensors", metadata={"format": "pt"})
    report = verify(extra)
    problems = " ".join(report.problems)
    assert "model.layers.0.surprise: a tensor the config's architecture does not have" in problems
    assert "model.norm.weight: missing" in problems and "recorded" in problems  # size differs: no need to hash


def test_verify_finds_nan_in_new_tensors(tiny_pro, tmp_path):
    bad = tmp_path / "nan"
    shutil.copytree(tiny_pro, bad)
    lineage = json.loads((bad / "lmexpand.json").read_text())
    name = lineage["new_parameters"][0]
    info = CheckpointReader(bad).info(name)
    with open(bad / "model.safetensors", "r+b") as f:  # one float32 NaN in a new tensor
        f.seek(info.offset)
        f.write(bytes.fromhex("0000c07f"))
    lineage["shards"]["model.safetensors"]["sha256"] = sha256(bad / "model.safetensors")  # only the NaN differs
    (bad / "lmexpand.json").write_text(json.dumps(lineage))
    report = verify(bad)
    assert report.problems == [f"{name}: 1 NaN/Inf values of {info.numel:,}"]
    assert verify(bad, values="none").ok


def test_training_refuses_changed_shards_unless_told(tiny_pro, gsm8k_small, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_pro, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-3] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(data))
    args = ["train", "--model", str(bad), "--data", str(gsm8k_small), "--template", TEMPLATE, "--out",
            str(tmp_path / "run"), "--seq-len", "32", "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "0",
            "--no-tensorboard"]
    assert main(args) == 2
    assert "sha256" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main(args + ["--no-verify-hashes"]) == 0


def test_resume_refuses_a_damaged_training_checkpoint(tiny_pro, gsm8k_small, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_pro), "--data", str(gsm8k_small), "--template", TEMPLATE, "--out", str(run),
            "--seq-len", "32", "--batch-size", "2", "--max-steps", "4", "--warmup-steps", "0", "--save-every", "2",
            "--no-tensorboard"]
    env = {**ENV, "LMEXPAND_KILL_AT": "train:after-step:3"}
    assert subprocess.run(CMD + args, env=env, capture_output=True).returncode == -9
    f = run / "checkpoints" / "step-000002" / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:-4] + b"\0\0\0\0")
    assert main(args + ["--resume"]) == 2
    assert "does not match the sha256" in capsys.readouterr().err


# -- injected disk-full and I/O errors ----------------------------------------------------
def _faulted(args: list, fault: str) -> subprocess.CompletedProcess:
    return subprocess.run(CMD + [str(a) for a in args], env={**ENV, "LMEXPAND_FAULT": fault},
                          capture_output=True, text=True, timeout=300)


FAULTS = [("ENOSPC", 0), ("ENOSPC", 150_000), ("ENOSPC", 700_000), ("EIO", 0), ("EIO", 400_000), ("EDQUOT", 300_000)]


@pytest.mark.parametrize("err, at", FAULTS, ids=[f"{e}@{a}" for e, a in FAULTS])
def test_surgery_disk_full_or_io_error_leaves_nothing(tiny_llama, tmp_path, err, at):
    before = tree_digest(tiny_llama)
    out = tmp_path / "out"
    r = _faulted(["surgery", "llama-pro", tiny_llama, out, "--add", "2", "--max-shard-size", "200KB"], f"{err}@{at}")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    if err == "EIO":
        assert "I/O error while writing" in r.stderr
    else:
        assert "disk filled up" in r.stderr and "source is untouched" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert tree_digest(tiny_llama) == before


@pytest.mark.parametrize("fault", ["ENOSPC@100000", "EIO@0"])
def test_export_and_final_training_write_report_disk_errors(tiny_pro, gsm8k_small, tmp_path, fault):
    before = tree_digest(tiny_pro)
    r = _faulted(["export", tiny_pro, tmp_path / "export"], fault)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "export").exists()
    run = tmp_path / "run"
    r = _faulted(["train", "--model", tiny_pro, "--data", gsm8k_small, "--template", TEMPLATE, "--out", run,
                  "--seq-len", "32", "--batch-size", "2", "--max-steps", "1", "--warmup-steps", "0",
                  "--no-tensorboard"], fault)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not (run / "model").exists() and not list(run.glob(".model*"))
    assert tree_digest(tiny_pro) == before


def test_a_real_full_disk_if_a_small_tmpfs_can_be_mounted(tiny_llama, tmp_path):
    """The same on a real 4 MiB filesystem (needs mount rights; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "out"
        r = subprocess.run(CMD + ["surgery", "upscale", str(tiny_llama), str(out), "--drop", "1"], env=ENV,
                           capture_output=True, text=True)
        big = subprocess.run(CMD + ["surgery", "moe", str(tiny_llama), str(mnt / "moe"), "--experts", "16"], env=ENV,
                             capture_output=True, text=True)
        assert r.returncode == 0, r.stderr  # fits
        assert big.returncode == 2 and "free" in big.stderr and not (mnt / "moe").exists()
        assert sorted(p.name for p in mnt.iterdir()) == ["out"]
    finally:
        subprocess.run(["umount", str(mnt)])


# -- hostile and unusual inputs ----------------------------------------------------------
def test_hf_cache_layout_with_symlinked_shards_is_accepted(tiny_llama, tmp_path):
    """The hub cache links snapshot files to blobs outside the snapshot directory."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for p in tiny_llama.iterdir():
        blob = blobs / hashlib.sha256(p.name.encode()).hexdigest()
        shutil.copy(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    # sharded, through an index
    index = {"metadata": {}, "weight_map": {t.name: "model.safetensors" for t in CheckpointReader(snap)}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["surgery", "llama-pro", str(snap), str(tmp_path / "out"), "--add", "1"]) == 0


def test_absurd_config_is_refused_before_anything_is_built(tiny_llama, tmp_path, capsys):
    import time

    bad = tmp_path / "absurd"
    shutil.copytree(tiny_llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    for key, value in [("num_hidden_layers", 10**12), ("vocab_size", 10**10), ("hidden_size", -1)]:
        (bad / "config.json").write_text(json.dumps({**cfg, key: value}))
        for argv in (["inspect", str(bad)], ["verify", str(bad)],
                     ["surgery", "moe", str(bad), str(tmp_path / "o"), "--experts", "4"]):
            t0 = time.perf_counter()
            assert main(argv) == 2
            assert key in capsys.readouterr().err and time.perf_counter() - t0 < 5
    assert not (tmp_path / "o").exists()


# -- concurrency -------------------------------------------------------------------------
def test_two_processes_tokenizing_into_the_same_cache(tiny_pro, gsm8k_small, tmp_path):
    """Two training runs start at once on the same data and cache: both finish with the same
    losses, and a third run afterwards reuses the cache and agrees."""
    cache = tmp_path / "cache"
    env = {**ENV, "LMEXPAND_CACHE": str(cache)}

    def args(run: Path) -> list[str]:
        return [*CMD, "train", "--model", str(tiny_pro), "--data", str(gsm8k_small), "--template", TEMPLATE,
                "--out", str(run), "--seq-len", "32", "--batch-size", "2", "--max-steps", "3", "--warmup-steps", "0",
                "--no-tensorboard"]

    procs = [subprocess.Popen(args(tmp_path / f"run{i}"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results

    def losses(run: Path) -> list[float]:
        return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]

    assert losses(tmp_path / "run0") == losses(tmp_path / "run1")
    r = subprocess.run(args(tmp_path / "run2"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert losses(tmp_path / "run2") == losses(tmp_path / "run0")


def test_two_surgeries_writing_the_same_target_at_once(tiny_llama, tmp_path):
    out = tmp_path / "out"
    runs = {"pro": ["surgery", "llama-pro", str(tiny_llama), str(out), "--add", "2", "--force"],
            "up": ["surgery", "upscale", str(tiny_llama), str(out), "--drop", "1", "--force"]}
    refs = {}
    for name, argv in runs.items():  # each alone, for reference
        ref = tmp_path / f"ref-{name}"
        assert main([*argv[:3], str(ref), *argv[4:]]) == 0
        refs[name] = {p.name: sha256(p) for p in ref.glob("*.safetensors")}
    for _ in range(2):
        procs = [subprocess.Popen(CMD + argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for argv in runs.values()]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errs
        assert verify(out).ok
        assert {p.name: sha256(p) for p in out.glob("*.safetensors")} in refs.values()
        assert not list(tmp_path.glob(".out.lmexpand-*"))
