"""Deep-fusion miniature from the `healed` reference model (bench/reference_models.py).

    .venv/bin/python bench/deep_fusion_miniature.py [--out bench/.cache/deep-fusion-mini]

Documents mixing general English paragraphs (OpenStax + novels train) with fenced Python
code (the shared CPython code corpus, chunks of --chunk characters), as Markdown:
"paragraph\\n\\n```python\\ncode\\n```\\n\\nparagraph...". Experts (all layers, attn + mlp, spans
between ``` fences) are trained on --train-tokens of them; LLaMA-Pro (+--pro-blocks blocks)
gets the same data and budget. Measured, before and after:
  code-span perplexity  mean NLL of the tokens inside fences only, on held-out mixed
                        documents (built from the validation splits);
  general perplexity    on fence-free OpenStax / novels validation text (`lmexpand eval`,
                        first --eval-tokens, windows of --seq-len): for deep fusion it must be
                        exactly the base's; for LLaMA-Pro, by how much it moves.
Results cached in --out, written to OUT/results.json. --healed overrides the base (tiny
models for the plumbing), --open the marker.
"""

from __future__ import annotations

import argparse
import json
import os
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import lmx  # noqa: E402

# the data tree (../shared/data; bench/results.py --data-root points its test at a tiny copy)
DATA = Path(os.environ.get("LMEXPAND_BENCH_DATA") or ROOT.parent / "shared" / "data")
GENERAL = {"openstax": DATA / "general-english" / "openstax-humanities",
           "novels": DATA / "general-english" / "novels-1902-1927"}
CODE = DATA / "code"


def mixed_documents(split: str, n_chars: int, chunk: int, fence: str) -> list[str]:
    paras = [p.strip().replace(fence, "~~~") for d in GENERAL.values()
             for p in (d / f"{split}.txt").read_text().split("\n\n") if len(p.strip()) > 200]
    code = [json.loads(x)["text"] for x in (CODE / f"{split}.jsonl").read_text().splitlines() if x.strip()]
    chunks = [c[i:i + chunk].strip("\n") for c in code for i in range(0, len(c), chunk)]
    chunks = [c.replace(fence, "~~~") for c in chunks if c.strip()]  # no stray fences inside a span
    docs, used, i = [], 0, 0
    while used < n_chars and i < min(len(paras), len(chunks)) - 1:
        doc = f"{paras[i]}\n\n{fence}python\n{chunks[i]}\n{fence}\n\n{paras[i + 1]}"
        docs.append(doc)
        used += len(doc)
        i += 2
    return docs


def span_perplexity(model_dir: Path, docs: list[str], open_marker: str, max_tokens: int, seq_len: int) -> dict:
    """Perplexity of the tokens inside fences (and outside), scored with each document's context."""
    import torch

    from lmexpand.checkpoint.tokenizer import load_tokenizer
    from lmexpand.compose.deep_fusion_modeling import span_types
    from lmexpand.compose.loading import load_model, register_if_composed
    from lmexpand.expand.deep_fusion import marker_ids

    register_if_composed(model_dir)
    tok = load_tokenizer(model_dir)
    fence_ids = marker_ids(tok, open_marker, "--open")
    model = load_model(model_dir, dtype=torch.float32).eval()
    nll = {"inside": 0.0, "outside": 0.0}
    n = {"inside": 0, "outside": 0}
    seen = 0
    from lmexpand.compose.deep_fusion_modeling import DeepFusionCache

    for d in docs:  # each document in disjoint windows of seq_len; span types from the whole document
        ids = torch.tensor([tok(d, add_special_tokens=False)["input_ids"]])
        types = span_types(ids, fence_ids, None)[0][0]
        for start in range(0, ids.shape[1] - 1, seq_len):
            x = ids[:, start:start + seq_len + 1]
            kw = {}
            if hasattr(model, "types"):  # deep fusion: the window starts in the document's span state
                cache = DeepFusionCache(model.config.source_config())
                cache.state = span_types(ids[:, :start], fence_ids, None)[1] if start else None
                kw = {"cache": cache, "use_cache": True}
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x[:, :-1], **kw).logits[0].float(), -1)
            tgt = x[0, 1:]
            inside = types[start + 1:start + x.shape[1]]
            lp = -logp.gather(-1, tgt[:, None]).squeeze(-1)
            for key, m in (("inside", inside), ("outside", ~inside)):
                nll[key] += lp[m].sum().item()
                n[key] += int(m.sum())
            seen += x.shape[1] - 1
        if seen >= max_tokens:
            break
    return {f"{k}_ppl": math.exp(nll[k] / max(n[k], 1)) for k in nll} | {f"{k}_tokens": n[k] for k in n}


