"""Reliability, round two: inputs never modified (also under --force), non-finite training
stops with the checkpoints kept, adapted defaults, Ctrl-C, one `run` per workdir."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmexpand.cli import main
from tests.conftest import GSM8K_TEST

TEMPLATE = "Question: {question}\nAnswer: {answer}"
CMD = [sys.executable, "-m", "lmexpand"]
ENV = {**os.environ, "LMEXPAND_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under ``roots``."""
    out = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def train_args(model, data, out, *extra) -> list[str]:
    return [str(a) for a in ["train", "--model", model, "--data", data, "--template", TEMPLATE, "--out", out,
                             "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1",
                             "--no-tensorboard", "--val-every", "0", *extra]]


def test_no_command_modifies_its_inputs_under_force(tiny_llama, gsm8k_small, tmp_path, capsys):
    """Every writing command, run twice with --force over its previous output: the inputs
    (model dirs, data, recipe) are bit-for-bit what they were."""
    src = tmp_path / "inputs" / "tiny"
    shutil.copytree(tiny_llama, src)
    data = tmp_path / "inputs" / "data.jsonl"
    shutil.copy(gsm8k_small, data)
    recipe = tmp_path / "inputs" / "job" / "r.yaml"
    recipe.parent.mkdir()
    import yaml

    recipe.write_text(yaml.safe_dump({
        "workdir": str(tmp_path / "job-work"),
        "surgery": {"method": "llama-pro", "source": str(src), "args": {"add": 1}},
        "train": {"data": [{"path": str(data), "template": TEMPLATE}], "seq_len": 32, "batch_size": 2,
                  "max_steps": 2, "warmup_steps": 1, "tensorboard": False, "val_every": 0},
        "eval": {"data": {"math": str(GSM8K_TEST)}, "template": TEMPLATE, "max_tokens": 128, "seq_len": 32,
                 "samples": False},
        "export": {}}))
    inputs = tmp_path / "inputs"
    before = tree_digest(inputs)
    pro, run, exported, report = (tmp_path / n for n in ("pro", "run", "exported", "report"))
    for _ in range(2):
        assert main(["-q", "surgery", "llama-pro", str(src), str(pro), "--add", "1", "--force"]) == 0
        pro_before = tree_digest(pro)
        assert main(["-q", *train_args(pro, data, run, "--force")]) == 0, capsys.readouterr().err
        assert main(["-q", "export", str(run), str(exported), "--force"]) == 0
        assert main(["-q", "eval", str(run), "--data", f"math={data}", "--template", TEMPLATE, "--out", str(report),
                     "--max-tokens", "64", "--seq-len", "32", "--no-samples", "--base", str(src), "--force"]) == 0
        assert main(["-q", "run", str(recipe)]) == 0, capsys.readouterr().err
        assert tree_digest(pro) == pro_before  # train and export read it: unchanged
        assert tree_digest(inputs) == before
    # the refused forms of the same commands keep everything too (the catalogue has each one)
    assert main(["-q", *train_args(pro, data, pro, "--force")]) == 2
    assert main(["-q", *train_args(pro, data, tmp_path, "--force")]) == 2
    assert main(["-q", "export", str(pro), str(pro), "--force"]) == 2
    assert tree_digest(pro) == pro_before and tree_digest(inputs) == before


