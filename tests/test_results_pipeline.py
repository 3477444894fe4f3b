"""bench/results.py: the whole results pipeline (reference family + every miniature) on a tiny
model with tiny budgets. It produces every stage with its lineage, prints a plan of every
stage, resumes after a kill mid-run, reuses its cache on a second call, gives a replaced
machine its finished rows back, and its outputs render into docs/results.md's tables. No test trains the real family: that is the benchmark."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_reference_models import tiny_data_root
from tests.tiny import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


def _cmd(root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "bench" / "results.py"), "--budget", "tiny", "--base", str(root / "base"),
            "--data-root", str(root / "data"), "--family-root", str(root / "ref"), "--out", str(root / "out"),
            "--every", "5", *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    build_tiny_model("llama", root / "base", num_hidden_layers=30)
    tiny_data_root(root / "data")
    return root


def _stages() -> list[str]:
    sys.path.insert(0, str(REPO))
    from bench.results import STAGES

    return [s.name for s in STAGES]


def test_plan_lists_every_stage_and_runs_nothing(root):
    r = subprocess.run(_cmd(root, "--plan"), capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    for name in _stages():
        assert f"\n{name} " in r.stdout, (name, r.stdout)
    assert "training tokens/s (measured" in r.stdout and "left to run" in r.stdout
    assert not (root / "ref").exists() or not any((root / "ref").glob("healed-*"))
    assert not list((root / "out" / "done").glob("*.json"))


def test_killed_pipeline_resumes_then_everything_is_cached(root, tmp_path):
    done = root / "out" / "done"
    # 1. start, and kill the whole process group once two stages are done (mid-run)
    proc = subprocess.Popen(_cmd(root), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 1800
    while len(list(done.glob("*.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(3)  # into the third stage
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.stem for p in done.glob("*.json")}
    assert len(finished) >= 2

    # 2. the second call continues: finished stages are cached, the rest run to the end
    r = subprocess.run(_cmd(root), capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for name in _stages():
        marker = done / f"{name.replace(':', '-')}.json"
        rec = json.loads(marker.read_text())
        assert rec["stage"] == name and rec["seconds"] >= 0 and rec["script"].startswith("bench/")
        if not name.startswith("family") and name != "calm":  # lineage: every reference model read, with its key
            assert rec["models"], name
        for m in rec["models"].values():
            meta = json.loads((Path(m["dir"]) / "lmexpand.json").read_text())
            assert meta["reference"]["key"] == m["key"]
        label = f"{name}] cached"
        assert (label in r.stdout) == (name.replace(":", "-") in finished), (name, finished)
    assert "pipeline ETA" in r.stdout or "start (estimate" in r.stdout

    # every miniature left its results
    out = {json.loads(p.read_text())["stage"]: Path(json.loads(p.read_text())["out"]) for p in done.glob("*.json")}
    assert (out["expansion"] / "miniature.json").is_file()
    rows = json.loads((out["expansion"] / "miniature.json").read_text())["rows"]
    assert {"base", "llama-pro@3e-4", "full-ft@3e-5", "lora@2e-4", "moe-fg@1e-4", "solar@3e-5"} <= set(rows)
    assert all(r["tokens"] == 2 * 2 * 32 for k, r in rows.items() if k != "base")
    for stage in ("merging", "logit-sum", "proxy", "contrastive", "co-llm", "deep-fusion"):
        assert (out[stage] / "results.json").is_file(), stage
    assert (out["calm"] / "run" / "results.json").is_file()

    # 3. a third call runs nothing
    r = subprocess.run(_cmd(root), capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0
    assert r.stdout.count("] cached") == len(_stages()) and "] start" not in r.stdout

    # 4. the tables render (into a copy of the docs)
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    sys.path.insert(0, str(REPO))
    from bench.results_doc import write_doc

    write_doc(root / "out", docs / "results.md")
    text = (docs / "results.md").read_text()
    assert "Not measured yet" not in text and "not measured yet" not in text
    for name in ("summary", "expansion", "merging", "logit-sum", "proxy", "contrastive", "co-llm", "deep-fusion",
                 "calm"):
        block = text.split(f"<!-- results:{name} -->")[1].split(f"<!-- /results:{name} -->")[0]
        assert "|---" in block, name
    assert "Not measured yet" not in (docs / "reference-models.md").read_text()
    assert (docs / "results-expansion.png").is_file()
    assert "Deferred tokens by class" in text  # Co-LLM's deferral per set and per token class

    # 5. what was measured is recorded beside the page: a machine with no caches renders the same page
    arch = json.loads((docs / "results-data.json").read_text())
    for name in ("family-table", "expansion", "merging", "logit-sum", "proxy", "contrastive", "co-llm",
                 "deep-fusion", "calm"):
        assert arch[name]["md"] in text or name == "family-table", name
        assert arch[name]["facts"] or name == "family-table", name  # the table has no summary row
    for name in ("expansion", "merging", "logit-sum", "proxy", "contrastive", "co-llm", "deep-fusion", "calm"):
        assert arch[name]["summary"], name
    family_text = (docs / "reference-models.md").read_text()
    (tmp_path / "empty" / "done").mkdir(parents=True)
    write_doc(tmp_path / "empty", docs / "results.md")
    assert (docs / "results.md").read_text() == text
    assert (docs / "reference-models.md").read_text() == family_text

    # 6. a replaced machine (no stage caches, the same family): the expansion rows mirrored into
    # the kept directory as they finished come back, and no row trains again
    kept = root / "out" / "kept"
    rows_kept = list(kept.glob("expansion-*/rows/*.json"))
    assert {p.stem for p in rows_kept} == set(rows) - {"base"}
    for p in rows_kept:
        assert json.loads(p.read_text()) == rows[p.stem]
    r = subprocess.run([*_cmd(root, "--only", "expansion"), "--out", str(tmp_path / "new"), "--keep", str(kept)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "reusing the rows kept in" in r.stdout
    stage_dir = next((tmp_path / "new").glob("expansion-*"))
    log = (stage_dir / "log.txt").read_text()
    assert all(f"{row}: cached" in log for row in set(rows) - {"base"}), log
    assert not list(stage_dir.glob("run-*"))
    assert [p.name.split("-")[1] for p in stage_dir.glob("eval-*")] == ["base"]  # the kept one, not re-run
    assert json.loads((stage_dir / "miniature.json").read_text())["rows"] == rows
