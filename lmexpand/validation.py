"""Turn pydantic validation errors into one user message naming every problem."""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from lmexpand.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

# Every typed config of lmexpand (training, surgery and merge arguments, recipe sections):
# immutable, unknown keys are errors, and numbers must be finite (``--lr inf``, ``nan``).
STRICT = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
_SHOWN = 120  # characters of a bad value quoted in a message
FIRST_PROBLEMS = 5  # problems listed in one message; the rest are counted


def first_few(problems: list[str], n: int = FIRST_PROBLEMS) -> str:
    """``problems`` joined for a message: the first ``n`` and how many more (a 1 MB file of
    unknown keys once gave a 6.8 MB message)."""
    shown = "; ".join(problems[:n])
    return shown + (f"; and {len(problems) - n:,} more problem(s)" if len(problems) > n else "")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + f"... ({len(text):,} characters)"


def _shown_text(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + f"... ({len(text):,} characters)"


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
            shown = _shown_text((flag_name(loc) if style == "flag" else loc) if loc else "")
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "missing":
                problems.append(f"{shown}: required")
            elif err["type"] == "extra_forbidden":
                allowed = ", ".join(model.model_fields)
                problems.append(f"{shown}: unknown {'option' if style == 'flag' else 'key'} (allowed: {allowed})")
            elif not loc:  # a rule across fields: its message names them (the input is the whole config)
                problems.append(msg)
            else:
                problems.append(f"{shown}: {msg} (got {_shown(err.get('input'))})")
        raise ConfigError(f"{what}: " + first_few(problems) + ".") from None
