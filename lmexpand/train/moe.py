"""Training upcycled MoE models: router balancing and load stats.

The per-expert checkpoint names <-> fused parameters, which modules are routers and what a
router returns live in :mod:`lmexpand.checkpoint.moe_layout` (``eval/moe.py`` reads the
routers with the same function).

:class:`RouterMonitor` hooks every router and, per training forward pass, gives

* the load-balancing loss ``E * sum_e f_e * P_e`` per router (Switch Transformer eq. 4, as
  in Mixtral): ``f_e`` the fraction of the T*k (token, slot) choices that went to expert e,
  ``P_e`` the mean router probability of e (softmax of the logits; for sigmoid routers the
  scores normalized per token, as DeepSeek-V3's sequence-wise loss). 1.0 when balanced;
* the router z-loss ``mean_t logsumexp(logits_t)^2`` (ST-MoE, arXiv 2202.08906 eq. 5);
* after each optimizer step, DeepSeek-V3's auxiliary-loss-free balancing (arXiv 2412.19437
  sec. 2.1.2) for routers with an ``e_score_correction_bias``: ``b_e += rate * sign(mean
  load - load_e)``, from the load observed in that step;
* per-layer expert load for the metrics.

Both losses are averaged over routers and scaled by their coefficients.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lmexpand.checkpoint.moe_layout import is_router, router_choice


class RouterMonitor:
    def __init__(self, model: nn.Module, *, balance_coef: float, z_coef: float, bias_rate: float,
                 replicas: int | None = None):
        self.routers = [(n, m) for n, m in model.named_modules() if is_router(n, m)]
        self.balance_coef, self.z_coef, self.bias_rate = balance_coef, z_coef, bias_rate
        self.replicas = replicas
        self._calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (router index, logits, top-k indices)
        self.counts = [None] * len(self.routers)  # per router: expert choices this optimizer step
        self._handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.routers)]

    def __bool__(self) -> bool:
        return bool(self.routers)

    def _hook(self, index: int) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not module.training:
                return
            logits, idx = router_choice(output, getattr(module, "top_k", 2))
            self._calls.append((index, logits, idx))
            c = torch.bincount(idx.detach().reshape(-1), minlength=logits.shape[-1]).to(torch.float64)
            self.counts[index] = c if self.counts[index] is None else self.counts[index] + c
        return hook

    def aux_loss(self) -> torch.Tensor:
        """The weighted balance + z losses of the forward passes since the last call."""
        calls, self._calls = self._calls, []
        if not calls or (self.balance_coef == 0 and self.z_coef == 0):
            return torch.zeros(())
        balance = sum(balance_loss(logits, idx, self._sigmoid(i)) for i, logits, idx in calls) / len(calls)
        z = sum(z_loss(logits) for _, logits, _ in calls) / len(calls)
        return self.balance_coef * balance + self.z_coef * z

    def _sigmoid(self, index: int) -> bool:
        return hasattr(self.routers[index][1], "e_score_correction_bias")

    def after_step(self, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, Any]:
        """Update correction biases from this step's load; return load statistics."""
        stats: dict[str, Any] = {}
        ratios, replica_share = [], []
        for i, (name, module) in enumerate(self.routers):
            c = self.counts[i]
            if c is None:
                continue
            c = reduce(c)
            load = c / c.sum().clamp_min(1)
            ratios.append((load.max() / load.mean()).item())
            if self.replicas and self.replicas > 1:
                first = torch.arange(len(load)) % self.replicas == 0
                replica_share.append(load[~first].sum().item())
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None and self.bias_rate > 0:
                with torch.no_grad():
                    bias += self.bias_rate * torch.sign(load.mean() - load).to(bias.dtype).to(bias.device)
        self.counts = [None] * len(self.routers)
        self._calls = []
        if ratios:
            stats["moe_max_mean_load"] = max(ratios)
            stats["moe_layer_mean_max_mean_load"] = sum(ratios) / len(ratios)
            stats["moe_max_mean_load_per_layer"] = [round(r, 4) for r in ratios]
        if replica_share:
            stats["moe_other_replica_share"] = sum(replica_share) / len(replica_share)
        return stats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def balance_loss(logits: torch.Tensor, idx: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    logits = logits.float().reshape(-1, logits.shape[-1])
    n_exp = logits.shape[-1]
    if sigmoid:
        s = logits.sigmoid()
        probs = s / s.sum(-1, keepdim=True)
    else:
        probs = logits.softmax(-1)
    f = torch.bincount(idx.reshape(-1), minlength=n_exp).to(probs.dtype) / idx.numel()
    return n_exp * (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float().reshape(-1, logits.shape[-1]), dim=-1).pow(2).mean()
