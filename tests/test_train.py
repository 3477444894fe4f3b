"""Training only the new parameters: frozen tensors bitwise unchanged, exact resume, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lmexpand.checkpoint import CheckpointReader
from lmexpand.cli import main
from tests.conftest import GENERAL_TEXT

TEMPLATE = "Question: {question}\nAnswer: {answer}"


def train_args(model: Path, data: Path, out: Path, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--template", TEMPLATE, "--out", str(out),
            "--seq-len", "32", "--batch-size", "4", "--max-steps", "12", "--warmup-steps", "2", "--lr", "3e-3",
            "--val-every", "6", "--no-tensorboard", *[str(e) for e in extra]]


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]  # a re-run step after a resume overwrites the killed one
    return out


def test_only_new_parameters_change(tiny_pro, gsm8k_small, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(train_args(tiny_pro, gsm8k_small, run, "--max-steps", 40, "--lr", "2e-2", "--val-every", 20))
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "trainable vs frozen" in err
    src, out = CheckpointReader(tiny_pro), CheckpointReader(run / "model")
    new = set(json.loads((tiny_pro / "lmexpand.json").read_text())["new_parameters"])
    assert set(src.tensors) == set(out.tensors)
    for name in src.tensors:
        a, b = src.get_tensor(name), out.get_tensor(name)
        if name in new:
            assert not torch.equal(a, b), f"new tensor {name} did not change"
        else:
            assert torch.equal(a, b), f"frozen tensor {name} changed"
    # the final model's untouched tensors are byte copies: their file bytes equal the source's
    lineage = json.loads((run / "model" / "lmexpand.json").read_text())
    assert set(lineage["training"][-1]["changed_tensors"]) == new
    assert lineage["training"][-1]["steps"] == 40 and lineage["training"][-1]["tokens"] == 40 * 4 * 32
    # A tiny random model whose embeddings and head stay frozen learns slowly, but it learns:
    # (full fine-tuning of the same model drops ~1.5 nats in 60 steps)
    curve = losses(run)
    first, last = sum(curve[s] for s in (1, 2, 3)) / 3, sum(curve[s] for s in range(36, 41)) / 5
    rec = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rec if "val_loss" in r]
    print(f"train loss {first:.3f} -> {last:.3f}; val loss {val}")
    assert last < first - 0.08
    assert rec[0]["step"] == 0 and len(val) == 3 and val[-1] < val[0] - 0.05
    assert "grad_norm" in rec[1] and rec[-1]["tokens_per_s"] > 0


def test_kill_and_resume_gives_identical_losses_and_weights(tiny_pro, gsm8k_small, tmp_path):
    env = {**os.environ, "LMEXPAND_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "lmexpand", "-q"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = subprocess.run(cmd + train_args(tiny_pro, gsm8k_small, straight, "--save-every", 4), env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    killed = subprocess.run(cmd + train_args(tiny_pro, gsm8k_small, resumed, "--save-every", 4),
                            env={**env, "LMEXPAND_KILL_AT": "train:after-step:6"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert not (resumed / "model").exists()
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-000004"]
    r = subprocess.run(cmd + train_args(tiny_pro, gsm8k_small, resumed, "--save-every", 4, "--resume"), env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = losses(straight), losses(resumed)
    assert list(a) == list(range(1, 13)) and a == b  # exact, fp32 CPU
    ra, rb = CheckpointReader(straight / "model"), CheckpointReader(resumed / "model")
    for name in ra.tensors:
        assert torch.equal(ra.get_tensor(name), rb.get_tensor(name)), name


def test_lora_on_frozen_modules_and_lora_only(tiny_pro, gsm8k_small, tmp_path, capsys):
    run = tmp_path / "lora"
    code = main(train_args(tiny_pro, gsm8k_small, run, "--trainable", "none", "--lora", "--lora-targets", "q_proj,v_proj"))
    assert code == 0, capsys.readouterr().err
    src, out = CheckpointReader(tiny_pro), CheckpointReader(run / "model")
    changed = {n for n in src.tensors if not torch.equal(src.get_tensor(n), out.get_tensor(n))}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
    assert (run / "model" / "lora_adapter_config.json").is_file()
    both = tmp_path / "both"
    code = main(train_args(tiny_pro, gsm8k_small, both, "--lora", "--lora-targets", "q_proj"))
    assert code == 0, capsys.readouterr().err
    new = set(json.loads((tiny_pro / "lmexpand.json").read_text())["new_parameters"])
    out = CheckpointReader(both / "model")
    changed = {n for n in src.tensors if not torch.equal(src.get_tensor(n), out.get_tensor(n))}
    # new blocks train fully; LoRA adapts q_proj of the original blocks only
    assert changed - new and all(n.endswith("q_proj.weight") for n in changed - new)
    assert new <= changed | {n for n in new if "norm" in n}


def test_8bit_optimizer_and_4bit_base_run_on_cpu(tiny_pro, gsm8k_small, tmp_path, capsys):
    run = tmp_path / "q"
    code = main(train_args(tiny_pro, gsm8k_small, run, "--optimizer", "adamw8bit", "--load-in-4bit", "--max-steps", 6))
    assert code == 0, capsys.readouterr().err
    src, out = CheckpointReader(tiny_pro), CheckpointReader(run / "model")
    new = set(json.loads((tiny_pro / "lmexpand.json").read_text())["new_parameters"])
    for name in src.tensors:
        if name not in new:  # the 4-bit base never leaks into the output: originals are byte copies
            assert torch.equal(src.get_tensor(name), out.get_tensor(name)), name
    assert any(not torch.equal(src.get_tensor(n), out.get_tensor(n)) for n in new)


def test_recipe_section_and_relative_paths(tiny_pro, gsm8k_small, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"train:\n  model: {tiny_pro}\n  data:\n    - path: {gsm8k_small}\n      template: \"{TEMPLATE.encode('unicode_escape').decode()}\"\n"
        "  out: runs/r\n  seq_len: 32\n  batch_size: 2\n  max_steps: 3\n  warmup_steps: 0\n  tensorboard: false\n"
    )
    code = main(["train", "--recipe", str(recipe)])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "runs" / "r" / "model" / "model.safetensors").is_file()
    recipe.write_text(f"train:\n  model: {tiny_pro}\n  data: [{{path: {gsm8k_small}}}]\n  out: x\n  sequence_length: 9\n")
    code = main(["train", "--recipe", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and "sequence_length: unknown key" in err and "seq_len" in err


# -- bad input: exit 2, a message naming the problem, nothing written ------------------------
def _bad(capsys, tmp_path, args, *needles):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "run").exists()


def test_missing_and_empty_data(tiny_pro, tmp_path, capsys):
    _bad(capsys, tmp_path, train_args(tiny_pro, tmp_path / "nope.jsonl", tmp_path / "run"), "nope.jsonl", "no such file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _bad(capsys, tmp_path, ["train", "--model", str(tiny_pro), "--data", str(empty), "--out", str(tmp_path / "run"),
                            "--seq-len", "32"], "empty", "nothing to train on")
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    _bad(capsys, tmp_path, ["train", "--model", str(tiny_pro), "--data", str(short), "--out", str(tmp_path / "run"),
                            "--seq-len", "64", "--val-fraction", "0"], "fewer than 64 tokens")


def test_jsonl_without_the_field(tiny_pro, gsm8k_small, tmp_path, capsys):
    _bad(capsys, tmp_path, ["train", "--model", str(tiny_pro), "--data", str(gsm8k_small), "--out", str(tmp_path / "run"),
                            "--seq-len", "32"], "no field 'text'", "question, answer", "--text-field")
    _bad(capsys, tmp_path, train_args(tiny_pro, gsm8k_small, tmp_path / "run", "--template", "{question} {solution}"),
         "no field 'solution'")


def test_seq_len_above_max_positions(tiny_pro, gsm8k_small, tmp_path, capsys):
    _bad(capsys, tmp_path, train_args(tiny_pro, gsm8k_small, tmp_path / "run", "--seq-len", 100000),
         "--seq-len 100000", "max_position_embeddings (256)")


def test_model_without_lineage_and_nothing_trainable(tiny_llama, tiny_pro, gsm8k_small, tmp_path, capsys):
    _bad(capsys, tmp_path, train_args(tiny_llama, gsm8k_small, tmp_path / "run"), "no lmexpand.json", "--trainable all")
    _bad(capsys, tmp_path, train_args(tiny_pro, gsm8k_small, tmp_path / "run", "--trainable", "none"), "nothing to train")
    _bad(capsys, tmp_path, train_args(tiny_pro, gsm8k_small, tmp_path / "run", "--trainable", "*nothing*"),
         "'*nothing*' matches no parameter")


def test_resume_refuses_another_models_checkpoint(tiny_pro, tiny_llama, gsm8k_small, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_pro, gsm8k_small, run, "--max-steps", 4, "--save-every", 2)) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    assert main(["surgery", "llama-pro", str(tiny_llama), str(other), "--add", "1"]) == 0
    code = main(train_args(other, gsm8k_small, run, "--resume"))
    err = capsys.readouterr().err
    assert code == 2 and "another model" in err
    code = main(train_args(tiny_pro, gsm8k_small, run))
    err = capsys.readouterr().err
    assert code == 2 and "--resume" in err and "--force" in err


def test_bad_values_name_the_flag(tiny_pro, gsm8k_small, tmp_path, capsys):
    _bad(capsys, tmp_path, train_args(tiny_pro, gsm8k_small, tmp_path / "run", "--lr", "-1", "--batch-size", "0"),
         "--lr: Input should be greater than 0", "--batch-size: Input should be greater than 0")
    _bad(capsys, tmp_path, train_args(tiny_pro, gsm8k_small, tmp_path / "run", "--optimizer", "sgd"), "--optimizer")


def test_plain_text_streaming_and_tensorboard(tiny_pro, tmp_path, capsys):
    corpus = tmp_path / "humanities.txt"
    corpus.write_text(GENERAL_TEXT.read_text()[:60_000])
    run = tmp_path / "run"
    code = main(["train", "--model", str(tiny_pro), "--data", str(corpus), "--out", str(run), "--seq-len", "32",
                 "--batch-size", "2", "--max-steps", "4", "--warmup-steps", "0", "--streaming", "--val-every", "2"])
    assert code == 0, capsys.readouterr().err
    rec = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec if "loss" in r] == [1, 2, 3, 4] and "val_loss" in rec[-1]
    assert list((run / "tensorboard").rglob("events.out.tfevents*"))
    cfg = json.loads((run / "train_config.json").read_text())
    assert cfg["streaming"] is True and cfg["data"][0]["path"] == str(corpus)


def test_mixture_with_document_masking_resumes_exactly(tiny_pro, gsm8k_small, tmp_path):
    """A weighted mixture (block k drawn by weight) with document masking: killed and
    resumed, the losses and weights equal the uninterrupted run's; each validation has a
    loss per source and each step the realized share per source."""
    env = {**os.environ, "LMEXPAND_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "lmexpand", "-q"]

    def args(out: Path, *extra) -> list[str]:
        a = train_args(tiny_pro, f"{gsm8k_small}:0.6", out, "--data", f"{GENERAL_TEXT}:0.4", "--document-masking",
                       "--save-every", 4, *extra)
        return [str(x) for x in a]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = subprocess.run(cmd + args(straight), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    killed = subprocess.run(cmd + args(resumed), env={**env, "LMEXPAND_KILL_AT": "train:after-step:6"},
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    r = subprocess.run(cmd + args(resumed, "--resume"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a, b = losses(straight), losses(resumed)
    assert list(a) == list(range(1, 13)) and a == b
    ra, rb = CheckpointReader(straight / "model"), CheckpointReader(resumed / "model")
    for name in ra.tensors:
        assert torch.equal(ra.get_tensor(name), rb.get_tensor(name)), name
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    names = (gsm8k_small.name, GENERAL_TEXT.name)
    val = [r for r in records if "val_loss" in r]
    assert len(val) == 3 and all(f"val_loss/{n}" in r for r in val for n in names)
    last = records[-1]
    assert abs(sum(last[f"share/{n}"] for n in names) - 1) < 1e-9 and 0 < last[f"share/{names[1]}"] < 1
    resumed_last = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()][-1]
    assert resumed_last[f"share/{names[0]}"] == last[f"share/{names[0]}"]
