"""Two CPU processes (gloo, torchrun) give the same training as one process with the same
global batch: the data split, gradient averaging and schedule do not depend on world size.

Data parallel (DDP) and FSDP (full sharding, original parameters, the settings of
recipes/accelerate/fsdp.yaml) are both run; FSDP through tests/fsdp_cpu.py, since accelerate
turns FSDP on only for GPUs (see there). DeepSpeed is not run: see docs/training.md."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lmexpand.checkpoint import CheckpointReader
from tests.test_train import TEMPLATE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model: Path, data: Path, out: Path, batch: int) -> list[str]:
    return ["-m", "lmexpand", "-q", "train", "--model", str(model), "--data", str(data), "--template", TEMPLATE,
            "--out", str(out), "--seq-len", "32", "--batch-size", str(batch), "--grad-accum", "2", "--max-steps", "6",
            "--warmup-steps", "1", "--lr", "3e-3", "--val-every", "3", "--no-tensorboard"]


ENV = {**os.environ, "LMEXPAND_NO_PROGRESS": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
# what `accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets, read from the file
FSDP_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp.yaml"


def _fsdp_env() -> dict[str, str]:
    import yaml

    cfg = yaml.safe_load(FSDP_CONFIG.read_text())
    env = {**ENV, "ACCELERATE_USE_FSDP": "true", "ACCELERATE_TORCH_DEVICE": "cpu"}
    for key, value in cfg["fsdp_config"].items():
        env[key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    # both need an accelerator device (accelerate's FSDP plugin asks torch.cuda for it); on
    # GPUs they stay as shipped
    env["FSDP_SYNC_MODULE_STATES"] = env["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    return env


def _run(kind: str, model: Path, data: Path, out: Path, *extra: str) -> None:
    """One training run: kind 'single' (one process, batch 4), 'ddp' or 'fsdp' (2 x batch 2)."""
    if kind == "single":
        cmd, env = [sys.executable, *_args(model, data, out, 4), *extra], ENV
    else:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        args = _args(model, data, out, 2)[2:] + list(extra)  # without "-m lmexpand"
        if kind == "ddp":
            cmd, env = torchrun + ["--module", "lmexpand"] + args, ENV
        else:
            cmd, env = torchrun + [str(Path(__file__).with_name("fsdp_cpu.py"))] + args, _fsdp_env()
    # faulthandler in every Python process of the run: if it hangs (once in a local suite run,
    # after the trained model was written: not reproduced in 18 runs alone or under load),
    # SIGABRT makes each print its threads' stacks, so the failure says where
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        import psutil  # accelerate's dependency

        agent = psutil.Process(proc.pid)
        tree = [*agent.children(recursive=True), agent]  # the workers run in sessions of their own
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGABRT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            for p in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            _, err = proc.communicate()
        stacks = "\n".join(line for line in err.splitlines() if not line.startswith("Extension modules"))
        pytest.fail(f"the {kind} run hung for 600 s; its processes' stacks (faulthandler):\n{stacks[-20000:]}")
    assert proc.returncode == 0, err[-3000:]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _same_training(single: Path, other: Path, steps: int | None = None) -> None:
    a, b = _metrics(single), _metrics(other)
    assert [x["step"] for x in a] == [x["step"] for x in b] and a[-1]["tokens"] == b[-1]["tokens"] == 6 * 8 * 32
    for x, y in zip(a, b):
        if steps is not None and x["step"] > steps:
            break
        for key in ("loss", "val_loss", "lr"):
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(x[key])), (key, x, y)


def _same_grad_norms(a: Path, b: Path) -> None:
    """The norm of the whole gradient on both (FSDP: not one shard's)."""
    for x, y in zip(_metrics(a), _metrics(b)):
        assert abs(x.get("grad_norm", 0) - y.get("grad_norm", 0)) <= 1e-5 * max(1, x.get("grad_norm", 0)), (x, y)


def _same_weights(single: Path, other: Path, rel_max: float) -> None:
    ra, rb = CheckpointReader(single / "model", need_family=False), CheckpointReader(other / "model", need_family=False)
    assert set(ra.tensors) == set(rb.tensors)
    # Gradients differ only in reduction order (~1e-7), but AdamW's normalized step turns a
    # tiny difference on a near-zero gradient into a full lr-sized step on that one element,
    # so compare each tensor as a whole (relative Frobenius norm), not element by element.
    for name in ra.tensors:
        a, b = ra.get_tensor(name), rb.get_tensor(name)
        rel = ((a - b).norm() / a.norm().clamp(min=1e-12)).item()
        assert rel <= rel_max, (name, rel)


def _frozen_unchanged(source: Path, run: Path) -> int:
    """Every tensor training did not change is bitwise the source's; returns how many."""
    src, out = CheckpointReader(source, need_family=False), CheckpointReader(run / "model", need_family=False)
    changed = set(json.loads((run / "model" / "lmexpand.json").read_text())["training"][-1]["changed_tensors"])
    frozen = [n for n in src.tensors if n not in changed]
    for name in frozen:
        assert src.get_tensor(name).equal(out.get_tensor(name)), name
    assert changed and frozen
    return len(frozen)


@pytest.mark.slow
def test_two_processes_match_one(tiny_pro, gsm8k_small, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run("single", tiny_pro, gsm8k_small, single)
    _run("ddp", tiny_pro, gsm8k_small, ddp)
    _same_training(single, ddp)
    _same_weights(single, ddp, 1e-4)


@pytest.mark.slow
def test_fsdp_matches_one_process(tiny_pro, gsm8k_small, tmp_path):
    """LLaMA-Pro under FSDP (frozen and trainable parameters in the same wrapped blocks):
    the losses of one process with the same global batch, frozen tensors bitwise the
    source's, the trained blocks gathered whole into the exported model."""
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    _run("single", tiny_pro, gsm8k_small, single)
    _run("fsdp", tiny_pro, gsm8k_small, fsdp)
    _same_training(single, fsdp)
    _same_grad_norms(single, fsdp)
    _same_weights(single, fsdp, 1e-4)
    _frozen_unchanged(tiny_pro, fsdp)


@pytest.fixture(scope="module")
def tiny_moe(tiny_llama, tmp_path_factory) -> Path:
    from lmexpand.cli import main

    out = tmp_path_factory.mktemp("moe") / "moe"
    assert main(["surgery", "moe", str(tiny_llama), str(out), "--experts", "4", "--top-k", "2"]) == 0
    return out


@pytest.mark.slow
def test_fsdp_moe_equals_data_parallel(tiny_moe, gsm8k_small, tmp_path):
    """An upcycled MoE under FSDP trains as under DDP (same per-process batches), and
    its first step is one process's. Later steps of any 2-process run drift from one process:
    top-k routing over copied experts sits on near-ties, which the ~1e-7 reduction-order
    differences of another batch shape flip (measured: still 1e-3 with both router losses
    off), and the balance loss is computed per process (as in Mixtral's own training code)."""
    single, ddp, fsdp = tmp_path / "single", tmp_path / "ddp", tmp_path / "fsdp"
    _run("single", tiny_moe, gsm8k_small, single)
    _run("ddp", tiny_moe, gsm8k_small, ddp)
    _run("fsdp", tiny_moe, gsm8k_small, fsdp)
    _same_training(ddp, fsdp)
    _same_grad_norms(ddp, fsdp)
    _same_weights(ddp, fsdp, 1e-6)
    _same_training(single, fsdp, steps=1)
    assert _frozen_unchanged(tiny_moe, fsdp) > 0


@pytest.mark.slow
def test_gpu_configs_without_gpus_are_refused(tiny_pro, gsm8k_small, tmp_path):
    """`accelerate launch` with the FSDP config on a machine without GPUs starts N processes
    that accelerate leaves unconnected; each would train alone into the same --out. Refused
    before anything is written."""
    out = tmp_path / "run"
    env = {k: v for k, v in _fsdp_env().items() if k not in ("ACCELERATE_USE_CPU", "ACCELERATE_TORCH_DEVICE")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    r = subprocess.run(torchrun + ["--module"] + _args(tiny_pro, gsm8k_small, out, 2)[1:], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "accelerate set up no distributed training" in r.stderr
    assert "internal error" not in r.stderr  # exit 2 in each process (torchrun adds its own traceback)
    assert not out.exists()


@pytest.mark.slow
def test_fsdp_refuses_checkpoints(tiny_pro, gsm8k_small, tmp_path):
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    args = _args(tiny_pro, gsm8k_small, out, 2)[2:] + ["--save-every", "2"]
    r = subprocess.run(torchrun + [str(Path(__file__).with_name("fsdp_cpu.py"))] + args, env=_fsdp_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "not supported under FSDP" in r.stderr
    assert not out.exists()
