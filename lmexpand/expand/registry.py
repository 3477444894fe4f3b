"""One registry of surgery methods.

A method is one file in ``lmexpand/expand/`` that defines a typed config (a frozen pydantic
model, unknown fields refused) and a plan function, registered with :func:`register_method`.
The CLI builds ``lmexpand surgery <name>`` from the config's fields and the recipes validate
against the same model, so adding a method touches no other file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from pydantic import BaseModel

from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.errors import ConfigError
from lmexpand.expand.plan import Plan
from lmexpand.validation import STRICT, validate


class MethodConfig(BaseModel):
    """Base of every method's arguments: immutable, unknown keys are errors."""

    model_config = STRICT


def comma_list(value: Any, choices: str) -> Any:
    """A pydantic ``mode="before"`` helper: 'a,b' -> ['a', 'b']; an empty list is an error
    that names the ``choices``."""
    if isinstance(value, str):
        value = [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list) and not value:
        raise ValueError(f"give {choices}")
    return value


def names_matching(names: Sequence[str], globs: Sequence[str], flag: str = "--trainable") -> list[str]:
    """The names matched by any glob, in ``names`` order; a glob matching nothing is an error."""
    import fnmatch

    out: list[str] = []
    for g in globs:
        hits = [n for n in names if fnmatch.fnmatch(n, g)]
        if not hits:
            raise ConfigError(f"{flag} {g!r} matches no output tensor (names look like {names[min(1, len(names) - 1)]!r}).")
        out += [h for h in hits if h not in out]
    return out


PlanFunction = Callable[[Sequence[CheckpointReader], Any], Plan]


@dataclass(frozen=True)
class SurgeryMethod:
    name: str
    config: type[MethodConfig]
    plan: PlanFunction
    summary: str
    help: str
    sources: tuple[str, ...] = ("SOURCE",)
    # the last source may repeat: at least len(sources) models (logit compositions)
    variadic: bool = False

    def checked_plan(self, readers: Sequence[CheckpointReader], cfg: MethodConfig) -> Plan:
        """The plan, then every source it reads checked against its config (names and
        shapes), before a byte is written: a plan computed from headers that contradict the
        config would copy the wrong tensors and still claim what it promises."""
        from lmexpand.checkpoint.verify import require_structure

        plan = self.plan(readers, cfg)
        plan.validate()  # the output's sizes against the limits, before anything is read or written
        for reader in plan.readers or readers:
            require_structure(reader)
        return plan


METHODS: dict[str, SurgeryMethod] = {}


def register_method(name: str, *, config: type[MethodConfig], summary: str, help: str,
                    sources: tuple[str, ...] = ("SOURCE",),
                    variadic: bool = False) -> Callable[[PlanFunction], PlanFunction]:
    def decorate(fn: PlanFunction) -> PlanFunction:
        if name in METHODS:
            raise ValueError(f"surgery method {name!r} is registered twice")
        METHODS[name] = SurgeryMethod(name, config, fn, summary, help, sources, variadic)
        return fn

    return decorate


_INFRASTRUCTURE = {"plan", "executor", "registry", "layer_spec"}
_loaded = False


def load_methods() -> dict[str, SurgeryMethod]:
    """Import every method module in this package (each registers itself)."""
    global _loaded
    if not _loaded:
        import lmexpand.expand as package

        for info in pkgutil.iter_modules(package.__path__):
            if info.name not in _INFRASTRUCTURE and not info.name.startswith("_"):
                importlib.import_module(f"lmexpand.expand.{info.name}")
        _loaded = True
    return METHODS


def get_method(name: str) -> SurgeryMethod:
    methods = load_methods()
    if name not in methods:
        raise ConfigError(f"unknown surgery method {name!r}. Available: {', '.join(sorted(methods))}.")
    return methods[name]


def parse_config(method: SurgeryMethod, values: Mapping[str, Any], *, style: str = "flag") -> MethodConfig:
    """Validate arguments; every problem is reported at once, naming the flag (or recipe key),
    the value given and what is allowed."""
    return validate(method.config, values, what=f"surgery {method.name}", style=style)
