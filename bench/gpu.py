"""GPU benchmark, one prepared script: training throughput, MFU and peak memory for a
1B-class model, MoE training steps, and surgery throughput on the machine's disk.

    .venv/bin/python bench/gpu.py [--out DIR] [--steps 12] [--peak-tflops N]   # on a CUDA machine
    .venv/bin/python bench/gpu.py --tiny --out DIR                            # the same code on CPU, seconds

What it runs (each training variant its own process, so each peak is its own):
  base          random bf16 weights of TinyLlama's shape (hidden 2048, 22 layers, GQA 32/4,
                FFN 5632) with the embedded SmolLM2's tokenizer (vocab 49,152: a real
                tokenizer is needed and none is downloaded), written by lmexpand's writer
  surgery       ``lmexpand surgery llama-pro base --add 6`` (+25 % blocks: 22 -> 28) and
                ``cp -r`` of the same base on the same disk (the floor), warm cache
  ours          ``lmexpand train`` on the expanded model, new blocks only, bf16 (seq 2048)
  full-ft       ``lmexpand train --trainable all`` on the same model
  hf-trainer    transformers' Trainer on the same model, ``requires_grad=False`` on every
                weight the surgery did not add, ``bf16=True`` (autocast over fp32 weights,
                the Trainer's mixed precision), same batch, seq, lr, AdamW
  moe-mixtral   ``surgery moe --experts 8 --top-k 2 --layers every:2`` then ``lmexpand train``
                (experts and routers of the upcycled layers)
  moe-fine      ``surgery moe --segments 4 --shared 1 --replicas 2`` on the last half of the
                layers (fine-grained + shared experts, Glm4-MoE class), then ``lmexpand train``
  merge         two fine-tune-like copies of the base (+ N(0, 0.001^2)), merged with TIES
                (density 0.5) and linear by ``lmexpand merge --device cuda`` and ``--device
                cpu`` (the same machine's cores), and by ``mergekit-yaml --cuda`` when
                bench/.peers/mergekit is there (issue 35); wall time and bytes/s per run
                (--tiny: TIES by lmexpand only)

Figures per training variant: tokens/s (median step after the first two), MFU = achieved
model FLOPs / the GPU's peak bf16 dense FLOPs, and peak memory (CUDA: the process's
``torch.cuda.max_memory_allocated``; CPU: peak RSS). Model FLOPs per token are counted from
the config and the layer map as bench/train.py counts them (``training_macs`` in
bench/_common.py: forward everywhere, input gradients from the first trained layer up,
weight gradients only for trained weights; MoE layers count the top-k routed plus shared
experts a token uses), x2 for FLOPs. Peak: ``--peak-tflops``, else looked up from the GPU's
name (H100/H200 SXM 989, A100 312, L40S 362, A10G 125, RTX 4090 165 TFLOPS bf16 dense).

Targets (issue 22): >= 40 % MFU for new-blocks-only training in bf16; ours >= 10 % faster
than the HF Trainer with frozen weights. Writes DIR/gpu.json and DIR/gpu.md and prints the
table. ``--tiny``: a 2-layer 64-wide model, seq 64, 3 steps, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import CACHE, llama_tensor_shapes, training_macs  # noqa: E402

PY = sys.executable
DATA = ROOT / "recipes" / "data" / "gsm8k-subset" / "train.jsonl"  # real text, in the repo
TEMPLATE = "Question: {question}\nAnswer: {answer}"
HF_TRAINER = ROOT / "bench" / "peers" / "hf_trainer_freeze.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PEAK_TFLOPS = {"H200": 989, "H100": 989, "GH200": 989, "A100": 312, "L40S": 362, "L40": 181, "A10G": 125,
               "A10": 125, "4090": 165, "L4": 121, "A6000": 155}
SHAPE_1B = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4)
SHAPE_TINY = dict(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2)


def build_base(path: Path, shape: dict, vocab_source: Path) -> Path:
    """Random bf16 Llama weights of ``shape`` with the tokenizer of ``vocab_source``."""
    if (path / "config.json").is_file():
        return path
    import torch

    from lmexpand.checkpoint import Computed, OutputTensor, TensorSlot, write_checkpoint

    tok_cfg = json.loads((vocab_source / "config.json").read_text())
    vocab = int(tok_cfg["vocab_size"])
    gen = torch.Generator().manual_seed(0)

    def rand(sh):
        return lambda: (torch.randn(sh, generator=gen) * 0.02).to(torch.bfloat16)

    norms = lambda sh: (lambda: torch.ones(sh, dtype=torch.bfloat16))  # noqa: E731
    outs = [OutputTensor(TensorSlot(n, "BF16", sh), Computed(norms(sh) if n.endswith("norm.weight") else rand(sh)))
            for n, sh in llama_tensor_shapes(**shape, vocab=vocab).items()]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"], "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"], "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16",
        "hidden_act": "silu", "rope_theta": 10000.0, "bos_token_id": tok_cfg.get("bos_token_id"),
        "eos_token_id": tok_cfg.get("eos_token_id"),
    }
    files: dict[str, bytes | Path] = {"config.json": json.dumps(config, indent=2).encode()}
    files.update({f: vocab_source / f for f in TOKENIZER_FILES if (vocab_source / f).is_file()})
    write_checkpoint(path, outs, files=files, max_shard_size=int(1e9))
    return path


def merge_rows(base: Path, work: Path, tiny: bool) -> dict:
    """TIES and linear over two noisy copies of ``base``: lmexpand on the GPU and on the CPU
    cores, and mergekit --cuda when installed (the --tiny check runs the GPU row on the CPU)."""
    import torch

    from lmexpand.checkpoint import Computed, OutputTensor, TensorSlot, write_checkpoint
    from lmexpand.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(base)  # the project's reader: tensor headers, values, files to carry
    files = {"config.json": base / "config.json", **{f.name: f for f in reader.carry_files()}}
    models = []
    for i in (1, 2):
        path = work / f"merge-ft{i}"
        models.append(path)
        if (path / "config.json").is_file():
            continue

        def noisy(n: str, i: int = i):
            def fn():
                t = reader.get_tensor(n)
                g = torch.Generator().manual_seed(1000 * i + len(n))
                return (t.float() + torch.randn(t.shape, generator=g) * 0.001).to(t.dtype)
            return fn

        slots = [OutputTensor(TensorSlot(t.name, t.dtype, t.shape), Computed(noisy(t.name))) for t in reader]
        write_checkpoint(path, slots, files=files, max_shard_size=int(1e9))
    reader.close()
    import yaml

    two = [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models]
    cfgs = {"ties": {"merge_method": "ties", "base_model": str(base), "models": two},
            "linear": {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}}
                                                             for m in models]}}
    if tiny:  # the code path only: one method, no peer
        cfgs.pop("linear")
    gpu = "cpu" if tiny else "cuda"
    mergekit = ROOT / "bench" / ".peers" / "mergekit" / "bin" / "mergekit-yaml"
    out: dict = {}
    for method, cfg in cfgs.items():
        path = work / f"merge-{method}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        runs = {"lmexpand --device " + ("cpu (the GPU row's code)" if tiny else gpu): [PY, "-m", "lmexpand", "-q", "merge", str(path), str(work / "merged"),
                                             "--force", "--device", gpu, "--seed", "0"],
                "lmexpand --device cpu": [PY, "-m", "lmexpand", "-q", "merge", str(path), str(work / "merged"),
                                          "--force", "--device", "cpu", "--seed", "0"]}
        if mergekit.exists() and not tiny:
            runs["mergekit-yaml" + ("" if tiny else " --cuda")] = [
                str(mergekit), str(path), str(work / "merged"), "--random-seed", "0", "--no-copy-tokenizer",
                "--quiet"] + ([] if tiny else ["--cuda"])
        for label, cmd in runs.items():
            shutil.rmtree(work / "merged", ignore_errors=True)
            seconds = run(cmd)
            written = dir_bytes(work / "merged")
            out[f"{method}: {label}"] = {"seconds": round(seconds, 2), "bytes": written,
                                         "gb_per_s": round(written / seconds / 1e9, 2)}
            print(f"  merge {method}: {label}: {seconds:.2f} s", flush=True)
    shutil.rmtree(work / "merged", ignore_errors=True)
    return out


def run(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.perf_counter() - t


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def surgery(cmd: list[str], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    s = run([PY, "-m", "lmexpand", "-q", "surgery", *cmd, str(out)])
    return {"seconds": round(s, 2), "bytes": dir_bytes(out), "gb_per_s": round(dir_bytes(out) / s / 1e9, 2)}


# ---- one training process (the child) ------------------------------------------------------

def child(argv: list[str]) -> int:
    """``gpu.py --child KIND OUT.json ARGS...``: run one training in this process and write
    its peak memory; KIND 'lmexpand' (ARGS: the CLI's) or 'hf' (bench/peers/hf_trainer_freeze.py's:
    MODEL DATA RUN STEPS BATCH SEQ)."""
    import resource

    import torch

    kind, result, args = argv[0], Path(argv[1]), argv[2:]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if kind == "lmexpand":
        from lmexpand.cli import main

        rc = main(args)
    else:  # the same baseline bench/train.py runs, in this process so that its peak is measured
        import runpy

        sys.argv = [str(HF_TRAINER), *args]
        runpy.run_path(str(HF_TRAINER), run_name="__main__")
        rc = 0
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result.write_text(json.dumps({"rc": rc, "peak_bytes": peak, "cuda": torch.cuda.is_available()}))
    return rc


def train_variant(name: str, model: Path, work: Path, steps: int, batch: int, seq: int, *extra: str,
                  hf: bool = False) -> dict:
    run_dir, result = work / f"run-{name}", work / f"{name}.json"
    shutil.rmtree(run_dir, ignore_errors=True)
    if hf:
        cmd = [PY, __file__, "--child", "hf", str(result), str(model), str(DATA), str(run_dir), str(steps), str(batch),
               str(seq)]
    else:
        cmd = [PY, __file__, "--child", "lmexpand", str(result), "-q", "train", "--model", str(model), "--data",
               str(DATA), "--template", TEMPLATE, "--out", str(run_dir), "--seq-len", str(seq), "--batch-size",
               str(batch), "--max-steps", str(steps), "--warmup-steps", "1", "--lr", "1e-4", "--val-every", "0",
               "--val-fraction", "0", "--no-tensorboard", "--force", *extra]
    run(cmd, env={"LMEXPAND_NO_PROGRESS": "1"})
    rec = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    t = [r["elapsed_s"] for r in rec]
    step_times = [b - a for a, b in zip(t, t[1:])][1:]  # the first two steps are warm-up
    step = statistics.median(step_times)
    peak = json.loads(result.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"step_s": round(step, 4), "tokens_per_s": round(batch * seq / step, 1),
            "peak_memory_gib": round(peak["peak_bytes"] / 2**30, 2), "peak_kind": "cuda" if peak["cuda"] else "rss"}


def gpu_peak_tflops(flag: float | None) -> tuple[float | None, str]:
    import torch

    if flag:
        return flag, "--peak-tflops"
    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name(0)
    for key, tf in PEAK_TFLOPS.items():
        if key in name:
            return float(tf), name
    return None, name


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU: the same code in seconds")
    ap.add_argument("--out", type=Path, default=CACHE / "gpu")
    ap.add_argument("--work", type=Path, default=None, help="where models are written (default: OUT/work)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak bf16 dense TFLOPS")
    ap.add_argument("--only", default=None, help="comma-separated variants (ours,full-ft,hf-trainer,moe-mixtral,moe-fine,merge)")
    args = ap.parse_args()
    import torch

    from lmexpand.checkpoint.sources import resolve_source

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device here; run it on a GPU machine, or --tiny for the CPU check.")
    shape = SHAPE_TINY if args.tiny else SHAPE_1B
    steps = args.steps or (4 if args.tiny else 12)
    batch = args.batch or (2 if args.tiny else 4)
    seq = args.seq or (64 if args.tiny else 2048)
    add = max(1, round(shape["layers"] * 0.25))
    work = args.work or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    peak_tf, device = gpu_peak_tflops(args.peak_tflops)
    report: dict = {"device": device, "peak_tflops": peak_tf, "shape": shape, "steps": steps, "batch": batch,
                    "seq": seq, "added_blocks": add, "torch": torch.__version__, "surgery": {}, "train": {}}
    print(f"device: {device} (peak {peak_tf} TFLOPS bf16)" if peak_tf else f"device: {device}", flush=True)

    base = build_base(work / "base", shape, resolve_source("smollm2-135m"))
    pro = work / "pro"
    # surgery on this disk, warm cache: the expansion and the cp -r floor of the same base
    cp_dst = work / "cp-copy"
    shutil.rmtree(cp_dst, ignore_errors=True)
    cp_s = run(["cp", "-r", str(base), str(cp_dst)])
    shutil.rmtree(cp_dst, ignore_errors=True)
    report["surgery"]["cp -r base"] = {"seconds": round(cp_s, 2), "bytes": dir_bytes(base),
                                       "gb_per_s": round(dir_bytes(base) / cp_s / 1e9, 2)}
    report["surgery"]["llama-pro"] = surgery(["llama-pro", str(base), "--add", str(add)], pro)
    print(f"surgery: {report['surgery']}", flush=True)

    if not only or "merge" in only:
        report["merge"] = merge_rows(base, work, args.tiny)
    cfg = json.loads((pro / "config.json").read_text())
    variants = [("ours", pro, "new", ()), ("full-ft", pro, "all", ("--trainable", "all")),
                ("hf-trainer", pro, "new", ())]
    moe_dirs = {}
    if not only or "moe-mixtral" in only:
        moe_dirs["moe-mixtral"] = (["moe", str(base), "--experts", "8", "--top-k", "2", "--layers", "every:2"],)
    if not only or "moe-fine" in only:
        half = list(range(shape["layers"] // 2, shape["layers"]))
        moe_dirs["moe-fine"] = (["moe", str(base), "--segments", "4", "--shared", "1", "--replicas", "2",
                                 "--layers", ",".join(map(str, half))],)
    for name, (cmd,) in moe_dirs.items():
        out = work / name
        report["surgery"][name] = surgery(cmd, out)
        variants.append((name, out, "moe", ()))
    for name, model, trainable, extra in variants:
        if only and name not in only:
            continue
        precision = ("--precision", "fp32") if args.tiny else ("--precision", "bf16")
        r = train_variant(name, model, work, steps, batch, seq, *precision, *extra, hf=name == "hf-trainer")
        macs = training_macs(model, seq, trainable)
        r["model_tflop_per_step"] = round(2 * macs * batch * seq / 1e12, 3)
        if peak_tf:
            r["mfu"] = round(2 * macs * r["tokens_per_s"] / (peak_tf * 1e12), 4)
        report["train"][name] = r
        print(f"  {name}: {r}", flush=True)
        if name != "hf-trainer" and model != pro and not args.tiny:
            shutil.rmtree(model, ignore_errors=True)  # MoE copies are large; done with them
    t = report["train"]
    if "ours" in t and "hf-trainer" in t:
        report["ours_vs_hf_trainer_speedup"] = round(t["hf-trainer"]["step_s"] / t["ours"]["step_s"], 3)
    if "ours" in t and "full-ft" in t:
        report["ours_vs_full_ft_step"] = round(t["ours"]["step_s"] / t["full-ft"]["step_s"], 3)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2))
    md = markdown(report, cfg)
    (args.out / "gpu.md").write_text(md)
    print(md)
    return 0


def markdown(r: dict, cfg: dict) -> str:
    s = r["shape"]
    lines = [f"## GPU benchmark: {r['device']}", "",
             f"Model: random bf16 weights, hidden {s['hidden']}, {s['layers']} layers (+{r['added_blocks']} LLaMA-Pro "
             f"blocks: {cfg['num_hidden_layers']}), vocab {cfg['vocab_size']}; batch {r['batch']} x seq {r['seq']}, "
             f"{r['steps']} steps (median after the first two); torch {r['torch']}; peak {r['peak_tflops']} TFLOPS.", "",
             "| variant | step (s) | tokens/s | MFU | peak memory (GiB) |", "|---|---|---|---|---|"]
    for name, v in r["train"].items():
        mfu = f"{100 * v['mfu']:.1f} %" if "mfu" in v else "n/a"
        lines.append(f"| {name} | {v['step_s']:.3f} | {v['tokens_per_s']:.0f} | {mfu} | {v['peak_memory_gib']:.2f} ({v['peak_kind']}) |")
    if "ours_vs_hf_trainer_speedup" in r:
        lines += ["", f"ours vs HF Trainer (frozen weights): {r['ours_vs_hf_trainer_speedup']:.2f}x faster per step "
                      "(target >= 1.10)"]
    if "mfu" in r["train"].get("ours", {}):
        lines.append(f"new-blocks-only MFU: {100 * r['train']['ours']['mfu']:.1f} % (target >= 40 %)")
    lines += ["", "| surgery | seconds | GB written | GB/s |", "|---|---|---|---|"]
    for name, v in r["surgery"].items():
        lines.append(f"| {name} | {v['seconds']:.2f} | {v['bytes'] / 1e9:.2f} | {v['gb_per_s']:.2f} |")
    if r.get("merge"):
        lines += ["", "| merge (2 models + base) | seconds | GB written | GB/s |", "|---|---|---|---|"]
        for name, v in r["merge"].items():
            lines.append(f"| {name} | {v['seconds']:.2f} | {v['bytes'] / 1e9:.2f} | {v['gb_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
