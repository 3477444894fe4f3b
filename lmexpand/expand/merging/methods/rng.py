"""The random source the random methods draw from: torch's generator, with its CPU Bernoulli
draws replayed faster, bit for bit.

DARE and DELLA draw one Bernoulli mask per model and tensor: ``torch.bernoulli(p,
generator=g)``, which on the CPU is a serial loop (about 15-30 ns per element here) and, for a
1B-parameter merge of two models, most of mergekit's time. The CPU generator is a standard
MT19937 seeded as ``init_genrand(seed & 0xffffffff)``, and the kernel keeps an element when
``(r & 0xffffff) * 2**-24 < float(p)``, ``r`` being the next 32-bit output
(``aten/src/ATen/core/TransformationHelper.h``, ``DistributionTemplates.h``). numpy's MT19937
gives the same 32-bit outputs in a vectorized loop, and for DARE's constant keep probability
the comparison is one integer comparison against ``ceil(p * 2**24)`` (exact), so the masks
are torch's bit for bit at 7.4 ns of CPU per element against torch's 16.6 (measured here with
``time.process_time``, one thread, 2**24 elements, best of 5), and without the tensor of
probabilities. Per-element probabilities (DELLA) gain nothing (18 ns) and stay with torch.

The replay is used only where it is provably the same: on the CPU, for a source that has drawn
nothing but Bernoulli masks, and after a self-check against torch in this process (a torch
build that draws otherwise falls back to ``torch.bernoulli``). A source whose torch generator
is handed out (``.torch``: arcee_fusion's index sample) stops replaying first, so both views
never diverge.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import numpy
    import torch

_REPLAY_OK: Optional[bool] = None


def _mt19937(seed: int) -> "numpy.random.Generator":
    import numpy as np

    key, pos = np.random.RandomState(seed & 0xFFFFFFFF).get_state()[1:3]  # init_genrand, public API
    bits = np.random.MT19937()
    bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
    return np.random.Generator(bits)


def _replay_constant(gen: "numpy.random.Generator", shape: tuple, p: float, dtype: "torch.dtype") -> "torch.Tensor":
    """``torch.bernoulli(torch.full(shape, p, dtype=dtype), generator)``'s bits from the replayed
    stream: keep where ``(r & 0xffffff) < ceil(float(p) * 2**24)`` (exact: ``r`` is an integer)."""
    import math

    import numpy as np
    import torch

    n = math.prod(shape)
    threshold = math.ceil(float(torch.tensor(p, dtype=dtype)) * 16777216.0)
    raw = gen.integers(0, 2**32, size=n, dtype=np.uint32)  # one 32-bit output per element
    np.bitwise_and(raw, 0xFFFFFF, out=raw)
    keep = np.less(raw, max(0, min(threshold, 2**32 - 1)))
    return torch.from_numpy(keep).reshape(shape).to(dtype)


def replay_matches_torch() -> bool:
    """This torch draws CPU Bernoulli masks as the replay does (checked once per process)."""
    global _REPLAY_OK
    if _REPLAY_OK is None:
        import torch

        try:
            _REPLAY_OK = True
            for dtype, p in ((torch.float32, 0.3), (torch.bfloat16, 0.7), (torch.float32, 1 - 2**-24)):
                g = torch.Generator().manual_seed(2**33 + 12345)
                mine = _mt19937(2**33 + 12345)
                for _ in range(2):  # two draws in a row: the streams stay in step
                    ours = _replay_constant(mine, (4099,), p, dtype)
                    if not torch.equal(torch.bernoulli(torch.full((4099,), p, dtype=dtype), generator=g), ours):
                        _REPLAY_OK = False
        except Exception:  # a numpy without MT19937 state access: torch's own path
            _REPLAY_OK = False
    return _REPLAY_OK


class RandomSource:
    """One seeded stream (``torch.Generator(device).manual_seed(seed)``): Bernoulli masks by
    :meth:`bernoulli`, anything else through :attr:`torch`."""

    def __init__(self, seed: int, device: str = "cpu"):
        import torch

        self._torch = torch.Generator(device=device).manual_seed(seed)
        self._replay = _mt19937(seed) if device == "cpu" and replay_matches_torch() else None
        self._replayed = 0  # 32-bit outputs the replay consumed (one per element)

    def bernoulli(self, p: "torch.Tensor") -> "torch.Tensor":
        """``torch.bernoulli(p, generator=...)`` (per-element probabilities: torch's own loop)."""
        import torch

        return torch.bernoulli(p, generator=self.torch)

    def bernoulli_full(self, like: "torch.Tensor", p: float, dtype: "torch.dtype") -> "torch.Tensor":
        """``torch.bernoulli(torch.full_like(like, p, dtype=dtype), generator=...)``, the same
        bits; on the CPU from the replayed stream, without materializing the probabilities."""
        import torch

        if self._replay is not None and like.device.type == "cpu":
            self._replayed += like.numel()
            return _replay_constant(self._replay, tuple(like.shape), p, dtype)
        return torch.bernoulli(torch.full_like(like, p, dtype=dtype), generator=self.torch)

    @property
    def torch(self) -> "torch.Generator":
        """The torch generator, in step with every draw so far: after replayed draws it first
        draws as many outputs itself (only if a method mixed kinds of draws; none does)."""
        if self._replay is not None:
            import torch

            if self._replayed:
                torch.bernoulli(torch.zeros(self._replayed), generator=self._torch)
            self._replay, self._replayed = None, 0
        return self._torch
