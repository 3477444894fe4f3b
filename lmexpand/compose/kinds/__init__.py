"""The one registry of composed kinds (CALM, logit compositions, Co-LLM, deep fusion, ...).

A composed kind is a model that runs several models at run time. Each is declared once, in
its own file of this package (``kinds/<name>.py`` defines ``KIND = ComposedKind(...)``):
its ``model_type``, its modeling file, its members, which tensors its directory may hold,
what may train, how it loads, how export makes it self-contained, and what train, eval and
generate do differently for it. Every other module asks :data:`KINDS`; none names a kind.
A new kind is one modeling file (``compose/<name>_modeling.py``), one plan file
(``expand/<name>.py``) and one declaration here; nothing else changes.

Why a package of declarations that imports nothing of lmexpand. Every layer asks about
composed kinds, the lowest included: ``checkpoint/`` verifies which tensors a composed
directory may hold and tells a composed config from a plain one. ``checkpoint/`` may import
no upper layer, so the declarations must not depend on one: at module level this package
imports only the standard library and its own modules (``tests/test_layering.py`` checks
it, and lets every layer import this package and nothing else of ``compose/``). The
table is complete as soon as the package is imported: it imports every declaration file
itself, below, so no import order can show a partial or empty table. (Registering into a
table of the checkpoint layer was the other option; it would be empty until someone
imported ``compose/``, and the checkpoint layer cannot do that.)

Behaviour stays where its layer is. The two hooks of a declaration, ``load`` and
``self_contained``, are functions in the kind's file whose bodies import ``compose/`` and
``checkpoint/`` modules when called; only ``compose/`` calls them (its loader and its
export half), so nothing below ``compose/`` ever runs them. What the upper layers do
differently for a kind (train, eval, generate) is declared as data they act on: trainable
and embeddable member prefixes, a gate initialisation, span markers, a deferral gate.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from lmexpand.compose.kinds.declaration import ComposedKind

_INFRASTRUCTURE = {"declaration"}


def _discover(path: list[str] = __path__, package: str = __name__) -> dict[str, ComposedKind]:
    """Every declaration file of the package (this one), by model_type; a model_type declared
    twice, or a file without its ``KIND``, is a programming error raised at import."""
    table: dict[str, ComposedKind] = {}
    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        if info.name in _INFRASTRUCTURE or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        kind = getattr(module, "KIND", None)
        if not isinstance(kind, ComposedKind):
            raise TypeError(f"{module.__name__} declares no composed kind (KIND = ComposedKind(...))")
        if kind.model_type in table:
            raise ValueError(f"composed model_type {kind.model_type!r} is declared twice")
        table[kind.model_type] = kind
    return table


KINDS: Mapping[str, ComposedKind] = MappingProxyType(_discover())
"""model_type -> its declaration, for every composed kind (read-only: a kind is declared by its file)."""


def composed_kind(config: Mapping[str, Any]) -> ComposedKind | None:
    """The declaration of a config's kind; None for a model that is not composed."""
    return KINDS.get(config.get("model_type"))


def is_composed_config(config: Mapping[str, Any]) -> bool:
    return composed_kind(config) is not None


def member_references(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(role, path) of every member a composed config references (none once exported)."""
    kind = composed_kind(config)
    return kind.members(config) if kind else []


def read_config(model_dir: Path) -> dict[str, Any]:
    """A directory's config.json; {} when it has none or it does not parse (the caller's own
    checks report that)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


__all__ = ["KINDS", "ComposedKind", "composed_kind", "is_composed_config", "member_references", "read_config"]
