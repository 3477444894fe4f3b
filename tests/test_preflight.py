"""`run --check` runs the same checks as the run (issue 33, part 2).

Recipes are generated across (surgery kind x training x eval); for each, `run --check` is
asked first. A recipe it accepts must then run to the end (never a user error after work
began); one it refuses must be refused by the run as well, with the same message, before
anything is written (the run calls the same pre-flight functions first). A few
combinations are known to be impossible (a composition with nothing to train, the
perplexity of contrastive decoding, a marker of several tokens, eval data without its text
field, a merge without new parameters): the test asserts `--check` refuses those, naming
the recipe key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lmexpand.cli import main
from tests.conftest import GSM8K_TEST
from tests.tiny import build_tiny_model

TEMPLATE = "Question: {question}\nAnswer: {answer}"

SURGERIES = ["llama-pro", "upscale", "moe", "calm", "logit-sum", "proxy-tune", "contrastive", "co-llm",
             "deep-fusion", "deep-fusion-long-marker", "deep-fusion-absent-marker", "merge"]
TRAINS = ["none", "default", "all"]
EVALS = ["none", "scored", "no-text-field"]

def _expected(surgery: str, train: str, ev: str) -> str | None:
    """What --check must refuse (a word of its message), in the order the stages are checked."""
    if surgery == "deep-fusion-long-marker":
        return "surgery.args.open"  # a marker of several tokens
    if surgery == "deep-fusion-absent-marker" and train == "default":
        return "train.data"  # the experts could not train
    if surgery in ("proxy-tune", "contrastive") and train != "none":
        return "nothing to train"
    if surgery in ("calm", "logit-sum", "co-llm", "deep-fusion", "deep-fusion-absent-marker") and train == "all":
        return "train.trainable"  # a composition's members stay frozen
    if surgery == "merge" and train == "default":
        return "train.trainable"  # a merge adds no parameter: the default trainable set is empty
    if surgery == "contrastive" and ev != "none":
        return "eval:"  # no perplexity for a plausibility-masked composition
    if ev == "no-text-field":
        return "eval.data.math"
    return None


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("preflight")
    a = build_tiny_model("llama", root / "a")
    b = build_tiny_model("llama", root / "b", seed=1)
    no_text = root / "no-text.jsonl"  # records without the eval's default field "text"
    no_text.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(50)))
    merge = root / "merge.yaml"
    merge.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.5}}]}))
    return {"a": a, "b": b, "no_text": no_text, "merge": merge}


def _recipe(models: dict[str, Path], data: Path, surgery: str, train: str, ev: str) -> dict:
    a, b = str(models["a"]), str(models["b"])
    surgeries = {
        "llama-pro": {"method": "llama-pro", "source": a, "args": {"add": 1}},
        "upscale": {"method": "upscale", "source": a, "args": {"drop": 1}},
        "moe": {"method": "moe", "source": a, "args": {"experts": 2, "top_k": 1}},
        "calm": {"method": "calm", "source": [a, b], "args": {"every": 2}},
        "logit-sum": {"method": "logit-sum", "source": [a, b]},
        "proxy-tune": {"method": "proxy-tune", "source": [a, b, a]},
        "contrastive": {"method": "contrastive", "source": [a, b]},
        "co-llm": {"method": "co-llm", "source": [a, b]},
        "deep-fusion": {"method": "deep-fusion", "source": a, "args": {"open": "(", "close": ")"}},
        "deep-fusion-long-marker": {"method": "deep-fusion", "source": a, "args": {"open": "<<fence-open>>"}},
        # a one-token marker the training data never contains (GSM8K has no "~")
        "deep-fusion-absent-marker": {"method": "deep-fusion", "source": a, "args": {"open": "~"}},
        "merge": {"method": "merge", "args": {"config": str(models["merge"])}},
    }
    recipe: dict = {"workdir": "work", "surgery": surgeries[surgery]}
    if train != "none":
        recipe["train"] = {"data": [{"path": str(data), "template": TEMPLATE}], "seq_len": 32, "batch_size": 2,
                           "max_steps": 1, "warmup_steps": 0, "val_every": 0, "tensorboard": False,
                           **({"trainable": "all"} if train == "all" else {})}
    if ev == "scored":
        recipe["eval"] = {"data": {"math": str(GSM8K_TEST)}, "template": TEMPLATE, "max_tokens": 64, "seq_len": 32,
                          "samples": False}
    elif ev == "no-text-field":
        recipe["eval"] = {"data": {"math": str(models["no_text"])}, "max_tokens": 64, "seq_len": 32,
                          "samples": False}
    return recipe


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _combinations(full: bool):
    for s in SURGERIES:
        for t in TRAINS:
            for e in EVALS:
                # the default suite: the main road of every kind, and every refusal (refused before any work)
                cheap = (t, e) == ("default", "scored") or _expected(s, t, e) is not None
                if full or cheap:
                    yield s, t, e


def _check_then_run(models, gsm8k_small, tmp_path, capsys, surgery, train, ev) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(models, gsm8k_small, surgery, train, ev)))
    code = main(["run", str(path), "--check"])
    check_err = capsys.readouterr().err
    expected = _expected(surgery, train, ev)
    if expected is not None:
        assert code == 2 and expected in check_err, check_err
        assert "--trainable" not in check_err and "--text-field" not in check_err  # recipe keys, not flags
    else:
        assert code == 0, check_err
    before = _files(tmp_path)
    code_run = main(["run", str(path)])
    run_err = capsys.readouterr().err
    if code == 0:
        assert code_run == 0, f"--check accepted it, the run failed: {run_err}"
    else:
        assert code_run == 2
        assert run_err.strip().splitlines()[-1] == check_err.strip().splitlines()[-1]
        assert _files(tmp_path) == before  # refused before any work
    shutil.rmtree(tmp_path / "work", ignore_errors=True)


@pytest.mark.parametrize("surgery,train,ev", list(_combinations(full=False)))
def test_check_accepts_exactly_what_runs(models, gsm8k_small, tmp_path, capsys, surgery, train, ev):
    _check_then_run(models, gsm8k_small, tmp_path, capsys, surgery, train, ev)


@pytest.mark.slow
@pytest.mark.parametrize("surgery,train,ev", [c for c in _combinations(full=True)
                                              if c not in set(_combinations(full=False))])
def test_check_accepts_exactly_what_runs_every_combination(models, gsm8k_small, tmp_path, capsys, surgery, train, ev):
    _check_then_run(models, gsm8k_small, tmp_path, capsys, surgery, train, ev)