def _with_nan(pro: Path, dst: Path) -> Path:
    """A copy of a LLaMA-Pro model whose frozen layer-0 q_proj holds one NaN."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(pro, dst)
    state = load_file(dst / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_non_finite_loss_stops_training_and_keeps_checkpoints(tiny_pro, gsm8k_small, tmp_path, capsys):
    bad = _with_nan(tiny_pro, tmp_path / "nan-pro")
    run = tmp_path / "run"
    code = main(train_args(bad, gsm8k_small, run, "--no-verify-hashes"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "step 1: the gradient norm is nan" in err and "no final model was written" in err
    assert "Traceback" not in err
    assert not (run / "model").exists()
    # a run that diverges later keeps the checkpoint written before: a huge lr makes the
    # weights overflow after a few steps
    run2 = tmp_path / "run2"
    code = main(train_args(tiny_pro, gsm8k_small, run2, "--lr", "1e30", "--max-steps", "30", "--save-every", "1",
                           "--max-grad-norm", "0", "--trainable", "all"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the last good checkpoint is" in err, err
    step = int(err.split("error: step ")[1].split(":")[0])
    kept = sorted(p.name for p in (run2 / "checkpoints").iterdir())
    assert kept and kept[-1] == f"step-{step - 1:06d}", (kept, step)
    assert not (run2 / "model").exists()
    metrics = [json.loads(line) for line in (run2 / "metrics.jsonl").read_text().splitlines()]
    assert all(m["loss"] == m["loss"] for m in metrics)  # no NaN was logged as a step


def test_default_warmup_adapts_to_short_runs(tiny_pro, gsm8k_small, tmp_path, capsys):
    from lmexpand.train.config import parse_train_config

    base = {"model": str(tiny_pro), "data": [{"path": str(gsm8k_small)}], "out": str(tmp_path / "r")}
    assert parse_train_config({**base, "max_steps": 5}).warmup_steps == 0
    assert parse_train_config({**base, "max_steps": 50}).warmup_steps == 5
    assert parse_train_config({**base, "max_steps": 1000}).warmup_steps == 10
    assert parse_train_config({**base, "max_steps": 5, "warmup_steps": 3}).warmup_steps == 3
    args = [a for a in train_args(tiny_pro, gsm8k_small, tmp_path / "run") if a not in ("--warmup-steps", "1")]
    assert main(["-q", *args, "--max-steps", "5"]) == 0, capsys.readouterr().err


def _wait_for(path: Path, timeout: float = 120) -> None:
    t = time.time()
    while not path.exists():
        assert time.time() - t < timeout, f"{path} never appeared"
        time.sleep(0.1)


def _default_sigint() -> None:
    """In the child: Ctrl-C as at a terminal. A shell that runs the suite as a background job
    (`bash .ci/run &`) starts it with SIGINT ignored, children inherit that, and Python then
    never installs its KeyboardInterrupt handler: these tests would test the launcher."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_with_one_line(tiny_pro, gsm8k_small, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(CMD + train_args(tiny_pro, gsm8k_small, run, "--max-steps", "100000"), env=ENV,
                            preexec_fn=_default_sigint,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(run / "metrics.jsonl")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)")
    assert not (run / "model").exists()


