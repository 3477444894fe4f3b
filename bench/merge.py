"""Benchmark: `lmexpand merge` vs `mergekit-yaml` 0.1.5, wall time and peak RSS.

A synthetic bf16 Llama base (bench/_common.py shapes; default the 1.1B TinyLlama shape, or
its first --layers layers) plus two fine-tune-like variants (base + N(0, (0.001)^2) noise),
built once under bench/.cache/. For linear, slerp, ties and dare_ties (same YAML file for
both tools): each tool in its own process, interleaved, best of --repeat, with its own peak
RSS (the largest child's ru_maxrss). mergekit runs with its lowest-memory settings (CPU, no
clone, safetensors, lazy loader) and --num-threads equal to the cores; lmexpand with
--threads equal to the cores. The I/O floor reads every input once and writes one output
(the same bytes) with `cat`. Targets (docs/benchmarks.md): >= 3x faster than mergekit, peak RSS
<= 1/4 of mergekit's, within 2x of the I/O floor.

    .venv/bin/python bench/merge.py [--layers 22] [--repeat 3] [--methods linear,slerp,ties,dare_ties]
    .venv/bin/python bench/merge.py --methods ties,ties+match   # + lmexpand --match-mergekit (argsort)
    .venv/bin/python bench/merge.py --device cuda               # lmexpand --device cuda vs mergekit --cuda

Needs mergekit: bash bench/peers/install_mergekit.sh
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import CACHE, SHAPES, llama_tensor_shapes  # noqa: E402

MERGEKIT = ROOT / "bench" / ".peers" / "mergekit" / "bin" / "mergekit-yaml"
MEASURE = r"""
import resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
elapsed = time.perf_counter() - t
if rc.returncode:
    sys.stderr.write(rc.stderr[-3000:]); sys.exit(rc.returncode)
print(elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def build(layers: int) -> dict[str, Path]:
    import torch

    from lmexpand.checkpoint import Computed, OutputTensor, TensorSlot, write_checkpoint

    shape = dict(SHAPES["1.1b"], layers=layers)
    tensors = llama_tensor_shapes(**shape)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape["hidden"],
              "intermediate_size": shape["intermediate"], "num_hidden_layers": layers,
              "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
              "vocab_size": shape["vocab"], "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2}
    out = {}
    for i, name in enumerate(["base", "ft1", "ft2"]):
        path = CACHE / f"merge-{layers}l-{name}"
        out[name] = path
        if (path / "config.json").is_file():
            continue

        def make(n: str, sh: tuple, i: int = i):
            def fn():
                g = torch.Generator().manual_seed(hash(n) % 2**31)
                base = torch.randn(sh, generator=g) * 0.02
                if i:
                    base += torch.randn(sh, generator=torch.Generator().manual_seed(1000 * i + len(n))) * 0.001
                return base.to(torch.bfloat16)
            return fn

        print(f"building {path.name} ...", flush=True)
        write_checkpoint(path, [OutputTensor(TensorSlot(n, "BF16", sh), Computed(make(n, sh)))
                                for n, sh in tensors.items()],
                         files={"config.json": json.dumps(config).encode()}, max_shard_size=int(1.2e9))
    return out


def configs(m: dict[str, Path]) -> dict[str, dict]:
    base, a, b = (str(m[k]) for k in ("base", "ft1", "ft2"))
    two = [{"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
           {"model": b, "parameters": {"weight": 0.5, "density": 0.5}}]
    return {
        "linear": {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.5}},
                                                         {"model": b, "parameters": {"weight": 0.5}}]},
        "slerp": {"merge_method": "slerp", "base_model": a, "parameters": {"t": 0.5},
                  "models": [{"model": a}, {"model": b}]},
        "ties": {"merge_method": "ties", "base_model": base, "models": two},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": two},
    }


