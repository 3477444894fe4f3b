"""Benchmark: the CALM composed model vs its anchor alone (SmolLM2-135M as both models).

    .venv/bin/python bench/calm.py [--every 6] [--repeat 3]

Composition: `lmexpand surgery calm smollm2-135m smollm2-135m OUT --every 6` (bridges at
anchor layers 5, 11, 17, 23, 29, reading the augmenting layers at the same depth).
Each variant runs in its own process under GNU time (peak RSS):
  forward   no-grad forward of a 2 x 512 batch, median of 5 after a warm-up;
  train     `lmexpand train` steps at seq 512, batch 2 (median step after 2 warm-up steps):
            composed (bridges only) vs the anchor alone with its last 25 layers' attention
            output projections trainable (backward through the same depth as the bridges
            need, a comparable minimal set) and vs full fine-tuning of the anchor.
The bridge overhead is the composed/anchor ratio. Interleaved, best of --repeat, fp32 CPU.
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
from bench.train import DATA, TEMPLATE, step_times_from_metrics  # noqa: E402

PY = sys.executable

FORWARD = """
import json, statistics, sys, time, torch
sys.path.insert(0, {root!r})
from lmexpand.compose.loading import load_model, register_if_composed
from lmexpand.checkpoint.sources import resolve_source
path = resolve_source({model!r})
register_if_composed(path)
m = load_model(path, dtype=torch.float32).eval()
ids = torch.randint(3, 49152, (2, 512), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    m(input_ids=ids)
    times = []
    for _ in range(5):
        t = time.perf_counter(); m(input_ids=ids); times.append(time.perf_counter() - t)
open({result!r}, "w").write(json.dumps({{"forward_s": statistics.median(times)}}))
"""


def composed(every: int) -> Path:
    out = CACHE / f"calm-smollm2-every{every}"
    if not (out / "lmexpand.json").is_file():
        measure([PY, "-m", "lmexpand", "-q", "surgery", "calm", "smollm2-135m", "smollm2-135m", str(out),
                 "--every", str(every), "--force"])
    return out


def forward(model: str) -> tuple[float, float]:
    result = CACHE / "calm-forward.json"
    _, rss = measure([PY, "-c", FORWARD.format(root=str(ROOT), model=model, result=str(result))])
    return json.loads(result.read_text())["forward_s"], rss


def train_step(model: str, *extra: str) -> tuple[float, float]:
    run = CACHE / "calm-train-run"
    _, rss = measure([PY, "-m", "lmexpand", "-q", "train", "--model", model, "--data", str(DATA), "--template",
                      TEMPLATE, "--out", str(run), "--seq-len", "512", "--batch-size", "2", "--max-steps", "6",
                      "--warmup-steps", "1", "--lr", "1e-4", "--val-every", "0", "--val-fraction", "0",
                      "--no-tensorboard", "--force", *extra])
    return statistics.median(step_times_from_metrics(run)[2:]), rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    calm = str(composed(args.every))
    depth = ",".join(f"model.layers.{i}.self_attn.o_proj.weight" for i in range(5, 30))
    variants = {
        "forward: anchor alone": lambda: forward("smollm2-135m"),
        "forward: composed": lambda: forward(calm),
        "train: composed, bridges only": lambda: train_step(calm),
        "train: anchor, o_proj of layers 5-29": lambda: train_step("smollm2-135m", "--trainable", depth),
        "train: anchor, full fine-tuning": lambda: train_step("smollm2-135m", "--trainable", "all"),
    }
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(args.repeat):
        for name, fn in variants.items():
            res[name].append(fn())
    best = {k: (min(t for t, _ in v), min(m for _, m in v)) for k, v in res.items()}
    print(f"\n== CALM: SmolLM2-135M + SmolLM2-135M, bridges every {args.every} layers; 2 x 512 tokens, "
          f"fp32 CPU, best of {args.repeat} ==")
    for name, (t, m) in best.items():
        print(f"  {name:40s} {t:6.3f} s  peak RSS {m:6.0f} MiB")
    fa, fc = best["forward: anchor alone"], best["forward: composed"]
    ta = best["train: anchor, o_proj of layers 5-29"]
    tc = best["train: composed, bridges only"]
    print(f"  bridge overhead: forward x{fc[0] / fa[0]:.2f} time, x{fc[1] / fa[1]:.2f} memory; "
          f"train step x{tc[0] / ta[0]:.2f} time, x{tc[1] / ta[1]:.2f} memory vs the anchor with a comparable "
          f"trainable set")


if __name__ == "__main__":
    main()