def test_second_run_on_one_workdir_is_refused(tiny_llama, gsm8k_small, tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "workdir": "work",
        "train": {"model": str(tiny_llama), "trainable": "all", "data": [{"path": str(gsm8k_small),
                                                                          "template": TEMPLATE}],
                  "seq_len": 32, "batch_size": 2, "max_steps": 100000, "tensorboard": False, "val_every": 0}}))
    first = subprocess.Popen(CMD + ["run", str(recipe)], env=ENV, preexec_fn=_default_sigint, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_for(tmp_path / "work" / "train" / "metrics.jsonl")
        second = subprocess.run(CMD + ["run", str(recipe)], env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "another `lmexpand run`" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130
    # the lock goes with its process: the next run may start (and is then refused only by --check-like
    # validation, not by the lock) -- check by taking the lock again directly
    from lmexpand.recipe import _workdir_lock, load_job

    with _workdir_lock(load_job(recipe)):
        pass


def _pickle_only(src: Path, dst: Path) -> Path:
    """A legacy checkpoint: the same weights as pytorch_model.bin (torch.save), no safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    torch.save(load_file(dst / "model.safetensors"), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    return dst


def test_pickle_rule_is_the_same_for_every_command(tiny_llama, gsm8k_small, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    legacy = _pickle_only(tiny_llama, tmp_path / "legacy")
    eval_args = ["--data", f"math={gsm8k_small}", "--template", TEMPLATE, "--max-tokens", "64", "--seq-len", "32",
                 "--no-samples"]
    refused = {
        "train": train_args(legacy, gsm8k_small, tmp_path / "run0", "--trainable", "all"),
        "eval": ["eval", str(legacy), *eval_args, "--out", str(tmp_path / "e0")],
        "eval --base": ["eval", str(tiny_llama), "--base", str(legacy), *eval_args, "--out", str(tmp_path / "e1")],
        "eval --compare": ["eval", str(tiny_llama), "--compare", f"old={legacy}", *eval_args,
                           "--out", str(tmp_path / "e2")],
        "export": ["export", str(legacy), str(tmp_path / "x0")],
        "surgery": ["surgery", "llama-pro", str(legacy), str(tmp_path / "s0"), "--add", "1"],
        "verify": ["verify", str(legacy)],
    }
    for what, argv in refused.items():
        assert main(argv) == 2, what
        err = capsys.readouterr().err
        assert "--allow-pickle" in err and "Traceback" not in err, (what, err)
        help_argv = argv[:2] if argv[0] == "surgery" else argv[:1]
        assert main([*help_argv, "--help"]) == 0 and "--allow-pickle" in capsys.readouterr().out, \
            f"{what}: the message names --allow-pickle, so the command must have it"
    # with the flag: weights-only loading, and every output is safetensors with the same values
    assert main(["-q", *refused["eval"], "--allow-pickle"]) == 0, capsys.readouterr().err
    assert main(["-q", *refused["eval --base"], "--allow-pickle"]) == 0, capsys.readouterr().err
    ref = json.loads((tmp_path / "e1" / "results.json").read_text())["perplexity"]
    assert ref["base"]["math"]["ppl"] == ref["model"]["math"]["ppl"]  # same weights, either format
    assert main(["-q", *refused["export"], "--allow-pickle"]) == 0
    assert main(["-q", *refused["verify"], "--allow-pickle"]) == 0, capsys.readouterr().err
    assert main(["-q", *refused["train"], "--allow-pickle"]) == 0, capsys.readouterr().err
    for out in (tmp_path / "x0", tmp_path / "run0" / "model"):
        assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    a = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "x0").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_check_output_refuses_unwritable_parents_and_creates_nothing(tmp_path, monkeypatch):
    """As root every directory is writable, so the permission answer is simulated."""
    from lmexpand.checkpoint.writer import check_output
    from lmexpand.errors import TargetError

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(TargetError, match="not writable"):
        check_output(locked / "a" / "b" / "out")
    assert list(locked.iterdir()) == []
    check_output(tmp_path / "fine" / "out")  # a writable parent passes, and nothing is created
    assert not (tmp_path / "fine").exists()


def test_surgery_without_tokenizer_warns(tiny_llama, tmp_path, capsys):
    src = tmp_path / "no-tok"
    shutil.copytree(tiny_llama, src)
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            f.unlink()
    assert main(["surgery", "llama-pro", str(src), str(tmp_path / "out"), "--add", "1"]) == 0
    assert "has no tokenizer" in capsys.readouterr().err


def test_function_preserving_claim_is_not_made_over_computed_nan(tiny_llama, tmp_path, capsys):
    """A seam-scaled o_proj is computed from its source: a NaN there stops the surgery, and
    no "function-preserving" line is printed for it."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "nan-src"
    shutil.copytree(tiny_llama, src)
    state = load_file(src / "model.safetensors")
    state["model.layers.2.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    code = main(["surgery", "upscale", str(src), str(tmp_path / "out"), "--drop", "1", "--seam-scale", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "non-finite" in err and "o_proj" in err and "function-preserving at init" not in err, err
    assert not (tmp_path / "out").exists()
