"""YAML recipes: one file describes a job, section by section (surgery, train, eval, export).

Relative paths in a recipe are relative to the recipe file, so a recipe and its data can
move together; embedded model names (smollm2-135m) stay names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmexpand.errors import ConfigError

_PATH_KEYS = ("model", "out", "source")


def _resolve(base: Path, value: Any) -> Any:
    from lmexpand.checkpoint.sources import EMBEDDED

    if isinstance(value, str) and value not in EMBEDDED and not Path(value).is_absolute():
        return str(base / value)
    return value


def load_recipe(path: Path) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the recipe ({e.strerror}).") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}).") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with sections surgery, train, eval, export.")
    return doc


def load_recipe_section(path: Path, section: str) -> dict[str, Any]:
    """One section of a recipe as plain values, relative paths resolved."""
    doc = load_recipe(path)
    if not isinstance(doc.get(section), dict):
        raise ConfigError(f"{path}: no `{section}:` section (a mapping) in the recipe.")
    values = dict(doc[section])
    base = path.resolve().parent
    for key in _PATH_KEYS:
        if key in values:
            values[key] = _resolve(base, values[key])
    if isinstance(values.get("data"), list):
        values["data"] = [
            {**d, "path": _resolve(base, d["path"])} if isinstance(d, dict) and "path" in d else d
            for d in values["data"]
        ]
    return values
