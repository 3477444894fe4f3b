"""What the writer writes and how it is cut into shards.

An :class:`OutputTensor` is a slot of the output (name, dtype, shape) and its producer: a
:class:`RawCopy` of a source tensor's bytes, :class:`Zeros` (a hole in the file) or a
:class:`Computed` tensor. :func:`plan_shards` groups the slots into shards of about equal
size within the limit; :func:`shard_names` names them as transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence, Union

from lmexpand.checkpoint.reader import SINGLE_FILE
from lmexpand.checkpoint.safetensors_format import TensorInfo, TensorSlot, alignment_order

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


@dataclass(frozen=True)
class RawCopy:
    """The bytes of a source tensor, unchanged."""

    info: TensorInfo


@dataclass(frozen=True)
class Zeros:
    """All-zero bytes."""


@dataclass(frozen=True)
class Computed:
    """A tensor computed on demand; called once, when its turn to be written comes.
    ``finite_checked``: the producer has already refused NaN/Inf (with a message naming
    where the values came from), so the writer does not scan it again."""

    fn: Callable[[], "torch.Tensor"]
    finite_checked: bool = False


Producer = Union[RawCopy, Zeros, Computed]


@dataclass(frozen=True)
class OutputTensor:
    slot: TensorSlot
    producer: Producer

    @property
    def name(self) -> str:
        return self.slot.name


def plan_shards(slots: Sequence[TensorSlot], max_shard_size: int) -> list[list[TensorSlot]]:
    """In order, into as few shards as greedy filling to ``max_shard_size`` gives, of sizes
    as equal as the tensors allow (a tensor larger than the limit gets a shard of its own):
    equal shards hash in parallel on as many cores as there are shards, where greedy
    filling leaves a small last shard and one long hash."""
    greedy: list[list[TensorSlot]] = [[]]
    size = 0
    for slot in slots:
        if greedy[-1] and size + slot.nbytes > max_shard_size:
            greedy.append([])
            size = 0
        greedy[-1].append(slot)
        size += slot.nbytes
    n = len(greedy)
    if n > 1:
        target = sum(s.nbytes for s in slots) / n
        balanced: list[list[TensorSlot]] = [[] for _ in range(n)]
        start = 0
        for slot in slots:  # each tensor goes to the shard its middle byte falls in
            balanced[min(n - 1, int((start + slot.nbytes / 2) // target))].append(slot)
            start += slot.nbytes
        balanced = [b for b in balanced if b]
        if len(balanced) == n and all(len(b) == 1 or sum(s.nbytes for s in b) <= max_shard_size for b in balanced):
            greedy = balanced
    return [alignment_order(s) for s in greedy if s] or [[]]


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
