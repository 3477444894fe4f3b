"""Surgery plans: what every output tensor is, computed from source names and shapes only.

A method looks at the source config and tensor headers (never the values) and returns a
:class:`Plan`: the output config, one :class:`TensorPlan` per output tensor whose ``op`` says
how to build it from source tensors, the names of the new (trainable) parameters, and
whether the method promises the expanded model computes exactly what the source did.

Ops form small trees whose leaves read source tensors (:class:`Read`). They are frozen
dataclasses, so a plan prints, compares and serializes; ``compute`` runs them on tensors
(torch imported only then). The streaming executor turns a plain ``Read`` of an unchanged
tensor into a raw byte copy and ``Zeros`` into zero bytes; everything else is computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

from lmexpand.checkpoint.safetensors_format import DTYPE_SIZES

if TYPE_CHECKING:
    import torch

# get(model_index, tensor_name) -> tensor
TensorGetter = Callable[[int, str], "torch.Tensor"]


@dataclass(frozen=True)
class Read:
    """A source tensor as it is. ``model`` indexes the plan's sources (0 = the first)."""

    name: str
    model: int = 0

    def compute(self, get: TensorGetter, shape: tuple[int, ...], dtype: str) -> "torch.Tensor":
        return get(self.model, self.name)

    def reads(self) -> list[tuple[int, str]]:
        return [(self.model, self.name)]

    def describe(self) -> str:
        return f"copy {self.name}" if self.model == 0 else f"copy m{self.model}:{self.name}"


@dataclass(frozen=True)
class Zeros:
    """All zeros, of the output slot's shape and dtype: no source read."""

    def compute(self, get: TensorGetter, shape: tuple[int, ...], dtype: str) -> "torch.Tensor":
        import torch

        return torch.zeros(shape, dtype=_torch_dtype(dtype))

    def reads(self) -> list[tuple[int, str]]:
        return []

    def describe(self) -> str:
        return "zeros"


@dataclass(frozen=True)
class Slice:
    """``input[start:end]`` along ``dim``."""

    input: "Op"
    dim: int
    start: int
    end: int

    def compute(self, get: TensorGetter, shape: tuple[int, ...], dtype: str) -> "torch.Tensor":
        t = self.input.compute(get, shape, dtype)
        return t.narrow(self.dim, self.start, self.end - self.start).contiguous()

    def reads(self) -> list[tuple[int, str]]:
        return self.input.reads()

    def describe(self) -> str:
        return f"{self.input.describe()}[dim {self.dim}: {self.start}:{self.end}]"


@dataclass(frozen=True)
class Concat:
    inputs: tuple["Op", ...]
    dim: int = 0

    def compute(self, get: TensorGetter, shape: tuple[int, ...], dtype: str) -> "torch.Tensor":
        import torch

        return torch.cat([i.compute(get, shape, dtype) for i in self.inputs], dim=self.dim)

    def reads(self) -> list[tuple[int, str]]:
        return [r for i in self.inputs for r in i.reads()]

    def describe(self) -> str:
        return f"concat(dim {self.dim}; " + ", ".join(i.describe() for i in self.inputs) + ")"


@dataclass(frozen=True)
class Stack:
    inputs: tuple["Op", ...]
    dim: int = 0

    def compute(self, get: TensorGetter, shape: tuple[int, ...], dtype: str) -> "torch.Tensor":
        import torch

        return torch.stack([i.compute(get, shape, dtype) for i in self.inputs], dim=self.dim)

    def reads(self) -> list[tuple[int, str]]:
        return [r for i in self.inputs for r in i.reads()]

    def describe(self) -> str:
        return f"stack(dim {self.dim}; " + ", ".join(i.describe() for i in self.inputs) + ")"


@dataclass(frozen=True)
class Scale:
    """``input * factor``, computed in float32 and cast back to the output dtype; with an
    ``offset``, ``(input + offset) * factor - offset`` (the weight of a norm that computes
    ``x_hat * (offset + w)``, e.g. Gemma's ``1 + w``: its output scales by ``factor``)."""

    input: "Op"
    factor: float
    offset: float = 0.0

    def compute(self, get: TensorGetter, shape: tuple[int, ...], dtype: str) -> "torch.Tensor":
        t = self.input.compute(get, shape, dtype)
        if self.offset:
            return ((t.float() + self.offset) * self.factor - self.offset).to(t.dtype)
        return (t.float() * self.factor).to(t.dtype)

    def reads(self) -> list[tuple[int, str]]:
        return self.input.reads()

    def describe(self) -> str:
        if self.offset:
            return f"({self.input.describe()} + {self.offset:g}) * {self.factor:g} - {self.offset:g}"
        return f"{self.input.describe()} * {self.factor:g}"


@dataclass(frozen=True)
class Noise:
    """``input + std * N(0, 1)`` from a seeded generator (same values on every path)."""

    input: "Op"
    std: float
    seed: int

    def compute(self, get: TensorGetter, shape: tuple[int, ...], dtype: str) -> "torch.Tensor":
        import torch

        t = self.input.compute(get, shape, dtype)
        gen = torch.Generator().manual_seed(self.seed)
        return (t.float() + self.std * torch.randn(t.shape, generator=gen)).to(t.dtype)

    def reads(self) -> list[tuple[int, str]]:
        return self.input.reads()

    def describe(self) -> str:
        return f"{self.input.describe()} + noise(std {self.std:g}, seed {self.seed})"


