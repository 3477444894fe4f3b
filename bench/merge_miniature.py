"""Merging in miniature: the `math` and `code` specialists (both fine-tuned from `healed`,
bench/reference_models.py) merged by each method, scored against each specialist.

    .venv/bin/python bench/merge_miniature.py [--out bench/.cache/merge-mini]

Methods (mergekit YAML, `lmexpand merge`, fp32):
  linear            0.5 math + 0.5 code (a uniform soup)
  task_arithmetic   healed + 1.0 (math - healed) + 1.0 (code - healed)
  ties              task vectors trimmed to density 0.5, sign election, weight 1 each
  dare_ties         task vectors dropped at random to density 0.5 (seed 0), rescaled, sign election
  slerp             spherical interpolation math -> code, t = 0.5
  model_stock       healed + the angle-derived ratio of the specialists' average
  greedy_soup       candidates math, code, healed ranked by perplexity on a held-out soup set
                    (later GSM8K test problems and code validation text, disjoint from the
                    scored windows), each kept only if the uniform average does not get worse

Scored (`lmexpand eval`, first --eval-tokens of each set, windows of --seq-len): GSM8K test
(math), code validation (code), OpenStax and novels validation (general). The share of a
specialist's gain a merge keeps: (healed - merged) / (healed - specialist) on its domain's
perplexity. The claim holds here if some merge keeps >= 80 % of both gains. Each merge and
each evaluation is cached in --out; written to OUT/results.json.
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
# name -> (file, template or None)
SETS = {"gsm8k": (DATA / "gsm8k" / "test.jsonl", TEMPLATE),
        "code": (DATA / "code" / "valid.jsonl", None),
        "openstax": (DATA / "general-english" / "openstax-humanities" / "valid.txt", None),
        "novels": (DATA / "general-english" / "novels-1902-1927" / "valid.txt", None)}
GAIN_SETS = {"math": "gsm8k", "code": "code"}


def merges(m: dict[str, Path]) -> dict[str, dict]:
    h, a, c = str(m["healed"]), str(m["math"]), str(m["code"])
    two = [{"model": a, "parameters": {"weight": 1.0}}, {"model": c, "parameters": {"weight": 1.0}}]
    return {
        "linear": {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.5}},
                                                        {"model": c, "parameters": {"weight": 0.5}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": h, "models": two},
        "ties": {"merge_method": "ties", "base_model": h, "parameters": {"density": 0.5}, "models": two},
        "dare_ties": {"merge_method": "dare_ties", "base_model": h, "parameters": {"density": 0.5}, "models": two},
        "slerp": {"merge_method": "slerp", "base_model": a, "parameters": {"t": 0.5},
                  "models": [{"model": a}, {"model": c}]},
        "model_stock": {"merge_method": "model_stock", "base_model": h, "models": [{"model": a}, {"model": c}]},
        "greedy_soup": {"merge_method": "greedy_soup", "models": [{"model": a}, {"model": c}, {"model": h}]},
    }


def soup_set(path: Path, skip_chars: int, chars: int) -> Path:
    """Held-out text for ranking the soup's candidates: GSM8K test problems and code validation
    text *after* the first skip_chars characters of each (the scored windows come from the start)."""
    if path.is_file():
        return path
    gsm = "\n\n".join(TEMPLATE.format(**json.loads(x)) for x in SETS["gsm8k"][0].read_text().splitlines() if x.strip())
    code = "\n\n".join(json.loads(x)["text"] for x in SETS["code"][0].read_text().splitlines() if x.strip())
    parts = [t[skip_chars:skip_chars + chars // 2] for t in (gsm, code)]
    path.write_text("\n\n".join(p.replace("\n\n", "\n") for p in parts) + "\n")
    return path


def evaluate(model: Path, out: Path, a) -> dict[str, float]:
    ppl: dict[str, float] = {}
    for template in {t for _, t in SETS.values()}:
        names = [n for n, (_, t) in SETS.items() if t == template]
        part = out / ("templated" if template else "plain")
        if not (part / "results.json").is_file():
            lmx("eval", model, *[x for n in names for x in ("--data", f"{n}={SETS[n][0]}")],
                *(["--template", template] if template else []), "--max-tokens", a.eval_tokens, "--seq-len",
                a.seq_len, "--no-samples", "--out", part)
        r = json.loads((part / "results.json").read_text())["perplexity"]["model"]
        ppl.update({n: r[n]["ppl"] for n in names})
    return ppl


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / ".cache" / "merge-mini")
    for name in ("healed", "math", "code"):
        ap.add_argument(f"--{name}", type=Path, default=None, help=f"model for {name} (default: the reference model)")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="(unused: merges do not train)")
    ap.add_argument("--soup-tokens", type=int, default=4096, help="tokens of the soup set scored per candidate")
    ap.add_argument("--only", default=None, help="comma-separated methods (default: all)")
    a = ap.parse_args()
    from bench.reference_models import resolve

    m = {n: getattr(a, n) or resolve(n) for n in ("healed", "math", "code")}
    a.out.mkdir(parents=True, exist_ok=True)
    results_file = a.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results["models"] = {k: str(v) for k, v in m.items()}
    rows = results.setdefault("rows", {})
    for name in ("healed", "math", "code"):
        if name not in rows:
            rows[name] = {"ppl": evaluate(m[name], a.out / f"eval-{name}", a)}
            results_file.write_text(json.dumps(results, indent=2))
    # the soup set starts after the scored windows (4 characters a token, twice over for safety)
    soup = soup_set(a.out / "soup.txt", a.eval_tokens * 8, a.soup_tokens * 8)
    wanted = a.only.split(",") if a.only else list(merges(m))
    for method, cfg in merges(m).items():
        if method not in wanted or method in rows:
            continue
        cfg = {**cfg, "dtype": "float32"}
        config = a.out / f"{method}.yaml"
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        merged = a.out / f"merged-{method}"
        seconds = 0.0
        if not (merged / "lmexpand.json").is_file():
            extra = ["--seed", "0"] if method.startswith("dare") else []
            if method == "greedy_soup":
                extra = ["--eval-data", soup, "--eval-tokens", a.soup_tokens]
            seconds = lmx("merge", config, merged, "--force", *extra)
        row: dict = {"ppl": evaluate(merged, a.out / f"eval-{method}", a), "merge_seconds": round(seconds, 1)}
        if method == "greedy_soup":
            row["soup"] = json.loads((merged / "lmexpand.json").read_text())["merge"]["greedy_soup"]
        rows[method] = row
        results_file.write_text(json.dumps(results, indent=2))
        print(method, row["ppl"], flush=True)
    base = rows["healed"]["ppl"]
    for name, row in rows.items():
        row["kept"] = {spec: (base[s] - row["ppl"][s]) / (base[s] - rows[spec]["ppl"][s])
                       if base[s] != rows[spec]["ppl"][s] else None for spec, s in GAIN_SETS.items()}
        row["general_change"] = {s: row["ppl"][s] / base[s] - 1 for s in ("openstax", "novels")}
    merged_rows = [n for n in rows if n not in ("healed", "math", "code")]
    keeps = {n: min(v for v in rows[n]["kept"].values() if v is not None) for n in merged_rows
             if all(v is not None for v in rows[n]["kept"].values())}
    best = max(keeps, key=keeps.get) if keeps else None
    results["verdict"] = {"best_merge": best, "best_min_share_kept": keeps.get(best) if best else None,
                          "some_merge_keeps_80_percent_of_both": bool(best) and keeps[best] >= 0.8}
    results_file.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["verdict"], indent=2))


if __name__ == "__main__":
    main()
