"""The one registry of merge methods: what a method declares (parameters, base, input
counts, paper) and the decorator that registers it, refusing a name registered twice.

Each method merges one tensor. It receives :class:`Inputs` (the tensors in the method's
layout: for base-aware methods the base first, then the other models in configuration
order), the resolved per-model parameters and the shared ones as keyword arguments. The
arithmetic follows mergekit 0.1.5 operation by operation (same dtypes, same reductions, same
random draws in the same order), so outputs agree bitwise; mergekit's ``merge_methods/`` is
the reference, one file per family here as there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

if TYPE_CHECKING:
    import torch

REQUIRED = object()


class MethodError(ValueError):
    """A merge that cannot be computed from these inputs (the method's own limit, such as
    multislerp's antipodal inputs): reported to the user naming the tensor, nothing written."""


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float, bool, int
    scope: str = "shared"  # "shared", "input" (every model), "non_base" (every model but the base)
    default: Any = REQUIRED
    optional: bool = False  # None allowed (passthrough's scale)
    check: Optional[Callable[[Any], Optional[str]]] = None  # value -> problem or None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def cast(self, value: Any) -> Any:
        """mergekit validates with pydantic in lax mode: 1 -> 1.0, "0.5" -> 0.5, true/false."""
        from pydantic import TypeAdapter

        kind = Optional[self.kind] if self.optional else self.kind
        try:
            return TypeAdapter(kind).validate_python(value)
        except Exception:  # noqa: BLE001 - pydantic's ValidationError; reported with the name
            raise ValueError(f"{self.name}: {value!r} is not a {self.kind.__name__}") from None


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., "torch.Tensor"]
    params: tuple[Param, ...]
    base: str  # "required", "optional", "ignored"
    paper: str
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    min_non_base: int = 0
    max_non_base: Optional[int] = None
    random: bool = False
    summary: str = ""
    # the result's dtype is promoted to at least this one without out_dtype (arcee_fusion's
    # fp32 mask makes mergekit write fp32 from bf16 inputs); None: the inputs' dtype
    result_at_least: Optional[str] = None

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


@dataclass
class Inputs:
    """One tensor group: ``tensors`` in layout order; ``base_index`` 0 or None; per-model
    parameters aligned with ``tensors`` (``input`` scope) or with ``non_base``; ``options``:
    the run's options that are not mergekit parameters (``match_mergekit``)."""

    tensors: list["torch.Tensor"]
    base_index: Optional[int]
    per_model: dict[str, list[Any]] = field(default_factory=dict)
    draw: Optional[Callable[[Callable[[Any], Any]], Any]] = None  # runs fn(source) in RNG order (methods/rng.py)
    match_mergekit: bool = False

    @property
    def base(self) -> Optional["torch.Tensor"]:
        return None if self.base_index is None else self.tensors[self.base_index]

    @property
    def non_base(self) -> list["torch.Tensor"]:
        return [t for i, t in enumerate(self.tensors) if i != self.base_index]


METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, params: Sequence[Param] = (), base: str = "ignored", paper: str, summary: str,
             **limits: Any) -> Callable:
    def decorate(fn: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        METHODS[name] = MergeMethod(name, fn, tuple(params), base, paper, summary=summary, **limits)
        return fn

    return decorate


def method_names() -> list[str]:
    return sorted(METHODS) + ["greedy_soup"]


def density_check(v: float) -> Optional[str]:
    return None if 0.0 <= v <= 1.0 else f"density {v:g} is outside [0, 1] (the fraction of each task vector kept)"


def work_float(t: "torch.Tensor") -> "torch.dtype":
    """fp32 arithmetic, fp64 for fp64 inputs (mergekit's accumulation dtype)."""
    import torch

    return torch.float64 if t.dtype == torch.float64 else torch.float32
