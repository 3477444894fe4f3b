"""Benchmark: MoE upcycling (surgery) and training an upcycled model.

    .venv/bin/python bench/moe.py surgery [--size 1.1b] [--experts 8] [--repeat 2]
    .venv/bin/python bench/moe.py train [--steps 8] [--repeat 2]

surgery: the synthetic bf16 Llama (bench/_common.py) -> Mixtral with E experts, top-2,
random router, as separate processes under GNU time (peak RSS), interleaved, best of
--repeat, warm page cache. Baselines: `cp -r` of a checkpoint of the output's size, and
mergekit-moe 0.1.5 (`gate_mode: random`, E copies of the model, from its own venv in
bench/.peers/mergekit; ../shared/notes/peer-baselines.md). lmexpand writes every expert
as a raw byte copy of the dense FFN (copy_file_range), so it should run at copy speed.
Also checks that the two outputs hold the same expert tensors.

train: step time (median after 2 warm-up steps) and peak RSS of training the upcycled
SmolLM2-135M (experts + routers trainable, balancing on) vs training the same number of
steps of the dense model's FFNs (`--trainable '*mlp*'`), seq 512, batch 2, fp32 CPU.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import CACHE, measure, synthetic_checkpoint  # noqa: E402
from bench.surgery import subprocess_warm  # noqa: E402
from bench.train import DATA, TEMPLATE, step_times_from_metrics  # noqa: E402

PY = sys.executable
MERGEKIT_MOE = ROOT / "bench" / ".peers" / "mergekit" / "bin" / "mergekit-moe"


def surgery(size: str, experts: int, repeat: int) -> None:
    src = synthetic_checkpoint(size)
    if not (src / "tokenizer.json").is_file():  # mergekit-moe loads the base model's tokenizer
        from tests.tiny import save_tiny_tokenizer

        save_tiny_tokenizer(src)
    work = CACHE / "moe-out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ours, ref = work / "lmexpand", work / "cp-ref"
    cmds = {"lmexpand": [PY, "-m", "lmexpand", "-q", "surgery", "moe", str(src), str(ours), "--experts", str(experts),
                         "--top-k", "2", "--router-init", "random"]}
    if MERGEKIT_MOE.exists():
        yml = work / "moe.yml"
        yml.write_text(f"base_model: {src}\ngate_mode: random\ndtype: bfloat16\nexperts_per_token: 2\nexperts:\n"
                       + "".join(f"  - source_model: {src}\n" for _ in range(experts)))
        cmds["mergekit-moe"] = [str(MERGEKIT_MOE), str(yml), str(work / "mergekit"), "--out-shard-size", "1B",
                                "--no-copy-tokenizer"]
    else:
        print("mergekit not installed: run bench/peers/install_mergekit.sh (own venv under bench/.peers/)")
    measure(cmds["lmexpand"])
    ours.rename(ref)
    cmds = {"cp": ["cp", "-r", str(ref), str(work / "cp-out")], **cmds}
    outputs = {"cp": work / "cp-out", "lmexpand": ours, "mergekit-moe": work / "mergekit"}
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for i in range(repeat):
        for name, cmd in cmds.items():
            for o in outputs.values():  # one output on disk at a time (they are large)
                shutil.rmtree(o, ignore_errors=True)
            subprocess_warm(src)
            runs[name].append(measure(cmd))
            if name == "mergekit-moe" and i == repeat - 1:
                print("  cross-check:", compare(src, outputs["mergekit-moe"]))
    out_gb = sum(f.stat().st_size for f in ref.iterdir()) / 1e9
    from lmexpand.checkpoint import CheckpointReader

    largest = max(t.nbytes for t in CheckpointReader(src)) / 2**20
    print(f"\n== moe upcycling on synthetic {size} bf16: {experts} experts, top-2, random router "
          f"(output {out_gb:.2f} GB), best of {repeat}, warm page cache ==")
    best = {k: min(t for t, _ in v) for k, v in runs.items()}
    peak = {k: max(m for _, m in v) for k, v in runs.items()}
    for k in runs:
        rel = "" if k == "lmexpand" else f"  lmexpand is {best[k] / best['lmexpand']:.2f}x faster"
        print(f"  {k:13s} {best[k]:7.2f} s  {out_gb / best[k]:5.2f} GB/s  peak RSS {peak[k]:7.0f} MiB{rel}")
    print(f"  lmexpand / cp = {best['lmexpand'] / best['cp']:.2f}x; peak RSS vs 2x largest tensor + 400 MiB "
          f"({2 * largest + 400:.0f} MiB): {'OK' if peak['lmexpand'] <= 2 * largest + 400 else 'OVER'}")
    shutil.rmtree(work, ignore_errors=True)


def compare(src: Path, theirs: Path) -> str:
    """mergekit's experts vs the dense FFN they copy (lmexpand's are bitwise copies, tested).
    mergekit-moe writes transformers v5's fused layout: experts.gate_up_proj [E, 2I, H]
    (gate rows first) and experts.down_proj [E, H, I]."""
    import torch

    from lmexpand.checkpoint import CheckpointReader

    a, b = CheckpointReader(src), CheckpointReader(theirs, need_family=False)
    checked = equal = 0
    for layer in range(a.num_layers):
        p = f"model.layers.{layer}.mlp."
        gate, up, down = (a.get_tensor(p + f"{n}_proj.weight") for n in ("gate", "up", "down"))
        gu, dn = b.get_tensor(p + "experts.gate_up_proj"), b.get_tensor(p + "experts.down_proj")
        for e in range(gu.shape[0]):
            checked += 2
            equal += torch.equal(gu[e], torch.cat([gate, up])) + torch.equal(dn[e], down)
    return f"mergekit-moe: {equal} of {checked} fused expert tensors bitwise equal to the dense FFN (as lmexpand's)"


def train(steps: int, repeat: int) -> None:
    moe_dir = CACHE / "smollm2-moe8"
    if not (moe_dir / "lmexpand.json").is_file():
        measure([PY, "-m", "lmexpand", "-q", "surgery", "moe", "smollm2-135m", str(moe_dir), "--experts", "8",
                 "--top-k", "2", "--force"])
    fg_dir = CACHE / "smollm2-fg"
    if not (fg_dir / "lmexpand.json").is_file():
        measure([PY, "-m", "lmexpand", "-q", "surgery", "moe", "smollm2-135m", str(fg_dir), "--segments", "8",
                 "--shared", "2", "--replicas", "4", "--force"])
    common = ["--data", str(DATA), "--template", TEMPLATE, "--seq-len", "512", "--batch-size", "2",
              "--max-steps", str(steps), "--warmup-steps", "1", "--lr", "1e-4", "--val-every", "0",
              "--val-fraction", "0", "--no-tensorboard", "--force"]
    variants = {
        "dense FFNs": ["--model", "smollm2-135m", "--trainable", "model.layers.*.mlp.*"],
        "mixtral E8 top2": ["--model", str(moe_dir)],
        "glm4 fine-grained M8 S2 R4": ["--model", str(fg_dir)],
    }
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(repeat):
        for name, args in variants.items():
            run = CACHE / "moe-train-run"
            _, rss = measure([PY, "-m", "lmexpand", "-q", "train", *args, *common, "--out", str(run)])
            res[name].append((statistics.median(step_times_from_metrics(run)[2:]), rss))
    base = min(t for t, _ in res["dense FFNs"]), min(m for _, m in res["dense FFNs"])
    print(f"\n== training step, SmolLM2-135M, seq 512, batch 2, fp32 CPU, best of {repeat} ==")
    for name, r in res.items():
        t, m = min(x for x, _ in r), min(y for _, y in r)
        print(f"  {name:28s} {t:6.2f} s/step  {2 * 512 / t:6.0f} tok/s  peak RSS {m:6.0f} MiB  "
              f"(x{t / base[0]:.2f} time, x{m / base[1]:.2f} memory vs dense)")


def main() -> None:
    ap = argparse.ArgumentParser(description="MoE upcycling benchmark")
    ap.add_argument("what", choices=["surgery", "train"])
    ap.add_argument("--size", default="1.1b")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if args.what == "surgery":
        surgery(args.size, args.experts, args.repeat)
    else:
        train(args.steps, args.repeat)


if __name__ == "__main__":
    main()
