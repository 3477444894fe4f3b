"""Benchmark: a two-member logit sum (SmolLM2-135M + SmolLM2-135M) against its members.

    .venv/bin/python bench/compose.py [--tokens 64] [--repeat 3]

Composition: `lmexpand surgery logit-sum smollm2-135m smollm2-135m OUT`. Each variant runs
in its own process under GNU time (peak RSS), fp32 CPU:
  generate  greedy, a 1 x 32-token prompt + --tokens new tokens (EOS ignored), with KV caches:
            the composition (one cache per member, each member once per step) vs one member
            alone; the baseline is the members one after the other = 2 x one member. The
            overhead is composition / (2 x member) - 1 (target: <= 10 %); per-step time =
            (generate time - prefill time) / (tokens - 1).
  train     `lmexpand train` steps at seq 256, batch 2 (median step after 2 warm-up steps):
            the logit sum's heads only vs full fine-tuning of one member.
Generation: both models in one process, interleaved, median of --repeat (separate
processes varied by +-15 % on this machine); peak RSS of each in its own process. Training:
best of --repeat.
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

GENERATE = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from lmexpand.compose.loading import load_model, register_if_composed
from lmexpand.checkpoint.sources import resolve_source
models = {{}}
for name in {models!r}:
    path = resolve_source(name)
    register_if_composed(path)
    models[name] = load_model(path, dtype=torch.float32).eval()
ids = torch.randint(3, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
def run(m, n):
    t = time.perf_counter()
    with torch.no_grad():
        m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                   eos_token_id=None, pad_token_id=0, temperature=None, top_p=None, top_k=None)
    return time.perf_counter() - t
res = {{name: {{"total_s": [], "prefill_s": [], "step_s": []}} for name in models}}
for name, m in models.items():
    run(m, 4)  # warm-up
for _ in range({repeat}):  # interleaved: the same machine state for every model
    for name, m in models.items():
        prefill, total = run(m, 1), run(m, {tokens})
        res[name]["prefill_s"].append(prefill)
        res[name]["total_s"].append(total)
        res[name]["step_s"].append((total - prefill) / ({tokens} - 1))
open({result!r}, "w").write(json.dumps(res))
"""


def composition() -> Path:
    out = CACHE / "logit-sum-smollm2x2"
    if not (out / "lmexpand.json").is_file():
        measure([PY, "-m", "lmexpand", "-q", "surgery", "logit-sum", "smollm2-135m", "smollm2-135m", str(out),
                 "--force"])
    return out


def generate(models: list[str], tokens: int, repeat: int) -> tuple[dict, float]:
    """Per-model lists of generate times (one process, interleaved) and that process's peak RSS."""
    result = CACHE / "compose-generate.json"
    _, rss = measure([PY, "-c", GENERATE.format(root=str(ROOT), models=models, result=str(result), tokens=tokens,
                                                repeat=repeat)])
    return json.loads(result.read_text()), rss


def train_step(model: str, *extra: str, run: Path = CACHE / "compose-train-run") -> tuple[float, float]:
    """Median step time (after 2 warm-up steps) and peak RSS of 6 `lmexpand train` steps at
    seq 256, batch 2 (also used by bench/co_llm.py)."""
    _, rss = measure([PY, "-m", "lmexpand", "-q", "train", "--model", model, "--data", str(DATA), "--template",
                      TEMPLATE, "--out", str(run), "--seq-len", "256", "--batch-size", "2", "--max-steps", "6",
                      "--warmup-steps", "1", "--lr", "1e-4", "--val-every", "0", "--val-fraction", "0",
                      "--no-tensorboard", "--force", *extra])
    return statistics.median(step_times_from_metrics(run)[2:]), rss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    comp = str(composition())
    timing, _ = generate(["smollm2-135m", comp], args.tokens, args.repeat)  # times: both in one process
    _, m_rss = generate(["smollm2-135m"], args.tokens, 1)  # peak memory: each alone
    _, c_rss = generate([comp], args.tokens, 1)
    train: dict[str, list[tuple[float, float]]] = {"heads only (logit sum)": [], "full fine-tuning (one member)": []}
    for _ in range(args.repeat if not args.skip_train else 0):
        train["heads only (logit sum)"].append(train_step(comp))
        train["full fine-tuning (one member)"].append(train_step("smollm2-135m", "--trainable", "all"))
    m = {k: statistics.median(v) for k, v in timing["smollm2-135m"].items()}
    c = {k: statistics.median(v) for k, v in timing[comp].items()}
    print(f"\n== logit sum: SmolLM2-135M + SmolLM2-135M; greedy, 32-token prompt + {args.tokens} new tokens, "
          f"KV caches, fp32 CPU, median of {args.repeat} interleaved runs ==")
    print(f"  one member           {m['total_s']:6.2f} s  {args.tokens / m['total_s']:6.1f} tok/s  step "
          f"{m['step_s'] * 1e3:6.1f} ms  peak RSS {m_rss:6.0f} MiB")
    print(f"  composition          {c['total_s']:6.2f} s  {args.tokens / c['total_s']:6.1f} tok/s  step "
          f"{c['step_s'] * 1e3:6.1f} ms  peak RSS {c_rss:6.0f} MiB")
    print(f"  members one after the other (2 x member): {2 * m['total_s']:6.2f} s, step {2 * m['step_s'] * 1e3:6.1f} ms")
    ratios = sorted(cs / (2 * ms) for cs, ms in zip(timing[comp]["step_s"], timing["smollm2-135m"]["step_s"]))
    print(f"  composition overhead: x{c['total_s'] / (2 * m['total_s']):.3f} total, "
          f"x{c['step_s'] / (2 * m['step_s']):.3f} per step (target <= x1.10; per-run ratios "
          f"{', '.join(f'{r:.3f}' for r in ratios)}); memory x{c_rss / m_rss:.2f} of one member")
    if not args.skip_train:
        tb = {k: (min(t for t, _ in v), min(r for _, r in v)) for k, v in train.items()}
        for name, (t, r) in tb.items():
            print(f"  train step, {name:32s} {t:6.2f} s  peak RSS {r:6.0f} MiB")
        h, f = tb["heads only (logit sum)"], tb["full fine-tuning (one member)"]
        print(f"  heads-only logit sum vs full fine-tuning of one member: x{h[0] / f[0]:.2f} time, x{h[1] / f[1]:.2f} "
              "memory")


if __name__ == "__main__":
    main()
