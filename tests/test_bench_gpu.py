"""bench/gpu.py: the GPU benchmark's own code, run on CPU with --tiny (tiny model, seconds),
and the FLOP count its MFU rests on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_tiny_run_writes_every_figure(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report["train"]) == {"ours", "full-ft", "hf-trainer", "moe-mixtral", "moe-fine"}
    for name, v in report["train"].items():
        assert v["step_s"] > 0 and v["tokens_per_s"] > 0 and v["peak_memory_gib"] > 0, name
        assert v["model_tflop_per_step"] >= 0
    assert {"cp -r base", "llama-pro", "moe-mixtral", "moe-fine"} <= set(report["surgery"])
    assert report["ours_vs_hf_trainer_speedup"] > 0
    assert len(report["merge"]) == 2 and all(k.startswith("ties: lmexpand") and v["seconds"] > 0
                                             for k, v in report["merge"].items())
    md = (tmp_path / "gpu.md").read_text()
    assert "| ours |" in md and "| llama-pro |" in md and "| ties: lmexpand --device cpu |" in md
    assert "gpu.md" not in r.stdout and "| hf-trainer |" in r.stdout  # the table is printed too


def test_no_gpu_no_tiny_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no CUDA device" in r.stderr and not (tmp_path / "gpu.json").exists()


def test_training_macs_by_hand(tiny_llama, tmp_path):
    """The count for a LLaMA-Pro model, by hand from the tiny config: forward everywhere,
    input gradients from the first new block up, weight gradients only in the new blocks."""
    from bench._common import training_macs
    from lmexpand.cli import main

    pro = tmp_path / "pro"
    assert main(["surgery", "llama-pro", str(tiny_llama), str(pro), "--add", "2"]) == 0
    cfg = json.loads((pro / "config.json").read_text())
    lmap = json.loads((pro / "lmexpand.json").read_text())["layer_map"]
    h, inter, vocab, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    q = cfg["num_attention_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    linear = 2 * h * q + 2 * h * kv + 3 * h * inter
    seq = 128
    attn = 2 * (seq / 2) * h
    new = [i for i, x in enumerate(lmap) if isinstance(x, str)]
    forward = n * (linear + attn) + h * vocab
    ours = forward + (n - new[0]) * (linear + 2 * attn) + h * vocab + len(new) * linear
    full = forward + n * (linear + 2 * attn) + h * vocab + n * linear + h * vocab
    assert training_macs(pro, seq, "new") == pytest.approx(ours)
    assert training_macs(pro, seq, "all") == pytest.approx(full)
