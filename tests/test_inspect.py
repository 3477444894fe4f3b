"""`lmexpand inspect`: the family of every model of a supported family, with nothing that
suggests otherwise; for what lmexpand reads but does not expand (MoE outputs, composed
models), a note that says what it is and which commands take it. Every tiny family of
tests/tiny.py is a row, so a new family is covered by adding it there."""

from __future__ import annotations

import json

import pytest

from lmexpand.checkpoint.families import FAMILIES, detect_family
from lmexpand.cli import main
from tests.tiny import TINY_FAMILIES, build_tiny_model, tiny_config

EXPANDABLE = [v for v in TINY_FAMILIES if any(tiny_config(v).model_type in f.model_types for f in FAMILIES.values())]


def _inspect(capsys, path) -> tuple[dict, str]:
    assert main(["inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(path)]) == 0
    return summary, capsys.readouterr().out


@pytest.mark.parametrize("variant", EXPANDABLE)
def test_supported_family_is_reported_without_a_note(variant, tmp_path, capsys):
    model = build_tiny_model(variant, tmp_path / variant)
    summary, table = _inspect(capsys, model)
    family = detect_family(json.loads((model / "config.json").read_text()))
    assert summary["family"] == family.name
    assert "note" not in summary and "note:" not in table
    assert summary["num_layers"] == 4 and sum(summary["per_layer_parameters"]) > 0
    assert f"{family.name} (" in table


@pytest.mark.slow
def test_embedded_smollm2_is_llama_without_a_note(capsys):
    summary, table = _inspect(capsys, "smollm2-135m")
    assert summary["family"] == "llama" and "note" not in summary and "note:" not in table
    assert summary["num_layers"] == 30


def test_moe_output_note_says_what_it_is_and_what_takes_it(tmp_path, capsys):
    src = build_tiny_model("llama", tmp_path / "llama")
    assert main(["-q", "surgery", "moe", str(src), str(tmp_path / "moe"), "--experts", "2"]) == 0
    capsys.readouterr()
    summary, table = _inspect(capsys, tmp_path / "moe")
    note = summary["note"]
    assert "mixture-of-experts" in note and "`train`" in note and "`generate`" in note and "`export`" in note
    assert "surgeries" in note and "note:" in table


def test_composed_output_note_says_what_it_is_and_what_takes_it(tmp_path, capsys):
    a = build_tiny_model("llama", tmp_path / "a")
    b = build_tiny_model("llama", tmp_path / "b", seed=1)
    assert main(["-q", "surgery", "logit-sum", str(a), str(b), str(tmp_path / "sum")]) == 0
    capsys.readouterr()
    summary, _ = _inspect(capsys, tmp_path / "sum")
    note = summary["note"]
    assert "composed model" in note and "`generate`" in note and "members" in note


def test_other_model_type_note_names_what_works(tmp_path, capsys):
    model = build_tiny_model("llama", tmp_path / "llama")
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "my_own_llama"
    (model / "config.json").write_text(json.dumps(cfg))
    summary, _ = _inspect(capsys, model)
    assert summary["family"] == "my_own_llama"
    assert "'my_own_llama'" in summary["note"] and "`eval`" in summary["note"] and "llama" in summary["note"]
