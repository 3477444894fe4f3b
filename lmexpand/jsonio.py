"""The one reader of JSON files that must be readable: their value, or a user error.

:func:`read_json` reads a file (config.json, an index, ``lmexpand.json``, a tokenizer, ...)
and raises the caller's :class:`~lmexpand.errors.LmexpandError` (exit code 2, no traceback)
when it is missing, unreadable or not JSON, with one paragraph that names the file, what it
should hold and the fix. Files whose absence or damage is not the user's problem (an
optional cache, a best-effort hint) are read where they are, with their own fallback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmexpand.errors import LmexpandError

_JSON_KINDS = ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"), ((int, float), "number"))


def _kind(value: Any) -> str:
    """What JSON calls the type of ``value`` (as ``json.loads`` returns it)."""
    return next((name for types, name in _JSON_KINDS if isinstance(value, types)), "null")


def read_json(path: str | Path, *, what: str, fix: str = "Fix the file or replace it.",
              error: type[LmexpandError] = LmexpandError, expect: type | None = None) -> Any:
    """The JSON value in ``path``. A missing or unreadable file, or one that is not JSON, raises
    ``error("PATH: cannot read WHAT (REASON). FIX")``; with ``expect`` (``dict`` or ``list``),
    so does a value of another type. ``what`` names what the file holds ("config.json", "the
    shard index"); ``fix`` says what to do."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot read {what} ({e}). {fix}") from None
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: cannot read {what}: it holds a JSON {_kind(value)}, not a JSON "
                    f"{_kind(expect())}. {fix}")
    return value
