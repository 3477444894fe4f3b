"""Turn pydantic validation errors into one user message naming every problem."""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

from pydantic import BaseModel, ValidationError

from lmexpand.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def validate(model: type[M], values: Mapping[str, Any], *, what: str, style: str = "flag") -> M:
    """``model(**values)``, or a :class:`ConfigError` listing each problem as the flag
    (``style="flag"``) or recipe key (``style="key"``), the message and the value given."""
    try:
        return model(**values)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            shown = (flag_name(loc) if style == "flag" else loc) if loc else ""
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                problems.append(f"{shown}: required")
            elif err["type"] == "extra_forbidden":
                allowed = ", ".join(model.model_fields)
                problems.append(f"{shown}: unknown {'option' if style == 'flag' else 'key'} (allowed: {allowed})")
            else:
                problems.append(f"{shown + ': ' if shown else ''}{msg} (got {err.get('input')!r})")
        raise ConfigError(f"{what}: " + "; ".join(problems) + ".") from None
