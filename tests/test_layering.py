"""The layers import one way only: cli -> recipe -> stages -> expand, compose, train, eval,
export -> checkpoint; the shared helpers (errors, progress, units, ...) import none of the
layers; nothing imports cli but ``python -m lmexpand`` (``__main__``).

Read from the source (every ``import`` statement, at module level or inside a function), so a
late import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lmexpand"
RANK = {"__main__": 4, "cli": 3,
        # the orchestration: a recipe's job runs its stages through the stage functions the
        # single commands call too
        "recipe": 2, "stages": 1.5,
        "expand": 1, "train": 1, "eval": 1, "export": 1,
        # the run-time models of composed kinds: train, eval and export load them; they use
        # only the checkpoint layer
        "compose": 0.5,
        "checkpoint": 0}


def _layer(module: str) -> str:
    """lmexpand.train.moe -> train; lmexpand.errors -> errors (a shared helper)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    here = "lmexpand." + ".".join(path.relative_to(PKG).with_suffix("").parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = here.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return [(n, m) for n, m in out if m == "lmexpand" or m.startswith("lmexpand.")]


def _violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        src = _layer("lmexpand." + ".".join(path.relative_to(PKG).with_suffix("").parts))
        for line, module in _imports(path):
            dst = _layer(module)
            if dst == src or dst in ("", "__init__"):
                continue
            if src not in RANK:  # a shared helper: imports no layer at all
                if dst in RANK:
                    bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {module} (a helper imports no layer)")
            elif dst in RANK and RANK[dst] >= RANK[src]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports {module} ({src} may import only lower layers)")
    return bad


def test_layers_import_one_way_only():
    assert _violations() == []


def test_checkpoint_imports_no_other_layer():
    """The issue's own condition, stated on its own: checkpoint/ imports nothing from train/,
    eval/, expand/, compose/, export, recipe or cli."""
    for path in (PKG / "checkpoint").rglob("*.py"):
        for line, module in _imports(path):
            assert _layer(module) not in RANK or _layer(module) == "checkpoint", f"{path.name}:{line} imports {module}"


def test_nothing_imports_cli():
    """The CLI only parses, calls one stage function and prints: no module needs it."""
    for path in PKG.rglob("*.py"):
        if path.relative_to(PKG).parts in (("cli.py",), ("__main__.py",)):
            continue
        for line, module in _imports(path):
            assert _layer(module) != "cli", f"{path.relative_to(PKG.parent)}:{line} imports {module}"


def test_the_check_sees_a_late_import(tmp_path, monkeypatch):
    """The scanner counts imports inside functions, relative ones included."""
    fake = tmp_path / "lmexpand"
    (fake / "checkpoint").mkdir(parents=True)
    (fake / "checkpoint" / "x.py").write_text("def f():\n    from ..train import moe\n    import lmexpand.eval.moe\n")
    import sys
    monkeypatch.setattr(sys.modules[__name__], "PKG", fake)
    assert len(_violations()) == 2