def general_ppl(model: Path, out: Path, a) -> dict:
    res = out / "results.json"
    if not res.is_file():
        lmx("eval", model, *[x for k, d in GENERAL.items() for x in ("--data", f"{k}={d / 'valid.txt'}")],
            "--max-tokens", a.eval_tokens, "--seq-len", a.seq_len, "--no-samples", "--out", out)
    return {k: v["ppl"] for k, v in json.loads(res.read_text())["perplexity"]["model"].items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "deep-fusion-mini")
    ap.add_argument("--healed", type=Path, default=None)
    ap.add_argument("--open", default="```")
    ap.add_argument("--chunk", type=int, default=800)
    ap.add_argument("--train-tokens", type=int, default=40960)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--pro-blocks", type=int, default=4)
    a = ap.parse_args()
    from bench._common import run_facts
    from bench.reference_models import resolve

    healed = a.healed or resolve("healed")
    a.out.mkdir(parents=True, exist_ok=True)
    train_file, valid_docs = a.out / "mixed-train.txt", mixed_documents("valid", a.eval_tokens * 8, a.chunk, a.open)
    if not train_file.is_file():
        train_file.write_text("\n\n\n".join(d.replace("\n\n", "\n") for d in
                                            mixed_documents("train", a.train_tokens * 6, a.chunk, a.open)) + "\n")
    steps = max(1, a.train_tokens // (a.seq_len * a.batch_size))
    rows = {}
    for name, method, args in (("deep fusion", "deep-fusion", ["--open", a.open]),
                               ("LLaMA-Pro", "llama-pro", ["--add", str(a.pro_blocks)])):
        expanded, run = a.out / f"{method}", a.out / f"{method}-run"
        if not (expanded / "lmexpand.json").is_file():
            lmx("surgery", method, healed, expanded, *args, "--force")
        if not (run / "model" / "config.json").is_file():
            lmx("train", "--model", expanded, "--data", train_file, "--out", run, "--seq-len", a.seq_len,
                "--batch-size", a.batch_size, "--max-steps", steps, "--lr", a.lr, "--val-every", 0, "--no-tensorboard",
                "--force")
        rows[name] = {"spans": span_perplexity(run / "model", valid_docs, a.open, a.eval_tokens, a.seq_len),
                      "general": general_ppl(run / "model", a.out / f"eval-{method}", a),
                      "training": run_facts(run)}
    rows["base (healed)"] = {"spans": span_perplexity(healed, valid_docs, a.open, a.eval_tokens, a.seq_len),
                             "general": general_ppl(healed, a.out / "eval-base", a)}
    base_general = rows["base (healed)"]["general"]
    verdict = {"deep_fusion_general_exactly_unchanged": rows["deep fusion"]["general"] == base_general,
               "llama_pro_general_change": {k: rows["LLaMA-Pro"]["general"][k] / v - 1 for k, v in base_general.items()},
               "code_span_gain": {k: 1 - rows[k]["spans"]["inside_ppl"] / rows["base (healed)"]["spans"]["inside_ppl"]
                                  for k in ("deep fusion", "LLaMA-Pro")}}
    results = {"base": str(healed), "train_steps": steps, "rows": rows, "verdict": verdict}
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