def measure(cmd: list[str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr}")
    seconds, rss = out.stdout.split()
    return float(seconds), float(rss)


def io_floor(inputs: list[Path], out: Path) -> float:
    """Read each input's shards once, write one input's worth of bytes (cat > file)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t = time.perf_counter()
    for i, src in enumerate(inputs):
        for shard in sorted(src.glob("*.safetensors")):
            target = out / shard.name if i == 0 else Path(os.devnull)
            with open(shard, "rb") as f, open(target, "wb") as g:
                while chunk := f.read(1 << 24):
                    g.write(chunk)
    for shard in out.glob("*"):
        fd = os.open(shard, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", default="linear,slerp,ties,dare_ties")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu", help="lmexpand --device; a cuda device also gives mergekit --cuda")
    args = ap.parse_args()
    if not MERGEKIT.exists():
        raise SystemExit("mergekit is not installed: bash bench/peers/install_mergekit.sh")
    models = build(args.layers)
    work = CACHE / "merge-runs"
    work.mkdir(parents=True, exist_ok=True)
    cfgs = configs(models)
    rows = []
    for method in args.methods.split(","):
        import yaml

        # "<method>+match": lmexpand with --match-mergekit (ties: mergekit's argsort instead of the O(n) selection)
        name, match = method.split("+")[0], method.endswith("+match")
        cfg = work / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(cfgs[name]))
        lx_cmd = [str(ROOT / ".venv" / "bin" / "lmexpand"), "-q", "merge", str(cfg), str(work / "lx"), "--force",
                  "--threads", str(args.threads), "--seed", "0", "--device", args.device] + \
            (["--match-mergekit"] if match else [])
        mk_cmd = [str(MERGEKIT), str(cfg), str(work / "mk"), "--random-seed", "0", "--num-threads", str(args.threads),
                  "--no-copy-tokenizer", "--quiet"] + (["--cuda"] if args.device.startswith("cuda") else [])
        best = {"lmexpand": (1e9, 0.0), "mergekit": (1e9, 0.0)}
        for _ in range(args.repeat):
            for tool, cmd in (("mergekit", mk_cmd), ("lmexpand", lx_cmd)):
                shutil.rmtree(work / ("mk" if tool == "mergekit" else "lx"), ignore_errors=True)
                s, rss = measure(cmd)
                print(f"  {method} {tool}: {s:.1f} s, peak RSS {rss:,.0f} MiB", flush=True)
                if s < best[tool][0]:
                    best[tool] = (s, max(rss, best[tool][1]) if best[tool][1] else rss)
        inputs = sorted({Path(m["model"]) for m in cfgs[name]["models"]} | (
            {Path(cfgs[name]["base_model"])} if "base_model" in cfgs[name] else set()))
        floor = min(io_floor(inputs, work / "floor") for _ in range(args.repeat))
        (lx_s, lx_rss), (mk_s, mk_rss) = best["lmexpand"], best["mergekit"]
        rows.append((method, lx_s, mk_s, lx_rss, mk_rss, floor))
    n_params = sum(__import__("math").prod(s) for s in llama_tensor_shapes(**dict(SHAPES["1.1b"], layers=args.layers)).values())
    print(f"\n{n_params / 1e9:.2f}B-parameter bf16 models ({args.layers} layers), {args.threads} threads, best of "
          f"{args.repeat}\n")
    print("| method | lmexpand | mergekit 0.1.5 | speed-up | lmexpand RSS | mergekit RSS | RSS ratio | I/O floor | vs floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, lx_s, mk_s, lx_rss, mk_rss, floor in rows:
        print(f"| {method} | {lx_s:.1f} s | {mk_s:.1f} s | {mk_s / lx_s:.2f}x | {lx_rss:,.0f} MiB | {mk_rss:,.0f} MiB | "
              f"{lx_rss / mk_rss:.2f} | {floor:.1f} s | {lx_s / floor:.2f}x |")


if __name__ == "__main__":
    main()
