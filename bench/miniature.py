"""LLaMA-Pro's central claim in miniature, on SmolLM2-135M (docs/results.md).

    .venv/bin/python bench/miniature.py [--steps 80] [--out bench/.cache/miniature]

Domain = GSM8K (train split to train, test split to evaluate), general = OpenStax
humanities valid + novels valid (../shared/data). Same token budget for every trained row
(steps x 4 x 256 tokens), fp32 on CPU:
  base                      the embedded SmolLM2-135M-Instruct
  llama-pro                 +6 blocks (one after every 5th), new blocks only, lr 3e-4
  full-ft                   full fine-tuning of the base, lr 3e-5
  lora                      LoRA r=64 on every linear of the base (~19.5 M params, about
                            LLaMA-Pro's 21.2 M), lr 2e-4
Perplexity on the first 16,384 tokens of each set (windows of 256). Prints a Markdown
table and writes miniature.json and miniature.png into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PY = sys.executable
TEMPLATE = "Question: {question}\nAnswer: {answer}"
SETS = {
    "math": SHARED / "gsm8k" / "test.jsonl",
    "general-openstax": SHARED / "general-english" / "openstax-humanities" / "valid.txt",
    "general-novels": SHARED / "general-english" / "novels-1902-1927" / "valid.txt",
}


def lmx(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([PY, "-m", "lmexpand", "-q", *args], check=True)
    return time.perf_counter() - t


def evaluate(model: str, out: Path) -> dict:
    data = [a for name, path in SETS.items() for a in ("--data", f"{name}={path}")]
    lmx("eval", model, *data, "--template", TEMPLATE, "--out", str(out), "--max-tokens", "16384",
        "--seq-len", "256", "--no-samples")
    return json.loads((out / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "miniature")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data", str(SHARED / "gsm8k" / "train.jsonl"), "--template", TEMPLATE, "--seq-len", "256",
              "--batch-size", "4", "--max-steps", str(args.steps), "--warmup-steps", "10", "--val-every", "0",
              "--no-tensorboard", "--force"]
    pro = out / "pro"
    if not (pro / "lmexpand.json").is_file():
        lmx("surgery", "llama-pro", "smollm2-135m", str(pro), "--add", "6", "--force")
    rows: dict[str, dict] = {}
    runs = {
        "llama-pro": (str(pro), ["--lr", "3e-4"]),
        "full-ft": ("smollm2-135m", ["--trainable", "all", "--lr", "3e-5"]),
        "lora": ("smollm2-135m", ["--trainable", "none", "--lora", "--lora-r", "64", "--lora-targets",
                                  "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--lr", "2e-4"]),
    }
    base = evaluate("smollm2-135m", out / "eval-base")
    rows["base"] = {"ppl": {k: v["ppl"] for k, v in base["perplexity"]["model"].items()}, "trainable": 0, "seconds": 0.0}
    for name, (model, extra) in runs.items():
        run = out / f"run-{name}"
        seconds = lmx("train", "--model", model, "--out", str(run), *common, *extra)
        res = evaluate(str(run), out / f"eval-{name}")
        lineage = json.loads((run / "model" / "lmexpand.json").read_text())["training"][-1]
        rows[name] = {"ppl": {k: v["ppl"] for k, v in res["perplexity"]["model"].items()},
                      "trainable": lineage["trainable_parameters"], "seconds": seconds}
        print(name, rows[name], flush=True)
    tokens = args.steps * 4 * 256
    (out / "miniature.json").write_text(json.dumps({"tokens": tokens, "rows": rows}, indent=2))
    names = list(SETS)
    print(f"\nSame budget: {tokens:,} training tokens per trained row.\n")
    print("| row | " + " | ".join(f"{n} ppl" for n in names) + " | trainable params | train wall time |")
    print("|---" * (len(names) + 3) + "|")
    b = rows["base"]["ppl"]
    for name, r in rows.items():
        cells = []
        for n in names:
            delta = "" if name == "base" else f" ({100 * (r['ppl'][n] - b[n]) / b[n]:+.1f} %)"
            cells.append(f"{r['ppl'][n]:.3f}{delta}")
        print(f"| {name} | " + " | ".join(cells) + f" | {r['trainable'] / 1e6:.1f} M | {r['seconds']:.0f} s |")
    plot(rows, out / "miniature.png", tokens)


def plot(rows: dict, png: Path, tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = rows["base"]["ppl"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        gain = 100 * (b["math"] - r["ppl"]["math"]) / b["math"]
        general = [k for k in r["ppl"] if k.startswith("general")]
        kept = sum(100 * (r["ppl"][k] - b[k]) / b[k] for k in general) / len(general)
        ax.scatter(kept, gain, s=80)
        ax.annotate(name, (kept, gain), textcoords="offset points", xytext=(6, 6))
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.axvline(1, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("general perplexity change vs base, % (lower is better; dashed: +1 %)")
    ax.set_ylabel("math perplexity reduction vs base, % (higher is better)")
    ax.set_title(f"SmolLM2-135M, {tokens:,} training tokens per row")
    ax.margins(x=0.15, y=0.1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
