"""Miniatures of the logit compositions, with the reference models (bench/reference_models.py).

    .venv/bin/python bench/compose_miniature.py [--only sum,proxy,cd] [--out bench/.cache/compose-mini]

- sum    logit sum of `math` + `healed`, weights 1 + 1 and 0.5 + 0.5: GSM8K / OpenStax /
         novels perplexity untrained and with the heads trained (lmexpand train, default trainable set) on a 50/50 mix of
         GSM8K train and general English train text (~40k tokens), against each member alone.
         The claim holds if a trained sum (the better weighting) is within 5 % of `math` on
         GSM8K and within 2 % of `healed` on general text.
- proxy  proxy-tuning of `healed` by `small-math` - `small` at alpha 0.5, 1, 1.5: GSM8K
         perplexity, against `healed` and `math` (tuned directly); gap closed =
         (base - proxy) / (base - math).
- cd     contrastive decoding, expert `healed`, amateur `small`, plausibility alpha 0.1: 200
         prompts (the first 32 tokens of novels-validation paragraphs), 64-token greedy
         continuations at beta 0 (the expert alone) and 0.25, 0.5, 1: repeated 2-/4-gram share,
         distinct-1/2 over all continuations, and the continuations' perplexity under `healed`.

Perplexities: `lmexpand eval`, first 16,384 tokens of each set, windows of 256 (as
docs/results.md). Each result is cached in --out (a rerun skips what is done); the figures
are printed and written to OUT/results.json. --healed/--math/... override the models (the
plumbing test runs it on tiny models).
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
TEMPLATE = "Question: {question}\nAnswer: {answer}"
SETS = {"gsm8k": DATA / "gsm8k" / "test.jsonl",
        "openstax": DATA / "general-english" / "openstax-humanities" / "valid.txt",
        "novels": DATA / "general-english" / "novels-1902-1927" / "valid.txt"}
GENERAL_TRAIN = [DATA / "general-english" / "openstax-humanities" / "train.txt",
                 DATA / "general-english" / "novels-1902-1927" / "train.txt"]
GSM8K_TRAIN = DATA / "gsm8k" / "train.jsonl"


def ppl(model: Path, out: Path, sets: tuple[str, ...], max_tokens: int, seq_len: int) -> dict[str, float]:
    res = out / "results.json"
    if not res.is_file():
        lmx("eval", model, *[a for s in sets for a in ("--data", f"{s}={SETS[s]}")], "--template", TEMPLATE,
            "--max-tokens", max_tokens, "--seq-len", seq_len, "--no-samples", "--out", out)
    row = json.loads(res.read_text())["perplexity"]["model"]
    return {s: row[s]["ppl"] for s in sets}


def surgery(method: str, out: Path, *args: str) -> Path:
    if not (out / "lmexpand.json").is_file():
        lmx("surgery", method, *args, out, "--force")
    return out


def mixed_training_file(path: Path, tokens: int) -> Path:
    """Alternating GSM8K problems and general paragraphs, about tokens/2 of each (4 chars
    per token), as JSONL text records."""
    if path.is_file():
        return path
    budget = tokens * 4 // 2
    gsm = [TEMPLATE.format(**json.loads(x)) for x in GSM8K_TRAIN.read_text().splitlines() if x.strip()]
    general = [p.strip() for f in GENERAL_TRAIN for p in f.read_text().split("\n\n") if len(p.strip()) > 200]
    out, used = [], [0, 0]
    gi = ni = 0
    while used[0] < budget or used[1] < budget:
        if used[0] < budget:
            out.append(gsm[gi]); used[0] += len(gsm[gi]); gi += 1
        if used[1] < budget:
            out.append(general[ni]); used[1] += len(general[ni]); ni += 2  # every other: both books' styles
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in out))
    return path


def run_sum(m: dict[str, Path], out: Path, a: argparse.Namespace) -> dict:
    """Two weightings: 1 + 1 (the plain sum: a product of experts, twice as sharp as either
    member) and 0.5 + 0.5 (the normalized geometric mean of the two distributions); each
    untrained and with its heads trained on the same mix."""
    sets = ("gsm8k", "openstax", "novels")
    mix = mixed_training_file(out / "mix.jsonl", a.train_tokens)
    rows = {"math": ppl(m["math"], out / "eval-math", sets, a.eval_tokens, a.seq_len),
            "healed": ppl(m["healed"], out / "eval-healed", sets, a.eval_tokens, a.seq_len)}
    models: dict[str, Path] = {"math": m["math"], "healed": m["healed"]}
    runs = {}
    for label, suffix, weights in (("sum", "", None), ("sum 0.5/0.5", "-half", "0.5,0.5")):
        comp = surgery("logit-sum", out / f"sum{suffix}", m["math"], m["healed"],
                       *(["--weights", weights] if weights else []))
        run = out / f"sum{suffix}-run"
        if not (run / "model" / "lmexpand.json").is_file():
            steps = max(1, a.train_tokens // (a.seq_len * a.batch_size))
            lmx("train", "--model", comp, "--data", mix, "--out", run, "--seq-len", a.seq_len, "--batch-size",
                a.batch_size, "--max-steps", steps, "--lr", a.lr, "--val-every", 0, "--no-tensorboard", "--force")
        rows[f"{label}, untrained"] = ppl(comp, out / f"eval-sum{suffix}", sets, a.eval_tokens, a.seq_len)
        rows[f"{label}, heads trained"] = ppl(run / "model", out / f"eval-sum{suffix}-trained", sets, a.eval_tokens,
                                              a.seq_len)
        models[f"{label}, untrained"], models[f"{label}, heads trained"] = comp, run / "model"
        runs[label] = run
    answers = greedy_answers(models, out / "answers.json", a)
    verdicts = {}
    for label in runs:
        t = rows[f"{label}, heads trained"]
        v = {"gsm8k_vs_math": t["gsm8k"] / rows["math"]["gsm8k"] - 1,
             "general_vs_healed": max(t[s] / rows["healed"][s] - 1 for s in ("openstax", "novels"))}
        v["holds"] = v["gsm8k_vs_math"] <= 0.05 and v["general_vs_healed"] <= 0.02
        verdicts[label] = v
    # the verdict is the better trained weighting's (by its larger shortfall)
    best = min(verdicts, key=lambda k: max(verdicts[k]["gsm8k_vs_math"], verdicts[k]["general_vs_healed"]))
    verdict = {**verdicts[best], "row": f"{best}, heads trained", "each": verdicts}
    from bench._common import run_facts

    return {"perplexity": rows, "verdict": verdict, "training": run_facts(runs["sum"]), "answers": answers}


# The seed's kind of check (the logit sum that fixed "9.11 vs 9.9"): short arithmetic and
# comparison questions in the GSM8K format, answered greedily.
PROMPTS = ["Which is larger, 9.11 or 9.9?", "What is 17 + 25?", "What is 6 times 7?",
           "Which is smaller, 0.5 or 0.45?", "Tom has 12 apples and gives away 5. How many are left?",
           "What is 100 minus 37?", "Is 3/4 more than 2/3?", "A pen costs $3. How much do 4 pens cost?"]


def greedy_answers(models: dict[str, Path], cache: Path, a: argparse.Namespace) -> dict[str, list[str]]:
    """Each model's answers, cached per model (a model added later runs alone). An answer is
    the continuation up to the next "\nQuestion"; one that starts a new question at once is
    shown as "(no answer: …)" with the start of the raw continuation."""
    out: dict[str, list[str]] = {"prompts": PROMPTS}
    if cache.is_file():
        old = json.loads(cache.read_text())
        if old.get("prompts") == PROMPTS and old.get("format") == 2:
            out.update({k: v for k, v in old.items() if k in models})
    out["format"] = 2  # type: ignore[assignment]
    if all(name in out for name in models):
        return out
    import torch

    from lmexpand.checkpoint.tokenizer import load_tokenizer
    from lmexpand.compose.loading import load_model

    for name, path in models.items():
        if name in out:
            continue
        tok = load_tokenizer(path)
        model = load_model(path, dtype=torch.float32).eval()
        answers = []
        for q in PROMPTS:
            ids = torch.tensor([tok(f"Question: {q}\nAnswer:", add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.answer_tokens,
                                   do_sample=False, pad_token_id=tok.pad_token_id or 0, temperature=None, top_p=None,
                                   top_k=None)
            text = tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True)
            answers.append(text.split("\nQuestion")[0].strip() or f"(no answer: {text[:40].strip()!r}…)")
        out[name] = answers
        cache.write_text(json.dumps(out, indent=2))
    return out


def run_proxy(m: dict[str, Path], out: Path, a: argparse.Namespace) -> dict:
    rows = {"healed (base)": ppl(m["healed"], out / "eval-healed-gsm", ("gsm8k",), a.eval_tokens, a.seq_len)["gsm8k"],
            "math (tuned directly)": ppl(m["math"], out / "eval-math-gsm", ("gsm8k",), a.eval_tokens, a.seq_len)["gsm8k"],
            "small-math (expert)": ppl(m["small-math"], out / "eval-small-math-gsm", ("gsm8k",), a.eval_tokens,
                                       a.seq_len)["gsm8k"]}
    base, tuned = rows["healed (base)"], rows["math (tuned directly)"]
    closed = {}
    for alpha in (0.5, 1.0, 1.5):
        comp = surgery("proxy-tune", out / f"proxy-{alpha:g}", m["healed"], m["small-math"], m["small"],
                       "--alpha", str(alpha))
        p = ppl(comp, out / f"eval-proxy-{alpha:g}", ("gsm8k",), a.eval_tokens, a.seq_len)["gsm8k"]
        rows[f"proxy alpha {alpha:g}"] = p
        closed[f"{alpha:g}"] = (base - p) / (base - tuned) if base != tuned else float("nan")
    return {"gsm8k_perplexity": rows, "gap_closed": closed}


def ngram_stats(conts: list[list[int]]) -> dict[str, float]:
    def grams(seq, n):
        return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]

    out = {}
    for n in (2, 4):  # share of a continuation's n-grams that repeat an earlier one in it
        rep = [1 - len(set(g)) / len(g) for g in (grams(c, n) for c in conts) if g]
        out[f"repeated_{n}gram"] = sum(rep) / len(rep)
    for n in (1, 2):  # distinct n-grams over all continuations / all n-grams
        allg = [g for c in conts for g in grams(c, n)]
        out[f"distinct_{n}"] = len(set(allg)) / max(1, len(allg))
    return out


def run_cd(m: dict[str, Path], out: Path, a: argparse.Namespace) -> dict:
    import torch

    from lmexpand.checkpoint.tokenizer import load_tokenizer
    from lmexpand.compose.loading import load_model

    tok = load_tokenizer(m["healed"])
    paras = [p.strip() for p in SETS["novels"].read_text().split("\n\n") if len(p.strip()) > 300]
    prompts = [tok(p, add_special_tokens=False)["input_ids"][:32] for p in paras][:a.prompts]
    scorer = load_model(m["healed"], dtype=torch.float32).eval()
    results = {}
    for beta in (0.0, 0.25, 0.5, 1.0):
        cache = out / f"cd-{beta:g}.json"
        if not cache.is_file():
            comp = surgery("contrastive", out / f"cd-{beta:g}", m["healed"], m["small"], "--beta", str(beta),
                           "--alpha", "0.1")
            model = load_model(comp, dtype=torch.float32).eval()
            conts = []
            for i in range(0, len(prompts), a.gen_batch):
                ids = torch.tensor(prompts[i:i + a.gen_batch])  # all 32 tokens: no padding needed
                with torch.no_grad():
                    g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                                       do_sample=False, eos_token_id=None, pad_token_id=0, temperature=None, top_p=None,
                                       top_k=None)
                conts += g[:, ids.shape[1]:].tolist()
            nll, n = 0.0, 0
            for p, c in zip(prompts, conts):  # the continuation's perplexity under healed, given its prompt
                seq = torch.tensor([p + c])
                with torch.no_grad():
                    logits = scorer(input_ids=seq).logits[0, len(p) - 1:-1].float()
                nll += torch.nn.functional.cross_entropy(logits, torch.tensor(c), reduction="sum").item()
                n += len(c)
            cache.write_text(json.dumps({"continuations": conts, "ppl_under_healed": math.exp(nll / n),
                                         **ngram_stats(conts)}))
        r = json.loads(cache.read_text())
        results["greedy (expert alone)" if beta == 0 else f"CD beta {beta:g}"] = {
            k: v for k, v in r.items() if k != "continuations"}
        results.setdefault("_example", {})[f"{beta:g}"] = tok.decode(r["continuations"][0])
    results["_prompt_example"] = tok.decode(prompts[0])
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="sum,proxy,cd")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "compose-mini")
    for name in ("healed", "math", "small", "small-math"):
        ap.add_argument(f"--{name}", type=Path, default=None, help=f"model for {name} (default: the reference model)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--train-tokens", type=int, default=40960)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gen-batch", type=int, default=20)
    ap.add_argument("--answer-tokens", type=int, default=32, help="greedy tokens per arithmetic answer (sum)")
    a = ap.parse_args()
    from bench.reference_models import resolve

    parts = a.only.split(",")
    need = {"sum": ("healed", "math"), "proxy": ("healed", "math", "small", "small-math"), "cd": ("healed", "small")}
    models = {n: getattr(a, n.replace("-", "_")) or resolve(n) for n in sorted({x for p in parts for x in need[p]})}
    a.out.mkdir(parents=True, exist_ok=True)
    results_file = a.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["models"] = {k: str(v) for k, v in models.items()}
    for part, fn in (("sum", run_sum), ("proxy", run_proxy), ("cd", run_cd)):
        if part in parts:
            results[part] = fn(models, a.out, a)
            results_file.write_text(json.dumps(results, indent=2))
            print(f"== {part} ==\n{json.dumps(results[part], indent=2)}", flush=True)


if __name__ == "__main__":
    main()
