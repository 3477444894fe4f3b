"""Benchmark: streaming reader -> writer copy vs `cp -r`, and peak memory.

Builds a synthetic 1.1B-parameter bf16 Llama checkpoint (TinyLlama shape: hidden 2048,
intermediate 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000, untied, 2 shards) once
under bench/.cache/, then times, with a warm page cache, best of --repeat runs:

* `cp -r` of the directory (the baseline),
* lmexpand's raw copy (what surgery does for every unchanged tensor),
* lmexpand's materialized copy (each tensor loaded and re-serialized: what surgery does for
  transformed tensors),

each in a child process that reports its own peak RSS (VmHWM). Targets: raw copy time
<= 1.3x cp; peak RSS <= 2x the largest tensor + 400 MB.

    .venv/bin/python bench/checkpoint_io.py [--repeat 3] [--cache bench/.cache]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import synthetic_checkpoint  # noqa: E402


CHILD = r"""
import sys, time, resource
sys.path.insert(0, {root!r})
from lmexpand.checkpoint import CheckpointReader, Computed, OutputTensor, TensorSlot, copy_checkpoint, write_checkpoint
src, dst, mode = {src!r}, {dst!r}, {mode!r}
t = time.perf_counter()
reader = CheckpointReader(src)
if mode == "raw":
    copy_checkpoint(reader, dst, max_shard_size=int(1.2e9))
else:
    outs = [OutputTensor(TensorSlot(i.name, i.dtype, i.shape), Computed(lambda n=i.name: reader.get_tensor(n).clone())) for i in reader]
    write_checkpoint(dst, outs, files={{"config.json": reader.path / "config.json"}}, max_shard_size=int(1.2e9))
elapsed = time.perf_counter() - t
# VmHWM: this process's own peak resident memory (ru_maxrss would include the parent's
# memory image from before exec).
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(elapsed, int(hwm) / 1024)
"""


def run_child(src: Path, dst: Path, mode: str) -> tuple[float, float]:
    shutil.rmtree(dst, ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), src=str(src), dst=str(dst), mode=mode)],
                         check=True, capture_output=True, text=True)
    seconds, rss_mib = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(rss_mib)


def run_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync", "-f", str(dst)], check=True)  # lmexpand fsyncs; make cp pay the same
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    args = ap.parse_args()
    src = synthetic_checkpoint("1.1b", args.cache)
    sys.path.insert(0, str(ROOT))
    from lmexpand.checkpoint import CheckpointReader

    reader = CheckpointReader(src)
    largest = max(t.nbytes for t in reader) / 2**20
    total = reader.total_bytes / 2**30
    dst = args.cache / "copy-target"
    run_cp(src, dst)  # warm the page cache
    cp = min(run_cp(src, dst) for _ in range(args.repeat))
    raw = [run_child(src, dst, "raw") for _ in range(args.repeat)]
    raw_t, raw_rss = min(r[0] for r in raw), max(r[1] for r in raw)
    mat = [run_child(src, dst, "materialize") for _ in range(args.repeat)]
    mat_t, mat_rss = min(r[0] for r in mat), max(r[1] for r in mat)
    shutil.rmtree(dst, ignore_errors=True)
    budget = 2 * largest + 400
    print(f"checkpoint: {reader.total_params / 1e9:.2f}B params, {total:.2f} GiB, {len(reader.weight_files)} shards, "
          f"largest tensor {largest:.0f} MiB")
    print(f"cp -r (+sync)        : {cp:6.2f} s  {total / cp:5.2f} GiB/s")
    print(f"lmexpand raw copy    : {raw_t:6.2f} s  {total / raw_t:5.2f} GiB/s  ratio vs cp {raw_t / cp:.2f}x "
          f"(target <= 1.3x)  peak RSS {raw_rss:.0f} MiB")
    print(f"lmexpand materialized: {mat_t:6.2f} s  {total / mat_t:5.2f} GiB/s  ratio vs cp {mat_t / cp:.2f}x  "
          f"peak RSS {mat_rss:.0f} MiB")
    print(f"RSS budget 2x largest + 400 MiB = {budget:.0f} MiB: raw copy {'OK' if raw_rss <= budget else 'OVER'}, "
          f"materialized {'OK' if mat_rss <= budget else 'OVER'}")
    print(f"time target (raw copy): {'OK' if raw_t <= 1.3 * cp else 'MISSED'}")


if __name__ == "__main__":
    main()
