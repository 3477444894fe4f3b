"""Benchmark: deep-fusion experts (SmolLM2-135M, experts in every layer for attn + mlp, spans
between ``` fences) against the source model.

    .venv/bin/python bench/deep_fusion.py [--repeat 5]

One process, interleaved, median of --repeat, fp32 CPU, a 2 x 512 batch of random tokens
with 0 %, 25 % or 100 % of them inside a span (a fence opens the span at the right place):
  forward  no-grad forward;
  train    forward + backward of lmexpand's fused loss with the experts trainable, against
           the source with the same projections trainable (a comparable trainable set).
Peak memory is not separated per variant here (one process). Target: <= 1.15x the source's
step when no span is present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import CACHE, measure  # noqa: E402

PY = sys.executable


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    out = CACHE / "deep-fusion-smollm2"
    if not (out / "lmexpand.json").is_file():
        measure([PY, "-m", "lmexpand", "-q", "surgery", "deep-fusion", "smollm2-135m", str(out), "--open", "```",
                 "--force"])
    import torch

    from lmexpand.checkpoint.sources import resolve_source
    from lmexpand.compose.loading import load_model
    from lmexpand.train.loss import CausalLMLoss

    src = load_model(resolve_source("smollm2-135m"), dtype=torch.float32)
    df = load_model(out, dtype=torch.float32)
    fence = df.config.open_ids[0]
    projections = df.config.projections
    for n, p in src.named_parameters():
        p.requires_grad_(any(f".{proj}." in n for proj in projections))
    for n, p in df.named_parameters():
        p.requires_grad_(n.startswith("experts."))
    g = torch.Generator().manual_seed(0)
    base_ids = torch.randint(100, 49152, (2, 512), generator=g)
    base_ids[torch.isin(base_ids, torch.tensor(df.config.open_ids))] = 100

    def batch(share: float) -> torch.Tensor:
        ids = base_ids.clone()
        if share > 0:
            start = max(0, int(512 * (1 - share)) - 1)
            ids[:, start] = fence  # the span runs from here to the end
        return ids

    def fwd(model, ids):
        model.eval()
        with torch.no_grad():
            t = time.perf_counter(); model(input_ids=ids); return time.perf_counter() - t

    def step(model, ids):
        model.train()
        loss_model = CausalLMLoss(model)
        t = time.perf_counter()
        loss, _ = loss_model(ids)
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return time.perf_counter() - t

    res: dict[str, list[float]] = {}
    variants = [("source", src, 0.0)] + [(f"deep fusion, {int(s * 100)} % span", df, s) for s in (0.0, 0.25, 1.0)]
    for name, m, s in variants:  # warm-up
        fwd(m, batch(s)); step(m, batch(s))
    for _ in range(args.repeat):
        for name, m, s in variants:
            res.setdefault(f"forward: {name}", []).append(fwd(m, batch(s)))
            res.setdefault(f"train step: {name}", []).append(step(m, batch(s)))
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\n== deep fusion: SmolLM2-135M, experts in all 30 layers (attn + mlp), 2 x 512 tokens, fp32 CPU, "
          f"median of {args.repeat} interleaved ==")
    for kind in ("forward", "train step"):
        base = med[f"{kind}: source"]
        for name, _, _ in variants:
            t = med[f"{kind}: {name}"]
            print(f"  {kind:10s} {name:26s} {t:6.3f} s  x{t / base:.3f} of the source")
    (CACHE / "deep-fusion-bench.json").write_text(json.dumps(med, indent=2))


if __name__ == "__main__":
    main()
