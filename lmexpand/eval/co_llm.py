"""Threshold choice for Co-LLM models (Shen et al. 2024 §3.3, official code): thresholds at
the quantiles of the gate that give deferral rates 0 %, 10 %, ..., 90 % on a set, and for
each the perplexity of the hard-switch model (the assistant's distribution where
``g > η``, the base's elsewhere) beside the marginal's; the best is the lowest hard-switch
perplexity on the first set. Deferrals are broken down by token class at the model's own
threshold and at the best one.
"""

from __future__ import annotations

import math
import re
from typing import Any

RATES = [i / 10 for i in range(10)]
_OPERATOR = re.compile(r"^[\s]*[-+*/=<>%^×÷()]+[\s]*$")


def token_class(piece: str) -> str:
    if any(c.isdigit() for c in piece):
        return "digits"
    if _OPERATOR.match(piece):
        return "operators"
    if any(c.isalpha() for c in piece):
        return "words"
    return "space/punctuation"


def gate_and_target_log_probs(model: Any, ids: list[int], seq_len: int, batch_size: int = 4):
    """Per target token (disjoint windows of seq_len): the gate's logit s (g = σ(s); ranked in
    logits, since a trained gate saturates σ to exactly 1.0 in float32 and every quantile of g
    would tie), log p_base(y), log p_assistant(y), and y."""
    import torch

    gates, lp_b, lp_a, ys = [], [], [], []
    windows = [ids[s:s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            group = windows[i:i + batch_size]
            width = max(len(w) for w in group) - 1
            inp = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros_like(inp)
            for r, w in enumerate(group):
                inp[r, :len(w) - 1] = torch.tensor(w[:-1])
                mask[r, :len(w) - 1] = 1
            z_b, s = model._base(inp, mask, None, None)
            z_a = model._assistant(inp, mask, None, None)
            for r, w in enumerate(group):
                n = len(w) - 1
                y = torch.tensor(w[1:])
                gates.append(s[r, :n].double())
                lp_b.append(torch.log_softmax(z_b[r, :n].float(), -1).gather(-1, y[:, None]).squeeze(-1))
                lp_a.append(torch.log_softmax(z_a[r, :n].float(), -1).gather(-1, y[:, None]).squeeze(-1))
                ys.append(y)
    return torch.cat(gates), torch.cat(lp_b), torch.cat(lp_a), torch.cat(ys)


def deferral_table(model: Any, tokenizer: Any, ids: list[int], seq_len: int,
                   at_logit: float | None = None) -> dict[str, Any]:
    """The table for one set; ``at_chosen``: the hard switch at the gate logit ``at_logit``
    (the best of the first set, for the others), or at this set's own best. A token defers
    where s > the threshold's logit, as the model's own hard switch decides."""
    import torch

    s, lp_b, lp_a, y = gate_and_target_log_probs(model, ids, seq_len)

    def prob(lo: float) -> float:  # the probability threshold a gate logit means (±inf: 1 and 0)
        return torch.sigmoid(torch.tensor(lo, dtype=torch.float64)).item()

    lp_b, lp_a = lp_b.double(), lp_a.double()
    marginal = -torch.logaddexp(torch.nn.functional.logsigmoid(-s) + lp_b, torch.nn.functional.logsigmoid(s) + lp_a)
    rows = []
    for rate in RATES:
        lo = math.inf if rate == 0 else float(torch.quantile(s, 1 - rate))
        defer = s > lo
        nll = torch.where(defer, -lp_a, -lp_b)
        rows.append({"target_rate": rate, "threshold": prob(lo),
                     "threshold_logit": lo if math.isfinite(lo) else None,
                     "deferral_rate": defer.float().mean().item(), "switch_ppl": math.exp(nll.mean().item())})
    own = model.threshold_logit()  # the model's own hard-switch rule
    classes = [token_class(tokenizer.decode([t])) for t in y.tolist()]

    def by_class(eta: float) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        defer = (s > eta).tolist()
        for c in sorted(set(classes)):
            idx = [i for i, k in enumerate(classes) if k == c]
            out[c] = {"tokens": len(idx), "deferral_rate": sum(defer[i] for i in idx) / len(idx)}
        return out

    best = min(rows, key=lambda r: r["switch_ppl"])
    best_logit = math.inf if best["threshold_logit"] is None else best["threshold_logit"]
    chosen = best_logit if at_logit is None else at_logit
    chosen_defer = s > chosen
    own_defer = s > own
    return {
        "tokens": int(len(y)),
        "marginal_ppl": math.exp(marginal.mean().item()),
        "base_ppl": math.exp(-lp_b.mean().item()),
        "assistant_ppl": math.exp(-lp_a.mean().item()),
        "model_threshold": float(model.config.threshold),
        "model_threshold_deferral_rate": own_defer.float().mean().item(),
        "model_threshold_switch_ppl": math.exp(torch.where(own_defer, -lp_a, -lp_b).mean().item()),
        "thresholds": rows,
        "best": best,
        "at_chosen": {"threshold": prob(chosen),
                      "threshold_logit": chosen if math.isfinite(chosen) else None, "deferral_rate": chosen_defer.float().mean().item(),
                      "switch_ppl": math.exp(torch.where(chosen_defer, -lp_a, -lp_b).mean().item()),
                      "by_class": by_class(chosen)},
        "by_class": {"model_threshold": by_class(own), "best": by_class(best_logit)},
    }


def render(co: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["", "## Co-LLM: deferral and thresholds", "",
             "Per set: the marginal's perplexity, the hard switch (the assistant's distribution where the gate "
             "g > η) at the model's threshold, and at thresholds at the gate's quantiles (target deferral rates "
             "0 %, 10 %, ..., 90 %). Disjoint windows; the best threshold is the lowest hard-switch perplexity on "
             "the first set (use it with `lmexpand generate --threshold`).", ""]
    for name, t in co.items():
        lines += [f"### {name} ({t['tokens']:,} tokens)", "",
                  f"base alone {t['base_ppl']:.4f}, assistant alone {t['assistant_ppl']:.4f}, marginal "
                  f"{t['marginal_ppl']:.4f}; at the model's threshold {t['model_threshold']:g}: "
                  f"{100 * t['model_threshold_deferral_rate']:.1f} % deferred, hard switch "
                  f"{t['model_threshold_switch_ppl']:.4f}.", "",
                  "| target rate | threshold | gate logit | deferred | hard-switch ppl |", "|---|---|---|---|---|"]
        for r in t["thresholds"]:
            lo = "∞" if r.get("threshold_logit") is None else f"{r['threshold_logit']:.3f}"
            lines.append(f"| {100 * r['target_rate']:.0f} % | {r['threshold']:.10g} | {lo} | "
                         f"{100 * r['deferral_rate']:.1f} % | {r['switch_ppl']:.4f} |")
        c = t["at_chosen"]
        lines += ["", f"At the chosen threshold {c['threshold']:.10g} (the first set's best): "
                  f"{100 * c['deferral_rate']:.1f} % deferred, hard switch {c['switch_ppl']:.4f}."]
        lines += ["", "Deferral by token class (model's threshold / best threshold): " + ", ".join(
            f"{c} {100 * v['deferral_rate']:.1f} % / {100 * t['by_class']['best'][c]['deferral_rate']:.1f} % "
            f"({v['tokens']:,} tokens)" for c, v in t["by_class"]["model_threshold"].items()), ""]
    return lines


def plot(co: dict[str, dict[str, Any]], png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, t in co.items():
        xs = [100 * r["deferral_rate"] for r in t["thresholds"]]
        ax.plot(xs, [r["switch_ppl"] for r in t["thresholds"]], marker="o", label=f"{name}: hard switch")
        ax.axhline(t["marginal_ppl"], linestyle=":", color=ax.lines[-1].get_color(), label=f"{name}: marginal")
    ax.set_xlabel("tokens deferred to the assistant (%)")
    ax.set_ylabel("perplexity")
    ax.set_title("Co-LLM: perplexity vs deferral rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
