"""Expert load of MoE models: which experts the routers pick on real text.

Forward hooks on the router modules (``*.mlp.gate``) read each router's choice: a tuple
with integer top-k indices (transformers v5 routers, e.g. Mixtral: logits, weights,
indices), or plain logits [tokens, experts] from which the top-k is taken. The load of an
expert is the fraction of (token, slot) choices that went to it; a balanced router gives
1/E each.
"""

from __future__ import annotations

from typing import Any


def router_modules(model: Any) -> list[tuple[str, Any]]:
    from lmexpand.checkpoint.moe_layout import is_router

    return [(n, m) for n, m in model.named_modules() if is_router(n, m)]


def expert_load(model: Any, ids: list[int], *, seq_len: int = 256, max_tokens: int = 2048) -> dict[str, Any] | None:
    import torch

    from lmexpand.checkpoint.moe_layout import router_choice

    routers = router_modules(model)
    if not routers:
        return None
    top_k = int(getattr(model.config, "num_experts_per_tok", 1) or 1)
    counts: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, inputs, output):
            logits, idx = router_choice(output, top_k)
            n_exp = logits.shape[-1]
            c = torch.bincount(idx.reshape(-1).cpu(), minlength=n_exp).double()
            counts[name] = counts.get(name, torch.zeros(n_exp, dtype=torch.float64)) + c
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in routers]
    try:
        with torch.no_grad():
            ids = ids[:max_tokens]
            for start in range(0, len(ids), seq_len):
                chunk = ids[start:start + seq_len]
                if len(chunk) > 1:
                    model(input_ids=torch.tensor([chunk], device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    per_layer = {n: (c / c.sum()).tolist() for n, c in counts.items() if c.sum() > 0}
    if not per_layer:
        return None
    flat = [x for v in per_layer.values() for x in v]
    n_exp = len(next(iter(per_layer.values())))
    return {
        "routers": len(per_layer), "experts": n_exp, "top_k": top_k,
        "load": per_layer,
        "max_load": max(flat), "min_load": min(flat), "balanced_load": 1.0 / n_exp,
    }
