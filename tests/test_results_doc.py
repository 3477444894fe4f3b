"""bench/results_doc.py on the committed record: a machine whose result caches are empty (a new
clone, a replaced machine) renders docs/results.md and docs/reference-models.md exactly as
committed, from docs/results-data.json, rather than erasing measured tables."""

from __future__ import annotations

import json
import shutil
import sys

from tests.conftest import REPO


def test_empty_cache_keeps_every_measured_block(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    before = {p: (docs / p).read_text() for p in ("results.md", "reference-models.md")}
    arch = json.loads((docs / "results-data.json").read_text())
    assert arch, "docs/results-data.json records no stage"
    sys.path.insert(0, str(REPO))
    from bench.results_doc import write_doc

    (tmp_path / "out" / "done").mkdir(parents=True)
    write_doc(tmp_path / "out", docs / "results.md")
    for p, text in before.items():
        assert (docs / p).read_text() == text, p
    summary = before["results.md"].split("<!-- results:summary -->")[1].split("<!-- /results:summary -->")[0]
    for name, entry in arch.items():
        assert entry["md"] in before["results.md"] + before["reference-models.md"], name
        for row in entry["summary"]:
            assert row in summary, (name, row)


def test_a_stage_missing_everywhere_says_so(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs)
    (docs / "results-data.json").unlink()
    sys.path.insert(0, str(REPO))
    from bench.results_doc import write_doc

    (tmp_path / "out" / "done").mkdir(parents=True)
    write_doc(tmp_path / "out", docs / "results.md")
    text = (docs / "results.md").read_text()
    assert text.count("Not measured yet") == 8 and "| *not measured yet* |" in text
    assert json.loads((docs / "results-data.json").read_text()) == {}
