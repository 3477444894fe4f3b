"""Benchmark: lmexpand surgery vs `cp -r`, the naive transformers script, and mergekit.

    .venv/bin/python bench/surgery.py llama-pro|upscale [--sizes 1.1b,2.8b] [--repeat 3] [--no-cold]

llama-pro: adding ~25 % blocks to synthetic bf16 Llama checkpoints (bench/_common.py): one
identity copy after every 4th block (positions 3, 7, 11, ...), the layer list mergekit's
users write as passthrough slices with scale 0 on o_proj/down_proj.
upscale: SOLAR's depth up-scaling with the slices of ../shared/notes/peer-baselines.md:
1.1B (22 layers) [0, 16) + [6, 22) = 32 layers (`--drop 6`); 2.8B (26) [0, 20) + [6, 26).
Every tool runs as its
own process (imports included, as a user runs it) under GNU time for its peak RSS, then the
output is synced. Runs are interleaved (cp, lmexpand, naive, mergekit, cp, ...), best of
--repeat, with a warm page cache and, unless --no-cold, a dropped one (root only).

Also runs lmexpand with the shard sha256 switched off (LMEXPAND_BENCH_NO_HASH=1, a
benchmark-only switch) to show what the integrity record costs.

Baselines:
  (a) `cp -r` of a checkpoint of the output's size (lmexpand's own output);
  (b) llama-pro only: the naive way of the official LLaMA-Pro script and LLaMA-Factory's
      llama_pro.py: load the whole model with transformers, insert zeroed copies,
      save_pretrained (bench/peers/naive_llama_pro.py);
  (c) mergekit 0.1.5 passthrough (`mergekit-yaml`), from its own venv in bench/.peers/mergekit
      (create it with bench/peers/install_mergekit.sh; skipped with a message if absent).
Also checks that lmexpand's tensors equal mergekit's where both define them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import CACHE, drop_page_cache, measure, synthetic_checkpoint  # noqa: E402

PY = sys.executable
MERGEKIT = ROOT / "bench" / ".peers" / "mergekit" / "bin" / "mergekit-yaml"


def mergekit_config(src: Path, positions: list[int], num_layers: int) -> str:
    slices, start = [], 0
    for p in positions:
        slices.append(f"  - sources: [{{model: {src}, layer_range: [{start}, {p + 1}]}}]")
        slices.append(
            f"  - sources: [{{model: {src}, layer_range: [{p}, {p + 1}], parameters: "
            "{scale: [{filter: o_proj, value: 0.0}, {filter: down_proj, value: 0.0}, {value: 1.0}]}}]"
        )
        start = p + 1
    if start < num_layers:
        slices.append(f"  - sources: [{{model: {src}, layer_range: [{start}, {num_layers}]}}]")
    return "merge_method: passthrough\ndtype: bfloat16\nslices:\n" + "\n".join(slices) + "\n"


def compare_with_mergekit(ours: Path, theirs: Path) -> str:
    import torch

    from lmexpand.checkpoint import CheckpointReader

    a, b = CheckpointReader(ours), CheckpointReader(theirs, need_family=False)
    common = sorted(set(a.tensors) & set(b.tensors))
    bitwise = sum(torch.equal(a.get_tensor(n).view(torch.int16), b.get_tensor(n).view(torch.int16)) for n in common)
    equal = sum(torch.equal(a.get_tensor(n), b.get_tensor(n)) for n in common)
    only = len(set(a.tensors) ^ set(b.tensors))
    return (f"{len(common)} common tensors: {equal} equal in value, {bitwise} bitwise "
            f"(mergekit writes 0*x, so -0.0 where x<0); {only} tensors only on one side")


def upscale_config(src: Path, num_layers: int, drop: int) -> str:
    return ("merge_method: passthrough\ndtype: bfloat16\nslices:\n"
            f"  - sources: [{{model: {src}, layer_range: [0, {num_layers - drop}]}}]\n"
            f"  - sources: [{{model: {src}, layer_range: [{drop}, {num_layers}]}}]\n")


# the number of layers dropped at the seam, as in ../shared/notes/peer-baselines.md
UPSCALE_DROP = {22: 6, 26: 6}


def run_size(method: str, size: str, repeat: int, cold: bool) -> dict:
    src = synthetic_checkpoint(size)
    cfg = json.loads((src / "config.json").read_text())
    num_layers = cfg["num_hidden_layers"]
    work = CACHE / "surgery-out"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ours, ref = work / "lmexpand", work / "cp-ref"
    lmexpand = [PY, "-m", "lmexpand", "-q", "surgery", method, str(src), str(ours)]
    mergekit_flags: list[str] = []
    if method == "llama-pro":
        positions = list(range(3, num_layers, 4))
        pos = ",".join(map(str, positions))
        cmds = {
            "lmexpand": lmexpand + ["--positions", pos],
            "naive": [PY, str(ROOT / "bench" / "peers" / "naive_llama_pro.py"), str(src), str(work / "naive"), pos],
        }
        yml_text = mergekit_config(src, positions, num_layers)
        out_layers = num_layers + len(positions)
    else:
        drop = UPSCALE_DROP.get(num_layers, num_layers // 4)
        cmds = {"lmexpand": lmexpand + ["--drop", str(drop)]}
        yml_text = upscale_config(src, num_layers, drop)
        mergekit_flags = ["--clone-tensors"]  # reused layers share storage otherwise
        out_layers = 2 * (num_layers - drop)
    if MERGEKIT.exists():
        yml = work / "mergekit.yml"
        yml.write_text(yml_text)
        cmds["mergekit"] = [str(MERGEKIT), str(yml), str(work / "mergekit"), "--out-shard-size", "1B",
                            "--no-copy-tokenizer", *mergekit_flags]
    else:
        print("mergekit not installed: run bench/peers/install_mergekit.sh (own venv under bench/.peers/)")

    # a reference output of the same size for cp
    measure(cmds["lmexpand"])
    shutil.copytree(ours, ref)
    shutil.rmtree(ours)
    cmds = {"cp": ["cp", "-r", str(ref), str(work / "cp-out")], "lmexpand": cmds["lmexpand"],
            # the same surgery without the shard hashes (a benchmark-only switch, to show their cost)
            "no-hash": [str(work / "nohash") if a == str(ours) else a for a in cmds["lmexpand"]],
            **{k: v for k, v in cmds.items() if k != "lmexpand"}}
    envs = {"no-hash": {"LMEXPAND_BENCH_NO_HASH": "1"}}
    outputs = {"cp": work / "cp-out", "lmexpand": ours, "no-hash": work / "nohash", "naive": work / "naive",
               "mergekit": work / "mergekit"}

    results: dict[str, dict[str, list]] = {mode: {k: [] for k in cmds} for mode in (["warm", "cold"] if cold else ["warm"])}
    for mode in results:
        if mode == "cold" and not drop_page_cache():
            print("cannot drop the page cache (not root): cold runs skipped")
            del results["cold"]
            break
        for _ in range(repeat):
            for name, cmd in cmds.items():
                shutil.rmtree(outputs[name], ignore_errors=True)
                if mode == "cold":
                    drop_page_cache()
                else:
                    subprocess_warm(src, ref)
                results[mode][name].append(measure(cmd, envs.get(name)))
    check = compare_with_mergekit(ours, outputs["mergekit"]) if "mergekit" in cmds else "mergekit not run"
    out_bytes = sum(p.stat().st_size for p in ours.iterdir())
    largest = max(t.nbytes for t in __import__("lmexpand.checkpoint", fromlist=["x"]).CheckpointReader(src))
    shutil.rmtree(work, ignore_errors=True)
    return {"method": method, "size": size, "layers": f"{num_layers} -> {out_layers}", "out_gb": out_bytes / 1e9,
            "largest_mib": largest / 2**20, "results": results, "mergekit_check": check}


def subprocess_warm(*dirs: Path) -> None:
    """Read the inputs once so that 'warm' means warm for every tool."""
    for d in dirs:
        for f in d.iterdir():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def report(r: dict) -> None:
    budget = 2 * r["largest_mib"] + 400
    print(f"\n== {r['method']} on synthetic {r['size']} bf16 ({r['layers']} layers, output {r['out_gb']:.2f} GB) ==")
    for mode, runs in r["results"].items():
        best = {k: min(t for t, _ in v) for k, v in runs.items()}
        peak = {k: max(m for _, m in v) for k, v in runs.items()}
        print(f"-- {mode} page cache (best of {len(runs['cp'])})")
        for k in runs:
            ratio = best[k] / best["lmexpand"]
            if k == "no-hash":
                print(f"  {k:9s} {best[k]:7.2f} s  {r['out_gb'] / best[k]:5.2f} GB/s  peak RSS {peak[k]:7.0f} MiB"
                      f"  (benchmark only: no shard sha256; the hashes cost {best['lmexpand'] - best[k]:+.2f} s)")
                continue
            print(f"  {k:9s} {best[k]:7.2f} s  {r['out_gb'] / best[k]:5.2f} GB/s  peak RSS {peak[k]:7.0f} MiB"
                  + ("" if k == "lmexpand" else f"  lmexpand is {ratio:.2f}x faster" if ratio >= 1 else f"  lmexpand takes {1 / ratio:.2f}x"))
        print(f"  target: lmexpand <= 1.3x cp: {best['lmexpand'] / best['cp']:.2f}x "
              f"{'OK' if best['lmexpand'] <= 1.3 * best['cp'] else 'MISSED'}; "
              f"peak RSS <= 2x largest + 400 MiB = {budget:.0f} MiB: {'OK' if peak['lmexpand'] <= budget else 'OVER'}")
        target = {"llama-pro": 2.5, "upscale": 2.0}[r["method"]]
        for k in ("naive", "mergekit"):
            if k in best:
                print(f"  target: >= {target}x faster than {k}: {best[k] / best['lmexpand']:.2f}x "
                      f"{'OK' if best[k] >= target * best['lmexpand'] else 'MISSED'}")
    print(f"  equality with mergekit: {r['mergekit_check']}")


def main() -> None:
    ap = argparse.ArgumentParser(description="surgery benchmark")
    ap.add_argument("method", choices=["llama-pro", "upscale"])
    ap.add_argument("--sizes", default="1.1b")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-cold", action="store_true")
    args = ap.parse_args()
    for size in args.sizes.split(","):
        report(run_size(args.method, size, args.repeat, not args.no_cold))


if __name__ == "__main__":
    main()
