"""Benchmark: training the new blocks of SmolLM2-135M + 8 LLaMA-Pro blocks, seq 512.

    .venv/bin/python bench/train.py [--repeat 3] [--steps 8] [--batch 2]

Variants, each its own process (GNU time gives its peak RSS; step time is the median of
the steps after the first two, from the run's own per-step timestamps):
  ours          lmexpand train, new blocks only (fused chunked lm_head + cross-entropy)
  ours-8bit     same + bitsandbytes 8-bit AdamW
  ours-4bit     same + frozen base in 4-bit NF4 (new blocks full precision)
  ours-ckpt     same + activation checkpointing
  full-ft       lmexpand train --trainable all: full fine-tuning of the same expanded model (b)
  hf-trainer    transformers Trainer with requires_grad=False on the frozen weights (c),
                bench/peers/hf_trainer_freeze.py
Runs are interleaved (one of each, then again), best of --repeat. Targets: ours <= 0.55x
full-ft step time and <= 0.5x its peak memory; vs hf-trainer >= 10 % faster and >= 20 %
less peak memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import CACHE, measure, training_macs  # noqa: E402

PY = sys.executable
DATA = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
TEMPLATE = "Question: {question}\nAnswer: {answer}"


def expanded_model() -> Path:
    out = CACHE / "smollm2-pro8"
    if not (out / "lmexpand.json").is_file():
        measure([PY, "-m", "lmexpand", "-q", "surgery", "llama-pro", "smollm2-135m", str(out), "--add", "8", "--force"])
    return out


def ours(model: Path, run: Path, steps: int, batch: int, *extra: str) -> list[str]:
    return [PY, "-m", "lmexpand", "-q", "train", "--model", str(model), "--data", str(DATA), "--template", TEMPLATE,
            "--out", str(run), "--seq-len", "512", "--batch-size", str(batch), "--max-steps", str(steps),
            "--warmup-steps", "1", "--lr", "1e-4", "--val-every", "0", "--val-fraction", "0", "--no-tensorboard",
            "--force", *extra]


def step_times_from_metrics(run: Path) -> list[float]:
    rec = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    t = [r["elapsed_s"] for r in rec]
    return [b - a for a, b in zip(t, t[1:])]


def flop_floor(model: Path, seq_len: int = 512) -> tuple[float, float, float]:
    """Multiply-accumulates per token of one training step (bench/_common.training_macs):
    (full fine-tuning, new blocks only, ratio)."""
    full, ours = training_macs(model, seq_len, "all"), training_macs(model, seq_len, "new")
    return full, ours, ours / full


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    args = ap.parse_args()
    model = expanded_model()
    full, mine, ratio = flop_floor(model)
    print(f"FLOPs per token (multiply-accumulates): full fine-tuning {full / 1e6:.1f} M, new blocks only "
          f"{mine / 1e6:.1f} M: compute floor of the step-time ratio {ratio:.2f}x (before optimizer time)")
    work = CACHE / "train-runs"
    variants = {
        "ours": ours(model, work / "ours", args.steps, args.batch),
        "ours-8bit": ours(model, work / "ours-8bit", args.steps, args.batch, "--optimizer", "adamw8bit"),
        "ours-4bit": ours(model, work / "ours-4bit", args.steps, args.batch, "--load-in-4bit"),
        "ours-ckpt": ours(model, work / "ours-ckpt", args.steps, args.batch, "--gradient-checkpointing"),
        "full-ft": ours(model, work / "full-ft", args.steps, args.batch, "--trainable", "all"),
        "hf-trainer": [PY, str(ROOT / "bench" / "peers" / "hf_trainer_freeze.py"), str(model), str(DATA),
                       str(work / "hf-trainer"), str(args.steps), str(args.batch)],
    }
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(args.repeat):
        for name, cmd in variants.items():
            run = work / name
            _, rss = measure(cmd)
            times = step_times_from_metrics(run)[1:]  # drop warm-up steps
            results[name].append((statistics.median(times), rss))
            print(f"  {name}: step {results[name][-1][0]:.2f} s, peak RSS {rss:.0f} MiB", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    tokens = args.batch * 512
    best = {k: (min(t for t, _ in v), min(m for _, m in v)) for k, v in results.items()}
    print(f"\n== SmolLM2-135M + 8 LLaMA-Pro blocks, batch {args.batch} x 512 tokens, fp32 CPU, best of {args.repeat} ==")
    for k, (t, m) in best.items():
        print(f"  {k:11s} step {t:6.2f} s  {tokens / t:7.0f} tok/s  peak RSS {m:6.0f} MiB")
    if "ours" in best and "full-ft" in best:
        print(f"  ours vs full-ft: step time {best['ours'][0] / best['full-ft'][0]:.2f}x (target <= 0.55), "
              f"peak memory {best['ours'][1] / best['full-ft'][1]:.2f}x (target <= 0.5)")
    if "ours" in best and "hf-trainer" in best:
        print(f"  ours vs hf-trainer: {100 * (1 - best['ours'][0] / best['hf-trainer'][0]):.0f} % faster (target >= 10), "
              f"{100 * (1 - best['ours'][1] / best['hf-trainer'][1]):.0f} % less peak memory (target >= 20)")
    for k in ("ours-8bit", "ours-4bit", "ours-ckpt"):
        if k in best and "ours" in best:
            print(f"  {k} vs ours: step time {best[k][0] / best['ours'][0]:.2f}x, peak memory {best[k][1] - best['ours'][1]:+.0f} MiB")


if __name__ == "__main__":
    main()
