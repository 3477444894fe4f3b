"""Sparsification of task vectors (mergekit's ``sparsify.py``): which entries of each
``x_i − base`` survive, and the rescaling that keeps their L1 norm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch


def rescaled(tensor: "torch.Tensor", mask: "torch.Tensor", rescale: bool) -> "torch.Tensor":
    """``tensor·mask``, times ``|tensor|₁/|masked|₁`` when rescaling (unless either < 1e-7)."""
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def magnitude(t: "torch.Tensor", density: float, rescale: bool, match_mergekit: bool = False) -> "torch.Tensor":
    """TIES trim: keep the top ``k = max(1, int(density·n))`` magnitudes.

    Which of several *equal* magnitudes at the threshold survive is not defined by mergekit: it
    takes the first ``k`` of a non-stable ``argsort`` (O(n log n)), and torch's CPU sort does
    not order ties by index. By default lmexpand selects in O(n): the threshold is the k-th
    largest magnitude (``kthvalue``), everything above it is kept, and of the elements equal
    to it the ones with the lowest flat index are kept until there are exactly ``k``. The
    kept set is therefore mergekit's wherever mergekit's is defined; ``match_mergekit`` takes
    mergekit's argsort instead, for its exact bytes."""
    import torch

    if density >= 1:
        return t
    if density <= 0 or t.numel() == 0:
        return torch.zeros_like(t)
    n = t.numel()
    k = max(1, int(density * n))
    w = t.abs().reshape(-1)
    if match_mergekit:
        if w.device.type == "cpu":  # mergekit sorts in fp32 on CPU only
            w = w.float()
        mask = torch.zeros(n, dtype=t.dtype, device=t.device)
        mask[torch.argsort(w, descending=True)[:k]] = 1
        return rescaled(t, mask.reshape_as(t), rescale)
    return rescaled(t, top_k_mask(w, k).reshape_as(t), rescale)  # t·bool: the same ±0 as t·1.0/0.0


def top_k_mask(w: "torch.Tensor", k: int) -> "torch.Tensor":
    """Boolean mask of the ``k`` largest entries of the flat non-negative ``w`` (1 <= k <= n),
    in O(n): every entry above the k-th largest value, then entries equal to it by lowest index."""
    import torch

    n = w.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=w.device)
    threshold, above, equal = kth_largest(w, k)
    if above + equal == k:  # no tie to break (the common case in fp32): one pass
        return w >= threshold
    mask = w > threshold
    mask[torch.nonzero(w == threshold).reshape(-1)[:k - above]] = True  # ties: the lowest indices
    return mask


def kth_largest(w: "torch.Tensor", k: int) -> tuple["torch.Tensor", int, int]:
    """The k-th largest value of the flat non-negative float tensor ``w`` (exactly), how many
    entries are larger and how many equal: :func:`kth_largest_of_chunks` over one chunk."""
    return kth_largest_of_chunks(lambda: iter((w,)), w.dtype, w.device, k)


def kth_largest_of_chunks(chunks: Callable[[], Iterator["torch.Tensor"]], dtype: "torch.dtype", device: Any,
                          k: int) -> tuple["torch.Tensor", int, int]:
    """Radix selection over the non-negative floats that ``chunks()`` yields (a fresh iterator
    per pass): non-negative IEEE floats order as their bit patterns do, so a histogram of the
    16-bit patterns (bf16/fp16; one pass), or of the high then the low halves (fp32; two
    passes), finds the k-th largest exactly, 4-5x faster than ``kthvalue``'s quickselect on
    CPU; fp64 uses ``kthvalue`` on the concatenated values. Returns (value, how many are larger,
    how many equal)."""
    import torch

    def pick(counts: "torch.Tensor", k: int) -> tuple[int, int, int]:
        """(bin holding the k-th largest, how many lie above that bin, how many in it)."""
        above = counts.flip(0).cumsum(0)
        i = int(torch.searchsorted(above, k))
        b = counts.numel() - 1 - i
        return b, int(above[i - 1]) if i else 0, int(counts[b])

    if dtype in (torch.bfloat16, torch.float16):
        counts = sum(torch.bincount(c.reshape(-1).view(torch.int16).to(torch.int32), minlength=1 << 15)
                     for c in chunks())
        b, above, equal = pick(counts, k)
        return torch.tensor(b, dtype=torch.int16, device=device).view(dtype), above, equal
    if dtype == torch.float32:
        counts = sum(torch.bincount(c.reshape(-1).view(torch.int32) >> 16, minlength=1 << 15) for c in chunks())
        b_high, above_high, _ = pick(counts, k)
        low = []
        for c in chunks():
            bits = c.reshape(-1).view(torch.int32)
            low.append(torch.bincount(bits[(bits >> 16) == b_high] & 0xFFFF, minlength=1 << 16))
        b_low, above, equal = pick(sum(low), k - above_high)
        value = torch.tensor((b_high << 16) | b_low, dtype=torch.int32, device=device).view(torch.float32)
        return value, above_high + above, equal
    w = torch.cat([c.reshape(-1) for c in chunks()])
    value = torch.kthvalue(w, w.numel() - k + 1).values
    return value, int(torch.count_nonzero(w > value)), int(torch.count_nonzero(w == value))


def outliers(t: "torch.Tensor", density: float, rescale: bool, gamma: float) -> "torch.Tensor":
    """Breadcrumbs: drop the largest ``int(gamma·n)`` and the smallest, keep ``int(density·n)``."""
    import torch

    if density >= 1:
        return t
    n = t.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    w = t.abs().reshape(-1)
    if w.device.type == "cpu":  # mergekit sorts in fp32 on CPU only
        w = w.float()
    idx = torch.sort(w, descending=False).indices
    mask = torch.zeros(n, dtype=t.dtype, device=t.device)
    mask[idx[n_bot:n_bot + target]] = 1
    return rescaled(t, mask.reshape_as(t), rescale)


def random_work_dtype(t: "torch.Tensor") -> "torch.dtype":
    """mergekit's dtype for keep probabilities: the input's on an accelerator or for bf16; on
    CPU fp32 otherwise (CPU has no fp16 bernoulli)."""
    import torch

    return t.dtype if t.device.type != "cpu" or t.dtype == torch.bfloat16 else torch.float32


def della_probs(t: "torch.Tensor", density: float, epsilon: float) -> "torch.Tensor":
    """DELLA MagPrune: keep probability from density−ε to density+ε by magnitude rank per row."""
    import torch

    work = random_work_dtype(t)
    if t.dim() < 2:
        t = t.unsqueeze(0)
    ranks = torch.argsort(t.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon
