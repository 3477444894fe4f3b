"""Weighted mixtures of training sources, drawn deterministically.

Block ``k`` of a run comes from source ``choice(k)``: a seeded draw with the sources'
weights as probabilities, made in chunks of ``CHUNK`` blocks from a generator keyed on
(seed, chunk). So which source feeds block ``k``, and how many blocks each source fed
before it, are pure functions of (weights, seed, k): a resumed run draws exactly what the
uninterrupted one drew, and each source's own blocks continue from where they stopped.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

CHUNK = 4096
_TAG = 0x6D6978  # "mix": keeps these draws apart from the per-epoch block permutations


class Mixture:
    def __init__(self, weights: Sequence[float], seed: int):
        total = float(sum(weights))
        if not weights or not all(math.isfinite(w) and w > 0 for w in weights) or not math.isfinite(total):
            raise ValueError(f"mixture weights must be positive and finite, got {list(weights)}")
        self.p = np.array([w / total for w in weights], dtype=np.float64)
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.p)

    def _chunk(self, c: int) -> np.ndarray:
        got = self._cache.get(c)
        if got is None:
            got = np.random.default_rng([self.seed, _TAG, c]).choice(len(self.p), size=CHUNK, p=self.p)
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[c] = got
        return got

    def choices(self, start: int, count: int) -> np.ndarray:
        """Source index of blocks ``start .. start + count - 1``."""
        out = []
        k, end = start, start + count
        while k < end:
            c, i = divmod(k, CHUNK)
            take = min(CHUNK - i, end - k)
            out.append(self._chunk(c)[i:i + take])
            k += take
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def counts_before(self, k: int) -> np.ndarray:
        """Blocks each source fed before block ``k``."""
        full, rest = divmod(k, CHUNK)
        counts = np.zeros(len(self.p), dtype=np.int64)
        for c in range(full):
            counts += np.bincount(self._chunk(c), minlength=len(self.p))
        if rest:
            counts += np.bincount(self._chunk(full)[:rest], minlength=len(self.p))
        return counts
