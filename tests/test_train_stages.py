"""Recipes with several training stages: continued pretraining on a mixture, then SFT on
chat data, each stage training the model the one before it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmexpand.cli import main
from tests.conftest import GENERAL_TEXT, REPO

TEMPLATE = "Question: {question}\nAnswer: {answer}"


def chat_file(path: Path, n: int = 40) -> Path:
    rows = []
    for i in range(n):
        rows.append({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                  {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_two_stages_mixture_then_chat(tiny_llama, gsm8k_small, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "workdir": "work",
        "surgery": {"method": "llama-pro", "source": str(tiny_llama), "args": {"add": 2}},
        "train": [
            {"data": [{"path": str(gsm8k_small), "template": TEMPLATE, "weight": 0.7, "name": "math"},
                      {"path": str(GENERAL_TEXT), "weight": 0.3, "name": "general"}],
             "document_masking": True, "seq_len": 32, "batch_size": 2, "max_steps": 4, "warmup_steps": 1,
             "val_every": 2, "tensorboard": False},
            {"data": [{"path": str(chat_file(tmp_path / "chat.jsonl")), "chat": "messages"}],
             "chat_template": "chatml", "seq_len": 128, "batch_size": 2, "max_steps": 3, "warmup_steps": 1,
             "val_every": 0, "tensorboard": False},
        ],
        "eval": {"data": {"math": str(gsm8k_small)}, "template": TEMPLATE, "max_tokens": 256, "seq_len": 32,
                 "samples": False},
        "export": {},
    }))
    assert main(["run", str(recipe), "--check"]) == 0, capsys.readouterr().err
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    work = tmp_path / "work"
    assert out["train.1"] == str(work / "train-1" / "model") and out["train.2"] == str(work / "train-2" / "model")
    assert out["train"] == out["train.2"]
    # stage 2 trained what stage 1 wrote, and records both trainings in its lineage
    lineage = json.loads((work / "train-2" / "model" / "lmexpand.json").read_text())
    assert len(lineage["training"]) == 2
    assert json.loads((work / "train-2" / "train_config.json").read_text())["model"] == str(work / "train-1" / "model")
    results = json.loads((work / "eval" / "results.json").read_text())
    assert {"base", "expanded", "train.1", "model"} <= set(results["perplexity"])
    metrics = [json.loads(x) for x in (work / "train-1" / "metrics.jsonl").read_text().splitlines()]
    assert "val_loss/math" in metrics[0] and "share/general" in metrics[-1]
    # run again: every stage is up to date
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "train.1: up to date" in err and "train.2: up to date" in err


@pytest.mark.slow
def test_shipped_pro_replay_sft_recipe_runs_on_the_embedded_model(smollm2, tmp_path, capsys):
    """recipes/pro-replay-sft.yaml end to end (surgery, both train stages, eval, export) on
    SmolLM2, with every stage cut to 2 steps and the eval to 512 tokens."""
    doc = yaml.safe_load((REPO / "recipes" / "pro-replay-sft.yaml").read_text())
    base = REPO / "recipes"
    doc["workdir"] = str(tmp_path / "work")
    for stage in doc["train"]:
        stage.update(max_steps=2, warmup_steps=1, val_every=0, save_every=0, val_batches=1, tensorboard=False)
        stage["data"] = [{**d, "path": str(base / d["path"])} for d in stage["data"]]
    doc["eval"]["data"] = {k: str(base / v) for k, v in doc["eval"]["data"].items()}
    doc["eval"].update(max_tokens=512, samples=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"surgery", "train.1", "train.2", "train", "eval", "export"}
    assert (tmp_path / "work" / "export" / "model.safetensors").is_file() or \
        any((tmp_path / "work" / "export").glob("model-*.safetensors"))
