"""The layers import one way only: cli -> recipe -> stages -> expand, compose, train, eval,
export -> checkpoint; the shared helpers (errors, progress, units, ...) import none of the
layers; nothing imports cli but ``python -m lmexpand`` (``__main__``).

Read from the source (every ``import`` statement, at module level or inside a function), so a
late import inside a function counts as much as one at the top.

Composed kinds (issue 32): ``compose/`` holds the one registry of composed kinds, and nothing
outside it names one. So:

- the declarations, ``lmexpand.compose.kinds`` (one file per kind), are data that every layer
  may import, the checkpoint layer included (it verifies a composed directory's tensors).
  In exchange they import, at module level, nothing of lmexpand but themselves; their hooks
  (``load``, ``self_contained``) import compose and checkpoint modules inside the function,
  as any compose module may, and only compose calls them;
- nothing outside ``compose/`` imports a modeling file (``compose/*_modeling.py``): the
  loader and the registry hand out the models;
- no module outside ``compose/`` holds a registered kind's ``model_type`` in a string (the
  list comes from the registry): it asks the registry.
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


# every layer may import these (they import no layer themselves: checked below)
DECLARATIONS = "lmexpand.compose.kinds"


def _is_declarations(module: str) -> bool:
    return module == DECLARATIONS or module.startswith(DECLARATIONS + ".")


def _module_name(path: Path) -> str:
    return "lmexpand." + ".".join(path.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")


def _layer(module: str) -> str:
    """lmexpand.train.moe -> train; lmexpand.errors -> errors (a shared helper)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, top_level_only: bool = False) -> list[tuple[int, str]]:
    here = "lmexpand." + ".".join(path.relative_to(PKG).with_suffix("").parts)
    out = []
    tree = ast.parse(path.read_text(), str(path))
    for node in (tree.body if top_level_only else ast.walk(tree)):
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
            if dst == src or dst in ("", "__init__") or _is_declarations(module):
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
    eval/, expand/, compose/, export, recipe or cli (but the declarations of composed kinds,
    which every layer may read: see the module docstring)."""
    for path in (PKG / "checkpoint").rglob("*.py"):
        for line, module in _imports(path):
            if _is_declarations(module):
                continue
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


def _outside_compose() -> list[Path]:
    return [p for p in sorted(PKG.rglob("*.py")) if _layer(_module_name(p)) != "compose"]


def test_declarations_import_nothing_of_lmexpand_at_module_level():
    """What every layer may import must not bring another layer (or torch) with it: the
    declarations import, at module level, only the standard library and themselves; and the
    ``compose`` package's ``__init__`` (run by any import of the declarations) imports nothing."""
    files = sorted((PKG / "compose" / "kinds").rglob("*.py"))
    assert files, "no declarations package"
    for path in [*files, PKG / "compose" / "__init__.py"]:
        for line, module in _imports(path, top_level_only=True):
            assert _is_declarations(module), f"{path.relative_to(PKG.parent)}:{line} imports {module} at module level"


def test_nothing_outside_compose_imports_a_modeling_file():
    modeling = {f"lmexpand.compose.{p.stem}" for p in (PKG / "compose").glob("*_modeling.py")}
    assert modeling, "no modeling files found"
    bad = [f"{p.relative_to(PKG.parent)}:{line} imports {m}" for p in _outside_compose() for line, m in _imports(p)
           if m in modeling or any(m.startswith(x + ".") for x in modeling)]
    # `from lmexpand.compose import calm_modeling` names the module as an alias
    for p in _outside_compose():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.ImportFrom) and node.module == "lmexpand.compose":
                bad += [f"{p.relative_to(PKG.parent)}:{node.lineno} imports {a.name}" for a in node.names
                        if f"lmexpand.compose.{a.name}" in modeling]
    assert bad == []


def _model_type_literals(paths: list[Path], model_types: list[str]) -> list[str]:
    bad = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                bad += [f"{path.relative_to(PKG.parent) if path.is_relative_to(PKG.parent) else path}:{node.lineno} "
                        f"names {t!r}" for t in model_types
                        if t in node.value]
    return bad


def test_no_module_outside_compose_names_a_composed_model_type():
    """Strings only (docstrings included); the registry's own list, never a fixed one."""
    from lmexpand.compose.kinds import KINDS

    assert KINDS, "the registry of composed kinds is empty"
    assert _model_type_literals(_outside_compose(), sorted(KINDS)) == []


def test_the_literal_check_sees_a_model_type(tmp_path):
    from lmexpand.compose.kinds import KINDS

    kind = sorted(KINDS)[0]
    fake = tmp_path / "x.py"
    fake.write_text(f'"""Loads {kind} models."""\nif config["model_type"] == f"{kind}":\n    pass\n')
    assert len(_model_type_literals([fake], [kind])) == 2