@dataclass(frozen=True)
class NewInit:
    """A fresh tensor: ``N(mean, std)`` from a seeded generator, or constant ``mean`` if std=0."""

    std: float
    seed: int
    mean: float = 0.0

    def compute(self, get: TensorGetter, shape: tuple[int, ...], dtype: str) -> "torch.Tensor":
        import torch

        if self.std == 0:
            return torch.full(shape, self.mean, dtype=_torch_dtype(dtype))
        gen = torch.Generator().manual_seed(self.seed)
        return (self.mean + self.std * torch.randn(shape, generator=gen)).to(_torch_dtype(dtype))

    def reads(self) -> list[tuple[int, str]]:
        return []

    def describe(self) -> str:
        return f"new N({self.mean:g}, {self.std:g}) seed {self.seed}" if self.std else f"constant {self.mean:g}"


@dataclass(frozen=True)
class Const:
    """Values the plan function computed itself (e.g. a router initialized from the base
    model's hidden states); ``what`` says where they came from."""

    values: Any = field(compare=False, repr=False)  # a torch.Tensor
    what: str = "computed"

    def compute(self, get: TensorGetter, shape: tuple[int, ...], dtype: str) -> "torch.Tensor":
        return self.values.to(_torch_dtype(dtype))

    def reads(self) -> list[tuple[int, str]]:
        return []

    def describe(self) -> str:
        return self.what


Op = Union[Read, Zeros, Slice, Concat, Stack, Scale, Noise, NewInit, Const]


def _torch_dtype(st_dtype: str) -> "torch.dtype":
    import torch

    from lmexpand.checkpoint.reader import torch_dtype_name

    return getattr(torch, torch_dtype_name(st_dtype))


@dataclass(frozen=True)
class TensorPlan:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    op: Op

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Plan:
    """Everything a surgery will write, decided before any value is read."""

    method: str
    arguments: dict[str, Any]
    sources: list[Path]
    config: dict[str, Any]
    tensors: list[TensorPlan]
    new_parameters: list[str]
    function_preserving: bool
    layer_map: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra_lineage: dict[str, Any] = field(default_factory=dict)
    # options that break exactness: the CLI measures max |dlogit| vs the source after writing
    check_delta: bool = False
    # Readers the plan function opened itself (for sources beyond the method's arguments,
    # e.g. more models named in a config); the executor uses them instead of reopening.
    readers: list[Any] | None = field(default=None, repr=False, compare=False)
    # Files written with the weights (name -> bytes), over those carried from a source, and
    # the source whose tokenizer files are carried (an index into the readers).
    files: dict[str, bytes] = field(default_factory=dict, repr=False)
    carry_from: int = 0
    # False: ``files`` holds the output's own tokenizer; only generation_config.json is carried
    carry_tokenizer: bool = True

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def new_params(self) -> int:
        new = set(self.new_parameters)
        return sum(t.numel for t in self.tensors if t.name in new)

    def tensor(self, name: str) -> TensorPlan:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def validate(self) -> None:
        """Internal consistency: unique names, new parameters exist (a plan bug otherwise)."""
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"plan for {self.method} writes a tensor twice")
        missing = set(self.new_parameters) - set(names)
        if missing:
            raise ValueError(f"plan for {self.method} lists new parameters it does not write: {sorted(missing)[:3]}")
        from lmexpand.checkpoint.limits import check_config_sizes

        check_config_sizes(self.config, self.method, output=True)  # a user's request past the limits (ConfigError)

    def training_memory(self, grad_dtype_bytes: int | None = None) -> dict[str, int]:
        """Bytes to train the new parameters with AdamW: weights + grads + 2 fp32 moments,
        plus the frozen weights held for the forward pass. Activations not included."""
        new = set(self.new_parameters)
        new_bytes = sum(t.nbytes for t in self.tensors if t.name in new)
        frozen = self.total_bytes - new_bytes
        grads = new_bytes if grad_dtype_bytes is None else self.new_params * grad_dtype_bytes
        adam = 8 * self.new_params
        return {
            "new_weights": new_bytes,
            "gradients": grads,
            "adamw_states": adam,
            "frozen_weights": frozen,
            "total": new_bytes + grads + adam + frozen,
        }


def remap_layers(config: dict[str, Any], num_layers_key: str, per_layer_keys: tuple[str, ...],
                 layer_sources: list[int]) -> dict[str, Any]:
    """A config for a model whose output layer i is built from source layer
    ``layer_sources[i]``: the layer count and every per-layer list follow the map."""
    out = dict(config)
    n_src = int(config[num_layers_key])
    out[num_layers_key] = len(layer_sources)
    for key in per_layer_keys:
        values = config.get(key)
        if isinstance(values, list):
            if len(values) != n_src:
                raise ValueError(f"config {key} has {len(values)} entries for {n_src} layers")
            out[key] = [values[k] for k in layer_sources]
    return out
