"""Shared benchmark helpers: synthetic checkpoints and per-process time/peak-RSS measurement."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"

# Random bf16 Llama checkpoints of real shapes (values do not matter for I/O timing).
SHAPES = {
    "1.1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),  # TinyLlama
    "2.8b": dict(hidden=3072, intermediate=8192, layers=26, heads=24, kv_heads=8, vocab=32000),
}


def llama_tensor_shapes(hidden, intermediate, layers, heads, kv_heads, vocab) -> dict[str, tuple[int, ...]]:
    hd = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * hd, hidden), p + "self_attn.v_proj.weight": (kv_heads * hd, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden), p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def synthetic_checkpoint(size: str, cache: Path = CACHE) -> Path:
    """Build (once) a random bf16 Llama checkpoint of a named shape, in 2+ shards."""
    path = cache / f"llama-{size}-bf16"
    if (path / "config.json").is_file():
        return path
    sys.path.insert(0, str(ROOT))
    import torch

    from lmexpand.checkpoint import Computed, OutputTensor, TensorSlot, write_checkpoint

    s = SHAPES[size]
    gen = torch.Generator().manual_seed(0)

    def rand(shape):
        return lambda: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    outs = [OutputTensor(TensorSlot(n, "BF16", sh), Computed(rand(sh))) for n, sh in llama_tensor_shapes(**s).items()]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
        "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"], "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    print(f"building synthetic {size} checkpoint at {path} ...", flush=True)
    t = time.perf_counter()
    write_checkpoint(path, outs, files={"config.json": json.dumps(config).encode()}, max_shard_size=int(1.2e9) if size == "1.1b" else int(3e9))
    print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def drop_page_cache() -> bool:
    """Empty the page cache (root only); False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one command, via GNU time (a small parent, so the
    figure is the command's own), after which the output is synced to disk."""
    time_bin = shutil.which("time") or "/usr/bin/time"
    if not Path(time_bin).exists():
        raise SystemExit("GNU time (/usr/bin/time) is needed: apt-get install time")
    start = time.perf_counter()
    r = subprocess.run([time_bin, "-f", "LMX_RSS_KB=%M", *cmd], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    os.sync()
    elapsed = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    rss = [l for l in r.stderr.splitlines() if l.startswith("LMX_RSS_KB=")][-1].split("=")[1]
    return elapsed, int(rss) / 1024


def training_macs(model_dir: Path, seq_len: int, trainable: str = "new") -> float:
    """Multiply-accumulates per token of one training step, counted from the config and the
    saved tensors' shapes (x2 for FLOPs). ``trainable``: 'new' (the blocks lmexpand.json's
    layer map marks new), 'all' (full fine-tuning) or 'moe' (experts, shared experts and
    routers of the upcycled layers).

    Linear layers: forward W everywhere; backward W again for the input gradient in every
    layer from the first trained one up, and W once more for the weight gradient only where
    the weight trains. Causal attention: 2 * (seq/2) * hidden forward, twice that backward
    wherever gradients flow. MoE layers count what a token uses: top-k routed experts, the
    shared experts and the router. The lm_head: forward and input gradient, plus its weight
    gradient under full fine-tuning. Layers below the first trained one need no backward."""
    import re

    from lmexpand.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(model_dir, need_family=False)
    cfg = reader.config
    text = cfg.get("text_config", cfg)
    h, vocab, n = text["hidden_size"], text["vocab_size"], text["num_hidden_layers"]
    top_k = int(text.get("num_experts_per_tok") or 1)
    layer_re = re.compile(r"\.layers\.(\d+)\.(.*)$")
    dense = [0.0] * n  # per layer: active MACs of frozen-able linear weights, and of MoE weights
    moe = [0.0] * n
    experts: dict[int, set[int]] = {}
    expert_macs = [0.0] * n
    for t in reader:
        m = layer_re.search(t.name)
        if not m or len(t.shape) < 2:
            continue
        layer, rest = int(m[1]), m[2]
        size = 1
        for d in t.shape:
            size *= d
        e = re.search(r"experts\.(\d+)\.", rest)
        if e:
            experts.setdefault(layer, set()).add(int(e[1]))
            expert_macs[layer] += size
        elif re.search(r"experts\.(gate_up_proj|down_proj)$", rest):  # fused [E, ...]
            experts.setdefault(layer, set()).update(range(t.shape[0]))
            expert_macs[layer] += size
        elif "shared_expert" in rest or re.search(r"(mlp|block_sparse_moe)\.gate\.weight$", rest):
            moe[layer] += size
        else:
            dense[layer] += size
    for layer, ids in experts.items():
        moe[layer] += expert_macs[layer] / len(ids) * min(top_k, len(ids))
    attn = 2 * (seq_len / 2) * h
    linear = [d + m for d, m in zip(dense, moe)]
    forward = sum(linear) + n * attn + h * vocab
    if trainable == "all":
        trained, first = linear, 0
    elif trainable == "moe":
        trained = moe
        first = next(i for i, m in enumerate(moe) if m)
    else:
        lineage = json.loads((Path(model_dir) / "lmexpand.json").read_text())
        new = [i for i, x in enumerate(lineage["layer_map"]) if isinstance(x, str)]
        trained = [linear[i] if i in new else 0.0 for i in range(n)]
        first = new[0]
    backward_input = sum(linear[first:]) + (n - first) * 2 * attn + h * vocab
    backward_weight = sum(trained) + (h * vocab if trainable == "all" else 0)
    return forward + backward_input + backward_weight


def run_facts(run: Path) -> dict:
    """What a finished `lmexpand train` run cost: tokens seen and training seconds (from its
    metrics.jsonl; a resumed run's seconds are those of its last launch)."""
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines() if (Path(run) / "metrics.jsonl").is_file() else []
    if not lines:
        return {"tokens": None, "seconds": None}
    last = json.loads(lines[-1])
    return {"tokens": last.get("tokens"), "seconds": round(last.get("elapsed_s", 0.0), 1), "steps": last.get("step")}


def lmx(*args) -> float:
    """One lmexpand command in this process (no interpreter and torch start per call: a
    miniature makes dozens), its stdout dropped; returns its seconds, stops on a failure."""
    import contextlib
    import io

    from lmexpand.cli import main

    argv = ["-q", *map(str, args)]
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    if code:
        raise SystemExit(f"`lmexpand {' '.join(argv)}` exited {code}")
    return time.perf_counter() - t
