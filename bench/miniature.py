"""LLaMA-Pro's central claim in miniature, on SmolLM2-135M (docs/results.md).

    .venv/bin/python bench/miniature.py [--base healed|embedded | --base-dir DIR] [--steps 160] [--rows NAME,...]

Domain = GSM8K (train split to train, test split to evaluate), general = OpenStax
humanities valid + novels valid (../shared/data). Same token budget, data and seed for
every trained row (steps x 4 x 256 tokens), fp32 on CPU. Rows, each at two learning rates
(the first from ../shared/notes/miniature-calibration.md, the second lower, to trace how
much general skill each method gives up for its domain gain):

  base                      the starting model (no training)
  llama-pro@LR              +6 blocks (one after every 5th), new blocks only
  full-ft@LR                full fine-tuning
  lora@LR                   LoRA r=64 on every linear (~19.5 M params, about LLaMA-Pro's 21.2 M)
  moe@LR                    (only with --rows moe@...) Mixtral-style upcycling, 4 experts top-2,
                            experts and routers trained
  moe-fg@LR                 (only with --rows) fine-grained + shared experts (DeepSeekMoE): 4
                            segments, 1 shared, 2 replicas each (6 routed, top-3), experts and
                            routers trained
  solar@LR                  (only with --rows) SOLAR depth up-scaling (30 -> 40 blocks, --drop 10),
                            then full fine-tuning of the deeper model (SOLAR's continued pretraining)

--base healed (the default) starts every row from the healed reference model
(bench/reference_models.py: the quantization confound removed); --base embedded from the
dequantized Q4_1 SmolLM2 (the confound kept: the second section of docs/results.md).
Perplexity on the first 16,384 tokens of each set (windows of 256).

Each row's result is cached in OUT/rows/NAME.json as soon as it is measured, and an
interrupted training run resumes from its last checkpoint, so an interrupted sweep
continues where it stopped. Prints a Markdown table; writes miniature.json and
miniature.png (math perplexity against each general perplexity, every point labelled,
the Pareto frontier drawn) into OUT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import lmx  # noqa: E402
# the data tree (../shared/data; bench/results.py --data-root points its test at a tiny copy)
SHARED = Path(os.environ.get("LMEXPAND_BENCH_DATA") or ROOT.parent / "shared" / "data")
TEMPLATE = "Question: {question}\nAnswer: {answer}"
SETS = {
    "math": SHARED / "gsm8k" / "test.jsonl",
    "general-openstax": SHARED / "general-english" / "openstax-humanities" / "valid.txt",
    "general-novels": SHARED / "general-english" / "novels-1902-1927" / "valid.txt",
}
LORA = ["--trainable", "none", "--lora", "--lora-r", "64", "--lora-targets",
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]
# method -> (surgery args or None, training args); learning rates per row name
METHODS = {
    "llama-pro": (["llama-pro", "--add", "6"], []),
    "full-ft": (None, ["--trainable", "all"]),
    "lora": (None, LORA),
    "moe": (["moe", "--experts", "4", "--top-k", "2"], []),
    "moe-fg": (["moe", "--segments", "4", "--shared", "1", "--replicas", "2"], []),
    "solar": (["upscale", "--drop", "10"], ["--trainable", "all"]),
}
DEFAULT_ROWS = ["llama-pro@3e-4", "llama-pro@1e-4", "full-ft@3e-5", "full-ft@1e-5", "lora@2e-4", "lora@5e-5"]


# perplexity and training budgets (bench/results.py --budget tiny changes them for its test)
EVAL_TOKENS, SEQ_LEN, BATCH = 16384, 256, 4


def evaluate(model: str, out: Path) -> dict:
    if not (out / "results.json").is_file():
        data = [a for name, path in SETS.items() for a in ("--data", f"{name}={path}")]
        lmx("eval", model, *data, "--template", TEMPLATE, "--out", str(out), "--max-tokens", str(EVAL_TOKENS),
            "--seq-len", str(SEQ_LEN), "--no-samples")
    res = json.loads((out / "results.json").read_text())
    return {k: v["ppl"] for k, v in res["perplexity"]["model"].items()}


def base_model(name: str, directory: Path | None = None) -> tuple[str, str]:
    """(model dir or embedded name, identity for the cache keys)."""
    if directory is not None:
        meta = json.loads((directory / "lmexpand.json").read_text()) if (directory / "lmexpand.json").is_file() else {}
        return str(directory), meta.get("reference", {}).get("key") or str(directory.resolve())
    if name == "embedded":
        return "smollm2-135m", "smollm2-135m"
    from bench.reference_models import resolve

    d = resolve(name)
    return str(d), json.loads((d / "lmexpand.json").read_text())["reference"]["key"]


def run_row(row: str, base: str, base_id: str, out: Path, steps: int) -> dict:
    method, _, lr = row.partition("@")
    if method not in METHODS or not lr:
        raise SystemExit(f"unknown row {row!r}: METHOD@LR with METHOD in {', '.join(METHODS)}")
    surgery, train_args = METHODS[method]
    common = ["--data", str(SHARED / "gsm8k" / "train.jsonl"), "--template", TEMPLATE, "--seq-len", str(SEQ_LEN),
              "--batch-size", str(BATCH), "--max-steps", str(steps), "--warmup-steps", str(min(10, steps // 2)), "--val-every", "0",
              "--save-every", str(max(1, min(20, steps // 2))), "--no-tensorboard", "--seed", "0", "--lr", lr]
    key = hashlib.sha256(json.dumps([row, base_id, steps, surgery, train_args, common, EVAL_TOKENS]).encode()
                         ).hexdigest()[:12]
    cached = out / "rows" / f"{row}.json"
    if cached.is_file() and json.loads(cached.read_text()).get("key") == key:
        print(f"{row}: cached", flush=True)
        return json.loads(cached.read_text())
    model = base
    if surgery is not None:
        expanded = out / f"{surgery[0]}-{hashlib.sha256(json.dumps([base_id, surgery]).encode()).hexdigest()[:8]}"
        if not (expanded / "lmexpand.json").is_file():
            lmx("surgery", surgery[0], base, str(expanded), *surgery[1:], "--force")
        model = str(expanded)
    run = out / f"run-{row}-{key}"
    from lmexpand.train.state import latest_checkpoint

    resume = ["--resume"] if run.is_dir() and latest_checkpoint(run) is not None else ["--force"]
    seconds = 0.0
    if not (run / "model" / "lmexpand.json").is_file():
        seconds = lmx("train", "--model", model, "--out", str(run), *common, *train_args, *resume)
    ppl = evaluate(str(run), out / f"eval-{row}-{key}")
    lineage = json.loads((run / "model" / "lmexpand.json").read_text())["training"][-1]
    result = {"key": key, "ppl": ppl, "trainable": lineage["trainable_parameters"], "seconds": seconds,
              "tokens": steps * BATCH * SEQ_LEN, "resumed": resume == ["--resume"]}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=2))
    print(row, result, flush=True)
    return result


def main() -> None:
    global EVAL_TOKENS, SEQ_LEN, BATCH
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="healed", help="healed (a reference model, default) or embedded")
    ap.add_argument("--steps", type=int, default=160, help="optimizer steps per row (x 4 x 256 tokens)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated METHOD@LR rows")
    ap.add_argument("--base-dir", type=Path, default=None, help="a model directory instead of --base")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/.cache/miniature-BASE")
    ap.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS)
    ap.add_argument("--seq-len", type=int, default=SEQ_LEN)
    ap.add_argument("--batch-size", type=int, default=BATCH)
    args = ap.parse_args()
    EVAL_TOKENS, SEQ_LEN, BATCH = args.eval_tokens, args.seq_len, args.batch_size
    out = args.out or ROOT / "bench" / ".cache" / f"miniature-{args.base}"
    out.mkdir(parents=True, exist_ok=True)
    base, base_id = base_model(args.base, args.base_dir)
    rows: dict[str, dict] = {"base": {"ppl": evaluate(base, out / f"eval-base-{base_id}"), "trainable": 0,
                                      "seconds": 0.0, "tokens": 0}}
    for row in args.rows.split(","):
        rows[row] = run_row(row, base, base_id, out, args.steps)
    tokens = args.steps * BATCH * SEQ_LEN
    (out / "miniature.json").write_text(json.dumps({"base": args.base, "tokens": tokens, "rows": rows}, indent=2))
    print(f"\nSame budget: {tokens:,} training tokens per trained row.\n")
    print(markdown_table(rows))
    plot(rows, out / "miniature.png", f"{args.base} SmolLM2-135M, {tokens:,} training tokens per row")


def markdown_table(rows: dict) -> str:
    names = list(SETS)
    lines = ["| row | " + " | ".join(f"{n} ppl" for n in names) + " | trainable params | train wall time |",
             "|---" * (len(names) + 3) + "|"]
    b = rows["base"]["ppl"]
    for name, r in rows.items():
        cells = []
        for n in names:
            delta = "" if name == "base" else f" ({100 * (r['ppl'][n] - b[n]) / b[n]:+.1f} %)"
            cells.append(f"{r['ppl'][n]:.3f}{delta}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['trainable'] / 1e6:.1f} M | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def frontier(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The Pareto frontier of (general ppl, math ppl) points, lower is better in both:
    the points no other point beats on both axes, in order of general ppl."""
    keep = [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and (q[0], q[1]) != (p[0], p[1])
                                         for q in points)]
    return sorted(keep)


def plot(rows: dict, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    general = [k for k in SETS if k.startswith("general")]
    fig, axes = plt.subplots(1, len(general), figsize=(6 * len(general), 4.8))
    for ax, g in zip(axes, general):
        points = [(r["ppl"][g], r["ppl"]["math"], name) for name, r in rows.items()]
        for x, y, name in points:
            ax.scatter(x, y, s=60, color="black" if name == "base" else None)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        f = frontier(points)
        ax.plot([p[0] for p in f], [p[1] for p in f], color="grey", linestyle="--", linewidth=1,
                label="frontier (no row better on both)")
        bx = rows["base"]["ppl"][g]
        ax.axvline(bx * 1.01, color="red", linewidth=0.8, linestyle=":", label="base general ppl +1 %")
        ax.set_xlabel(f"{g} perplexity (lower: more general skill kept)")
        ax.set_ylabel("GSM8K test perplexity (lower: more domain gained)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
