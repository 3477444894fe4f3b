"""Co-LLM miniature with the reference models (bench/reference_models.py).

    .venv/bin/python bench/co_llm_miniature.py [--out bench/.cache/co-llm-mini]

Base `healed`, assistant `math`; training on GSM8K train answers (`--loss-from Answer:`),
the same token budget for every trained row (--train-tokens). Rows:
  base alone; base fine-tuned alone (full fine-tuning, same budget); assistant alone;
  Co-LLM gate only (with --init-steps of weak supervision first); Co-LLM gate + base.
Measured (`lmexpand eval`, first 16,384 tokens of each set, windows of 256): GSM8K test
perplexity (the Co-LLM rows: the marginal, and the hard switch at the best threshold chosen on
GSM8K), OpenStax and novels perplexity with the gate active, the deferral rate on each set,
and a mixed GSM8K + general set (half and half). The method works here if Co-LLM beats both
the fine-tuned base and the assistant on the mixed set and defers far more on GSM8K than on
general text. Results cached in --out and written to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._common import lmx  # noqa: E402

# the data tree (../shared/data; bench/results.py --data-root points its test at a tiny copy)
DATA = Path(os.environ.get("LMEXPAND_BENCH_DATA") or ROOT.parent / "shared" / "data")
TEMPLATE = "Question: {question}\nAnswer: {answer}"
GSM8K_TRAIN = DATA / "gsm8k" / "train.jsonl"
SETS = {"gsm8k": DATA / "gsm8k" / "test.jsonl",
        "openstax": DATA / "general-english" / "openstax-humanities" / "valid.txt",
        "novels": DATA / "general-english" / "novels-1902-1927" / "valid.txt"}


def mixed_set(path: Path, tokens: int) -> Path:
    """GSM8K test problems and general validation paragraphs alternating, ~tokens/2 of each."""
    if path.is_file():
        return path
    budget = tokens * 4 // 2
    gsm = [TEMPLATE.format(**json.loads(x)) for x in SETS["gsm8k"].read_text().splitlines() if x.strip()]
    general = [p.strip() for s in ("openstax", "novels") for p in SETS[s].read_text().split("\n\n") if p.strip()]
    out, used, i = [], [0, 0], 0
    while (used[0] < budget or used[1] < budget) and i < min(len(gsm), len(general)):
        if used[0] < budget:
            out.append(gsm[i]); used[0] += len(gsm[i])
        if used[1] < budget:
            out.append(general[i]); used[1] += len(general[i])
        i += 1
    path.write_text("\n\n".join(t.replace("\n\n", "\n") for t in out) + "\n")  # .txt: one document per paragraph
    return path


def evaluate(model: Path, out: Path, a) -> dict:
    res = out / "results.json"
    if not res.is_file():
        mix = mixed_set(a.out / "mixed.txt", a.eval_tokens)
        lmx("eval", model, "--data", f"gsm8k={SETS['gsm8k']}", "--data", f"openstax={SETS['openstax']}",
            "--data", f"novels={SETS['novels']}", "--data", f"mixed={mix}", "--template", TEMPLATE,
            "--max-tokens", a.eval_tokens, "--seq-len", a.seq_len, "--no-samples", "--out", out)
    r = json.loads(res.read_text())
    row = {s: v["ppl"] for s, v in r["perplexity"]["model"].items()}
    if "co_llm" in r:
        row["best_threshold_on_gsm8k"] = r["co_llm"]["gsm8k"]["best"]["threshold"]
        for s, t in r["co_llm"].items():  # every set at that one threshold (eval's at_chosen)
            row[f"{s}_hard_switch"] = t["at_chosen"]["switch_ppl"]
            row[f"{s}_deferred"] = t["at_chosen"]["deferral_rate"]
            # per token class (digits, operators, words, space/punctuation) at that threshold
            row[f"{s}_deferred_by_class"] = {c: v["deferral_rate"] for c, v in t["at_chosen"]["by_class"].items()}
    return row


def train(model: Path, run: Path, a, *extra) -> Path:
    if not (run / "model" / "lmexpand.json").is_file() and not (run / "model" / "config.json").is_file():
        steps = max(1, a.train_tokens // (a.seq_len * a.batch_size))
        lmx("train", "--model", model, "--data", GSM8K_TRAIN, "--template", TEMPLATE, "--loss-from", "Answer:",
            "--out", run, "--seq-len", a.seq_len, "--batch-size", a.batch_size, "--max-steps", steps, "--lr", a.lr,
            "--val-every", 0, "--no-tensorboard", "--force", *extra)
    return run / "model"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "co-llm-mini")
    ap.add_argument("--healed", type=Path, default=None)
    ap.add_argument("--math", type=Path, default=None)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--train-tokens", type=int, default=40960)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--gate-lr", type=float, default=1e-2)
    ap.add_argument("--init-steps", type=int, default=20)
    a = ap.parse_args()
    from bench.reference_models import resolve

    healed, math_model = a.healed or resolve("healed"), a.math or resolve("math")
    a.out.mkdir(parents=True, exist_ok=True)
    comp = a.out / "co-llm"
    if not (comp / "lmexpand.json").is_file():
        lmx("surgery", "co-llm", healed, math_model, comp, "--force")
    rows = {
        "base alone (healed)": evaluate(healed, a.out / "eval-base", a),
        "base fine-tuned alone": evaluate(train(healed, a.out / "ft", a, "--trainable", "all"), a.out / "eval-ft", a),
        "assistant alone (math)": evaluate(math_model, a.out / "eval-asst", a),
        "Co-LLM, gate only": evaluate(train(comp, a.out / "gate", a, "--lr", a.gate_lr, "--co-llm-init-steps",
                                            a.init_steps), a.out / "eval-gate", a),
        "Co-LLM, gate + base": evaluate(train(comp, a.out / "gate-base", a, "--trainable", "gate+base",
                                              "--co-llm-init-steps", a.init_steps), a.out / "eval-gate-base", a),
    }
    co = [k for k in rows if k.startswith("Co-LLM")]
    verdict = {k: {"beats_finetuned_and_assistant_on_mixed": rows[k]["mixed"] < min(
        rows["base fine-tuned alone"]["mixed"], rows["assistant alone (math)"]["mixed"]),
        "defers_more_on_gsm8k": rows[k].get("gsm8k_deferred", 0) > 2 * max(
            rows[k].get("openstax_deferred", 0), rows[k].get("novels_deferred", 0))} for k in co}
    from bench._common import run_facts

    training = {name: run_facts(a.out / d) for name, d in (("base fine-tuned alone", "ft"),
                                                          ("Co-LLM, gate only", "gate"),
                                                          ("Co-LLM, gate + base", "gate-base"))}
    results = {"models": {"healed": str(healed), "math": str(math_model)}, "rows": rows, "verdict": verdict,
               "training": training}
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
