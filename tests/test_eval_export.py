"""Eval reports (numbers, plots) and export (stock-loadable, same logits, model card)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmexpand.cli import main
from lmexpand.eval.report import fmt
from tests.conftest import GENERAL_TEXT, GSM8K_TEST
from tests.test_train import TEMPLATE, train_args


@pytest.fixture(scope="module")
def trained_run(tiny_pro, gsm8k_small, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(train_args(tiny_pro, gsm8k_small, run, "--max-steps", 6, "--val-every", 3)) == 0
    return run


def eval_args(model, out, *extra):
    return ["eval", str(model), "--data", f"domain={GSM8K_TEST}",
            "--data", f"general={GENERAL_TEXT}",
            "--template", TEMPLATE, "--out", str(out), "--max-tokens", "1024", "--seq-len", "64", *map(str, extra)]


def test_report_numbers_match_results_and_plots_exist(trained_run, tiny_pro, tiny_llama, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(eval_args(trained_run, out, "--base", tiny_llama, "--compare", f"expanded={tiny_pro}"))
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    table = lines[lines.index("|---|---|---|") + 1:]
    for label, row in results["perplexity"].items():
        line = next(l for l in table if l.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        assert cells == [fmt(row["domain"]["ppl"]), fmt(row["general"]["ppl"])]
        assert row["domain"]["tokens"] == 1024
    # the expanded model is exact at init: same perplexity as the base, Δlogit 0
    assert results["perplexity"]["expanded"] == results["perplexity"]["base"]
    p = results["parameters"]
    assert p["new"] == p["trained"] == 73_984 and p["total"] == p["trained"] + p["frozen"]
    assert f"{p['trained']:,}" in report
    for png in ("loss.png", "perplexity.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
        assert f"]({png})" in report
    assert len(results["samples"]) == 3 and "base" in results["samples"][0]


def test_function_preservation_is_reported_exactly(tiny_pro, tiny_llama, tmp_path, capsys):
    out = tmp_path / "fp"
    assert main(eval_args(tiny_pro, out, "--base", tiny_llama, "--no-samples")) == 0
    fp = json.loads((out / "results.json").read_text())["function_preservation"]
    assert fp == {"max_abs_dlogit": 0.0, "mean_abs_dlogit": 0.0}
    assert "max |Δlogit| = 0," in (out / "report.md").read_text()


def test_export_loads_with_stock_transformers_and_keeps_logits(trained_run, tmp_path, capsys):
    out = tmp_path / "exported"
    code = main(["export", str(trained_run), str(out), "--max-shard-size", "300KB"])
    assert code == 0, capsys.readouterr().err
    assert (out / "model.safetensors.index.json").is_file()
    card = (out / "README.md").read_text()
    assert "llama-pro" in card and "6 steps" in card and "gsm8k-400.jsonl" in card
    cfg = json.loads((out / "config.json").read_text())
    assert not any(k.startswith("_") for k in cfg)
    trained = AutoModelForCausalLM.from_pretrained(trained_run / "model").eval()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained(input_ids=ids).logits, exported(input_ids=ids).logits)


def test_eval_and_export_errors(tiny_pro, tmp_path, capsys):
    def bad(args, *needles):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        for n in needles:
            assert n in err, (n, err)

    bad(["eval", str(tiny_pro), "--data", "domain=/nope.txt", "--out", str(tmp_path / "r")], "/nope.txt", "not a file")
    bad(["eval", str(tiny_pro), "--data", f"x={GSM8K_TEST}", "--out", str(tmp_path / "r"),
         "--max-tokens", "100"], "no field 'text'", "--text-field")
    bad(["eval", str(tiny_pro), "--data", f"x={GSM8K_TEST}", "--out", str(tmp_path / "r"),
         "--compare", "oops"], "--compare 'oops'", "LABEL=MODEL")
    bad(["eval", str(tiny_pro), "--data", f"x={GSM8K_TEST}", "--out", str(tmp_path / "r"),
         "--template", "{question}", "--lm-eval", "gsm8k"], "lm-evaluation-harness", "pip install lm-eval")
    existing = tmp_path / "e"
    existing.mkdir()
    (existing / "f").write_text("x")
    bad(["export", str(tiny_pro), str(existing)], "not empty", "--force")
    bad(["export", str(tiny_pro), str(tmp_path / "x"), "--eval", str(tmp_path)], "no results.json")
    assert not (tmp_path / "r").exists() and not (tmp_path / "x").exists()


def test_moe_expert_load_on_a_tiny_mixtral(tmp_path, capsys):
    from transformers import MixtralConfig

    from tests.tiny import save_tiny_tokenizer

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=320, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model_dir = tmp_path / "mixtral"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    save_tiny_tokenizer(model_dir)
    out = tmp_path / "r"
    assert main(["eval", str(model_dir), "--data", f"general={GENERAL_TEXT}", "--out", str(out),
                 "--max-tokens", "512", "--seq-len", "64", "--no-samples"]) == 0, capsys.readouterr().err
    moe = json.loads((out / "results.json").read_text())["moe"]
    assert moe["routers"] == 2 and moe["experts"] == 4 and moe["top_k"] == 2
    for loads in moe["load"].values():
        assert len(loads) == 4 and abs(sum(loads) - 1.0) < 1e-9
    assert "MoE expert load" in (out / "report.md").read_text()
    assert (out / "expert_load.png").stat().st_size > 5000 and "expert_load.png" in (out / "report.md").read_text()


def test_dense_models_report_no_moe(tiny_pro, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(eval_args(tiny_pro, out, "--no-samples")) == 0
    assert json.loads((out / "results.json").read_text())["moe"] is None
