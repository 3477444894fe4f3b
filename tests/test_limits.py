"""Every count and size is bounded before work (issue 33, part 3): whatever asks for an
output past the limits (a surgery's arguments, a merge file's slices) is refused by the one
check every plan goes through (``Plan.validate`` -> ``check_config_sizes(output=True)``),
in a dry run as in a real one, before a byte is written; problem lists are cut to a few."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmexpand.checkpoint.limits import MAX_LAYERS
from lmexpand.cli import main
from lmexpand.validation import FIRST_PROBLEMS, first_few


def _asks(tiny: Path, tmp: Path) -> dict[str, list[str]]:
    slices = [{"sources": [{"model": str(tiny), "layer_range": [0, 4]}]} for _ in range(MAX_LAYERS // 4 + 1)]
    (tmp / "many.yaml").write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": slices}))
    out = str(tmp / "out")
    return {
        "llama-pro": ["surgery", "llama-pro", str(tiny), out, "--add", "4", "--per-group", str(MAX_LAYERS // 4)],
        "upscale-slices": ["surgery", "upscale", str(tiny), out, "--slices", ",".join(["0-4"] * (MAX_LAYERS // 4 + 1))],
        "merge-passthrough": ["merge", str(tmp / "many.yaml"), out],
    }


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("ask", ["llama-pro", "upscale-slices", "merge-passthrough"])
def test_outputs_past_the_layer_limit_are_refused_before_writing(tiny_llama, tmp_path, capsys, ask, dry_run):
    argv = _asks(tiny_llama, tmp_path)[ask] + (["--dry-run"] if dry_run else [])
    listing = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"{MAX_LAYERS:,}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_problem_lists_show_the_first_few_and_a_count():
    for n in (0, 1, FIRST_PROBLEMS, FIRST_PROBLEMS + 1, 100_000):
        problems = [f"problem {i}" for i in range(n)]
        text = first_few(problems)
        assert text.count("problem ") == min(n, FIRST_PROBLEMS)
        assert len(text) < 400
        if n > FIRST_PROBLEMS:
            assert f"and {n - FIRST_PROBLEMS:,} more" in text


@pytest.mark.parametrize("option,value", [("--co-llm-init-steps", "100000"), ("--max-steps", "100000000000")])
def test_training_counts_are_bounded(tiny_pro, gsm8k_small, tmp_path, capsys, option, value):
    code = main(["train", "--model", str(tiny_pro), "--data", str(gsm8k_small), "--out", str(tmp_path / "run"),
                 option, value])
    err = capsys.readouterr().err
    assert code == 2 and option in err and "less than or equal" in err, err
    assert not (tmp_path / "run").exists()
