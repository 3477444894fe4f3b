"""`lmexpand eval --lm-eval` runs lm-evaluation-harness 0.4.13 offline, on the CPU, on a local
YAML task, and puts the scores in the eval report; they equal the harness's own command's.

The harness lives in its own venv (bench/peers/install_lm_eval.sh, as CI does) that sees the
project venv; the tests skip cleanly without it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from lmexpand.cli import main
from tests.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
LE = ROOT / "bench" / ".peers" / "lm-eval" / "bin" / "python"
pytestmark = pytest.mark.skipif(not LE.exists(), reason="lm-eval not installed (bash bench/peers/install_lm_eval.sh)")

TASK = """task: lmexpand_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    rows = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b + 1), str(a + b), str(a * b)], "label": 1}
            for a in range(2, 8) for b in range(3, 6)]
    (root / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks").mkdir()
    (root / "tasks" / "arith.yaml").write_text(TASK.format(data=root / "arith.jsonl"))
    (root / "text.txt").write_text("The cat sat on the mat. One plus two is three.\n" * 40)
    base = build_tiny_model("llama", root / "base")
    assert main(["-q", "surgery", "llama-pro", str(base), str(root / "pro"), "--add", "2"]) == 0
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _lmexpand(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LE), "-m", "lmexpand", *args], capture_output=True, text=True, timeout=600,
                          env=_env(), cwd=ROOT)


def _harness_cli(model: Path, tasks: Path, out: Path) -> dict[str, float]:
    """The harness's own command on a model directory (its own loader, not ours)."""
    r = subprocess.run([str(LE), "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
                        "--tasks", "lmexpand_arith", "--include_path", str(tasks), "--device", "cpu",
                        "--batch_size", "1", "--output_path", str(out)], capture_output=True, text=True, timeout=600,
                       env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    (result,) = out.rglob("results_*.json")
    return json.loads(result.read_text())["results"]["lmexpand_arith"]


def test_bridge_scores_a_local_task_into_the_report(setup):
    out = setup / "report"
    r = _lmexpand("eval", str(setup / "pro"), "--base", str(setup / "base"), "--data", f"t={setup / 'text.txt'}",
                  "--out", str(out), "--no-samples", "--max-tokens", "256", "--seq-len", "32",
                  "--lm-eval", "lmexpand_arith", "--lm-eval-include", str(setup / "tasks"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "metric acc is defined" not in r.stderr  # the harness's warnings only with -v
    results = json.loads((out / "results.json").read_text())
    ours = results["lm_eval"]["tasks"]["lmexpand_arith"]
    assert results["lm_eval"]["settings"]["device"] == "cpu"
    assert results["lm_eval"]["n_samples"]["lmexpand_arith"]["effective"] == 18
    assert set(ours) == {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"}
    report = (out / "report.md").read_text()
    assert "## lm-evaluation-harness" in report
    assert f"| lmexpand_arith | acc (none) | {ours['acc,none']:.4f} |" in report
    assert (out / "lm_eval.json").is_file()

    # the harness's own command, loading the directories itself: the same scores; and the
    # function-preserving LLaMA-Pro output scores exactly as its base
    for model in ("pro", "base"):
        theirs = _harness_cli(setup / model, setup / "tasks", setup / f"cli-{model}")
        for key in ("acc,none", "acc_norm,none"):
            assert ours[key] == theirs[key], (model, key, ours[key], theirs[key])


def test_bridge_limit_and_batch(setup):
    out = setup / "limited"
    r = _lmexpand("eval", str(setup / "pro"), "--data", f"t={setup / 'text.txt'}", "--out", str(out), "--no-samples",
                  "--max-tokens", "128", "--seq-len", "32", "--lm-eval", "lmexpand_arith",
                  "--lm-eval-include", str(setup / "tasks"), "--lm-eval-limit", "5", "--lm-eval-batch-size", "4",
                  "--lm-eval-device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    lm = json.loads((out / "results.json").read_text())["lm_eval"]
    assert lm["n_samples"]["lmexpand_arith"]["effective"] == 5 and lm["settings"]["batch_size"] == 4
    assert "limit 5 per task" in (out / "report.md").read_text()


ERRORS = r"""
import contextlib, io, json, sys
from lmexpand.cli import main
model, text, tasks, out = sys.argv[1:5]
common = ["eval", model, "--data", f"t={text}", "--out", out, "--no-samples"]
cases = {
    "unknown": ["--lm-eval", "lmexpand_arit", "--lm-eval-include", tasks],
    "no-include": ["--lm-eval", "x", "--lm-eval-include", tasks + "/nope"],
    "cuda": ["--lm-eval", "lmexpand_arith", "--lm-eval-include", tasks, "--lm-eval-device", "cuda"],
    "no-data": ["--lm-eval", "hellaswag"],
    "limit": ["--lm-eval", "lmexpand_arith", "--lm-eval-limit", "0"],
    "orphan": ["--lm-eval-include", tasks],
}
res = {}
for name, extra in cases.items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(common + extra)
    res[name] = [code, err.getvalue()]
print(json.dumps(res))
"""


def test_bridge_errors_before_any_work(setup):
    out = setup / "never"
    r = subprocess.run([str(LE), "-c", ERRORS, str(setup / "pro"), str(setup / "text.txt"), str(setup / "tasks"),
                        str(out)], capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    needles = {"unknown": ["lmexpand_arit", "did you mean lmexpand_arith"], "no-include": ["not a directory"],
               "cuda": ["no CUDA device", "--lm-eval-device cpu"], "no-data": ["hellaswag", "offline"],
               "limit": ["--lm-eval-limit", "positive"], "orphan": ["add --lm-eval TASKS"]}
    for name, (code, err) in res.items():
        assert code == 2 and "Traceback" not in err, (name, err)
        for n in needles[name]:
            assert n in err, (name, n, err)
    assert not out.exists()

