"""SIGTERM is handled like Ctrl-C, and what dead processes left is removed (issue 33, part 5).

Each command that writes (surgery, merge, export, train, eval) gets a SIGTERM at a point
where it has a partial output on disk (``LMEXPAND_KILL_SIGNAL=TERM``: the signal a
scheduler or ``kill`` sends, delivered at a named point), and must exit 143 with one line,
no traceback, no partial file or directory left, no output that looks complete, inputs
untouched. Then, for every command, hidden partial outputs of dead processes lying in the
directory it writes into are removed, and those of live processes kept.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmexpand.cli import main
from tests.test_crash import CMD, ENV, TEMPLATE

SIGTERM_EXIT = 143


def _digest(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        out.update({str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    return out


def _partials(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if ".lmexpand-partial-" in p.name or ".lmexpand-old-" in p.name or ".partial-" in p.name)


def _commands(tiny_llama: Path, tiny_pro: Path, data: Path, tmp: Path) -> dict[str, tuple[list, str, Path]]:
    """name -> (argv, kill point at which a partial output exists, the output)."""
    merge_cfg = tmp / "merge.yaml"
    merge_cfg.write_text(json.dumps({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(tiny_llama), "layer_range": [0, 4]}]},
        {"sources": [{"model": str(tiny_llama), "layer_range": [2, 4]}]}]}))
    text = tmp / "text.txt"
    text.write_text("The cat sat on the mat.\n\nA dog ran in the park. " * 30)
    return {
        "surgery": (["surgery", "llama-pro", tiny_llama, tmp / "pro", "--add", "1", "--max-shard-size", "60KB"],
                    "write:before-rename", tmp / "pro"),
        "merge": (["merge", merge_cfg, tmp / "merged"], "write:before-rename", tmp / "merged"),
        "export": (["export", tiny_pro, tmp / "exported"], "write:before-rename", tmp / "exported"),
        "train": (["train", "--model", tiny_pro, "--data", data, "--template", TEMPLATE, "--out", tmp / "run",
                   "--max-steps", "4", "--save-every", "1", "--seq-len", "32", "--batch-size", "2",
                   "--val-every", "0"], "train:checkpoint-files-written", tmp / "run" / "model"),
        "eval": (["eval", tiny_llama, "--data", f"prose={text}", "--out", tmp / "ev", "--seq-len", "32",
                  "--no-samples"], "eval:before-report", tmp / "ev" / "results.json"),
    }


@pytest.mark.parametrize("command", ["surgery", "merge", "export", "train", "eval"])
def test_sigterm_cleans_up_and_exits_143(tiny_llama, tiny_pro, gsm8k_small, tmp_path, command):
    argv, point, output = _commands(tiny_llama, tiny_pro, gsm8k_small, tmp_path)[command]
    inputs = _digest(tiny_llama, tiny_pro, gsm8k_small)
    env = {**ENV, "LMEXPAND_KILL_AT": point, "LMEXPAND_KILL_SIGNAL": "TERM"}
    r = subprocess.run(CMD + [str(a) for a in argv], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == SIGTERM_EXIT, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("terminated (SIGTERM): stopped"), r.stderr
    assert not output.exists()
    assert _partials(tmp_path) == []
    assert _digest(tiny_llama, tiny_pro, gsm8k_small) == inputs


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("command", ["surgery", "merge", "export", "train", "eval"])
def test_leftovers_of_dead_processes_are_removed_by_the_next_writer(tiny_llama, tiny_pro, gsm8k_small, tmp_path,
                                                                     capsys, command):
    argv, _, output = _commands(tiny_llama, tiny_pro, gsm8k_small, tmp_path)[command]
    where = output.parent if command not in ("train", "eval") else output.parent.parent  # the dir written into
    where.mkdir(parents=True, exist_ok=True)
    dead, live = _dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [where / f".other-output.lmexpand-partial-{dead}", where / f".x.safetensors.lmexpand-partial-{dead}"]
        stale[0].mkdir()
        (stale[0] / "model.safetensors").write_bytes(b"\0" * 1000)
        stale[1].write_bytes(b"half")
        kept = where / f".busy.lmexpand-partial-{live.pid}"  # a process still writing it
        kept.mkdir()
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
        assert not any(p.exists() for p in stale)
        assert kept.is_dir()
    finally:
        live.kill()
        live.wait()


def test_full_disk_while_eval_writes_its_report(tiny_llama, tiny_pro, gsm8k_small, tmp_path):
    """ENOSPC while the plots and results.json are written: exit 2, one paragraph, no file
    half-written or left behind."""
    argv, _, output = _commands(tiny_llama, tiny_pro, gsm8k_small, tmp_path)["eval"]
    env = {**ENV, "LMEXPAND_FAULT": "ENOSPC@0"}
    r = subprocess.run(CMD + [str(a) for a in argv], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "disk filled up" in r.stderr.strip().splitlines()[-1]
    assert not output.exists() and _partials(tmp_path) == []
