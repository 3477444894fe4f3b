"""`lmexpand run`: validation before any work, stage skipping, crash-resume, shipped recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmexpand.cli import main
from tests.conftest import GSM8K_TEST, REPO


def write_recipe(path: Path, source: Path, data: Path, **overrides) -> Path:
    recipe = {
        "workdir": "work",
        "surgery": {"method": "llama-pro", "source": str(source), "args": {"add": 2}},
        "train": {"data": [{"path": str(data), "template": "Question: {question}\nAnswer: {answer}"}],
                  "seq_len": 32, "batch_size": 2, "max_steps": 6, "warmup_steps": 1, "save_every": 2,
                  "val_every": 3, "tensorboard": False},
        "eval": {"data": {"math": str(GSM8K_TEST)},
                 "template": "Question: {question}\nAnswer: {answer}", "max_tokens": 256, "seq_len": 32,
                 "samples": False},
        "export": {},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            recipe[section][field] = value
        elif value is None:
            recipe.pop(section)
        else:
            recipe[section] = value
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    return path


def test_full_recipe_runs_and_skips_completed_stages(tiny_llama, gsm8k_small, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, gsm8k_small)
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    out = json.loads(capsys.readouterr().out)
    work = tmp_path / "work"
    assert out == {"surgery": str(work / "expanded"), "train": str(work / "train" / "model"),
                   "eval": str(work / "eval" / "report.md"), "export": str(work / "export")}
    results = json.loads((work / "eval" / "results.json").read_text())
    assert set(results["perplexity"]) == {"base", "expanded", "model"}
    assert "llama-pro" in (work / "export" / "README.md").read_text()
    # second run: every stage up to date
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    for stage in ("surgery", "train", "eval", "export"):
        assert f"{stage}: up to date" in err
    # a changed training setting re-runs training and what follows, not the surgery
    write_recipe(recipe, tiny_llama, gsm8k_small, train__max_steps=4)
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "surgery: up to date" in err and "train: up to date" not in err and "eval: up to date" not in err


def test_killed_after_surgery_resumes_at_training(tiny_llama, gsm8k_small, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, gsm8k_small)
    env = {**os.environ, "LMEXPAND_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "lmexpand", "run", str(recipe)]
    r = subprocess.run(cmd, env={**env, "LMEXPAND_KILL_AT": "run:after-surgery"}, capture_output=True, text=True)
    assert r.returncode == -9
    expanded = tmp_path / "work" / "expanded" / "model.safetensors"
    mtime = expanded.stat().st_mtime_ns
    r = subprocess.run(cmd, env={**env, "LMEXPAND_KILL_AT": "train:after-step:3"}, capture_output=True, text=True)
    assert r.returncode == -9 and "surgery: up to date" in r.stderr
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "surgery: up to date" in r.stderr and "resuming the interrupted run" in r.stderr
    assert expanded.stat().st_mtime_ns == mtime  # the surgery was not redone


@pytest.mark.parametrize(
    "overrides, needles",
    [
        ({"surgery__method": "llama-max"}, ["surgery.method", "'llama-max'", "llama-pro"]),
        ({"surgery__args": {"add": 2, "groups": 3}}, ["surgery.args", "groups", "unknown key"]),
        ({"train__max_steps": -5}, ["train: max_steps", "greater than 0", "-5"]),
        ({"train__seq_len": "long"}, ["train: seq_len", "integer", "'long'"]),
        ({"train__data": [{"path": "/nope.jsonl"}]}, ["train.data", "/nope.jsonl", "no such file"]),
        ({"eval__data": {"math": "/missing.txt"}}, ["eval.data.math", "/missing.txt"]),
        ({"surgery__source": "/no/model"}, ["surgery.source", "/no/model"]),
        ({"export": {"destination": "x"}}, ["export.destination", "unknown key"]),
        ({"trian": {}}, ["trian", "unknown key", "train"]),
    ],
)
def test_bad_recipes_fail_before_any_work(tiny_llama, gsm8k_small, tmp_path, capsys, overrides, needles):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama, gsm8k_small, **overrides)
    code = main(["run", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "work").exists()


def test_not_yaml_and_empty(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert main(["run", str(bad)]) == 2 and "not valid YAML" in capsys.readouterr().err
    bad.write_text("name: nothing\n")
    assert main(["run", str(bad)]) == 2 and "no section to run" in capsys.readouterr().err


# Every YAML file under recipes/ is a recipe that `lmexpand run --check` accepts as shipped, except
# accelerate's own launch configs (recipes/accelerate/, read by `accelerate launch --config_file`).
# Templates that another program fills in live beside that program (bench/reference_recipes/).
SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.y*ml") if "accelerate" not in p.relative_to(REPO / "recipes").parts)


def test_recipes_folder_holds_only_runnable_recipes_and_accelerate_configs():
    every = sorted((REPO / "recipes").rglob("*.y*ml"))
    accelerate = [p for p in every if p not in SHIPPED]
    assert SHIPPED and all(p.parent.name == "accelerate" for p in accelerate)
    import yaml

    for p in accelerate:  # accelerate's own schema, not a recipe's
        assert "distributed_type" in yaml.safe_load(p.read_text()), p


def test_a_placeholder_is_refused_by_name(tmp_path, capsys):
    template = REPO / "bench" / "reference_recipes" / "math.yaml"
    before = template.read_bytes()
    assert main(["run", str(template), "--check"]) == 2
    err = capsys.readouterr().err
    assert "@parent is a placeholder" in err and "bench/reference_models.py" in err and "Traceback" not in err
    assert "no such file" not in err  # never turned into a path
    assert template.read_bytes() == before


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_shipped_recipe_validates(recipe, capsys):
    if not (REPO.parent / "shared").is_dir() and "shared" in recipe.read_text():
        pytest.skip("needs ../shared beside the checkout")
    assert main(["run", str(recipe), "--check"]) == 0, capsys.readouterr().err


@pytest.mark.slow
def test_train_only_recipe_on_the_embedded_model(smollm2, gsm8k_small, tmp_path, capsys):
    """`train.model: smollm2-135m` (an embedded name, no surgery section) runs, not only --check."""
    recipe = write_recipe(tmp_path / "r.yaml", smollm2, gsm8k_small, surgery=None, eval=None, export=None,
                          train__model="smollm2-135m", train__max_steps=1, train__save_every=0,
                          train__val_every=0, train__trainable="all")
    assert main(["run", str(recipe), "--check"]) == 0, capsys.readouterr().err
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    assert (tmp_path / "work" / "train" / "model" / "lmexpand.json").is_file()
