"""The one YAML loader for every file a user gives lmexpand (recipes, merge configs).

YAML from a user is untrusted input: this loader is PyYAML's safe loader with bounds.
- The file is read as bytes and refused above ``MAX_BYTES``, or when it is not UTF-8.
- Aliases are bounded twice: at most ``MAX_ALIASES`` alias references, and the document as
  the program sees it (every alias expanded, as validation and hashing walk it) at most
  ``MAX_NODES`` nodes. A 900-byte "billion laughs" of nested aliases is refused at once
  instead of expanding to gigabytes.
- A key given twice in one mapping is an error naming the key and both lines (PyYAML keeps
  the last one silently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmexpand.errors import ConfigError

MAX_BYTES = 1 << 20  # a recipe or merge config is a few KB; anything near this is not one
MAX_ALIASES = 1000
MAX_NODES = 200_000


def _loader(where: str):
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                BoundedLoader.aliases += 1
                if BoundedLoader.aliases > MAX_ALIASES:
                    mark = self.peek_event().start_mark
                    raise ConfigError(f"{where}: more than {MAX_ALIASES:,} YAML aliases (line {mark.line + 1}); "
                                      "a recipe needs few or none. Write the values out.")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # PyYAML reports unhashable keys itself
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"{where}: the key {key!r} is given twice in one mapping (lines {seen[key]} and "
                                      f"{line}); YAML would silently keep the last one. Remove one of them.")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return BoundedLoader


def _expanded_size(doc: Any, where: str) -> None:
    """Count nodes with aliases expanded (shared objects counted each time they are reached)."""
    count = 0
    stack = [doc]
    while stack:
        x = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError(f"{where}: the YAML expands to more than {MAX_NODES:,} values (nested aliases?); "
                              "a recipe is a few dozen. Write the values out without aliases.")
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def load_yaml(path: Path, what: str = "YAML file") -> Any:
    """The document in ``path``; a :class:`ConfigError` naming the file and the fix for any problem."""
    import yaml

    where = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ConfigError(f"{where}: {size:,} bytes is too large for a {what} (limit {MAX_BYTES:,}). "
                              "Is this the right file?")
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory; give the {what}'s file.") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the {what} ({e.strerror}).") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}). Save the {what} "
                          "as UTF-8.") from None
    try:
        doc = yaml.load(text, Loader=_loader(where))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{where}: not valid YAML ({msg[:500]}).") from None
    _expanded_size(doc, where)
    return doc
