"""The measured tables of docs/results.md and docs/reference-models.md, rendered from the
stages bench/results.py finished (OUT/done/*.json). Each generated block sits between
``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in the Markdown file; the prose
around them is written by hand. A stage not finished yet renders as "not measured yet"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f} %"


def _share(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def _t(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def stage_results(out: Path) -> dict[str, dict]:
    """stage name -> {"record": done marker, "dir": its output directory}."""
    found = {}
    for marker in sorted((out / "done").glob("*.json")):
        rec = json.loads(marker.read_text())
        found[rec["stage"]] = {"record": rec, "dir": Path(rec["out"])}
    return found


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------- the sections


def expansion(d: Path, rec: dict) -> tuple[str, dict]:
    r = _json(d / "miniature.json")
    rows = r["rows"]
    base = rows["base"]["ppl"]
    lines = [f"Every trained row: {r['tokens']:,} training tokens of GSM8K train from `healed`, seed 0.",
             "", "| row | GSM8K test ppl | OpenStax ppl | novels ppl | trainable | tokens | train time |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        p = row["ppl"]
        cells = [f"{p['math']:.3f}" + ("" if name == "base" else f" ({_pct(p['math'] / base['math'] - 1)})")]
        for s in ("general-openstax", "general-novels"):
            cells.append(f"{p[s]:.3f}" + ("" if name == "base" else f" ({_pct(p[s] / base[s] - 1)})"))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['trainable'] / 1e6:.1f} M | "
                     f"{row.get('tokens') or 0:,} | {_t(row['seconds']) if name != 'base' else '—'} |")
    png = d / "miniature.png"
    if png.is_file():
        shutil.copyfile(png, DOCS / "results-expansion.png")
        lines += ["", "![GSM8K perplexity against general perplexity, every row, the frontier drawn]"
                      "(results-expansion.png)"]
    summary = {}
    for name, row in rows.items():
        if name == "base":
            continue
        p = row["ppl"]
        summary[name] = {"domain": p["math"] / base["math"] - 1,
                         "general": max(p[s] / base[s] - 1 for s in ("general-openstax", "general-novels")),
                         "seconds": row["seconds"], "tokens": row.get("tokens"), "trainable": row["trainable"]}
    # the frontier over every row: a row is below it when another is better on both axes
    beaten = {k: [o for o, w in summary.items() if w["domain"] < v["domain"] and w["general"] < v["general"]]
              for k, v in summary.items()}
    pro = {k: v for k, v in summary.items() if k.startswith("llama-pro")}
    claim = {k: v["domain"] <= -0.40 and v["general"] <= 0.01 for k, v in pro.items()}
    # dominance at matched domain gain: no full-FT/LoRA row with at least the same domain gain
    # and a lower general change
    others = {k: v for k, v in summary.items() if k.startswith(("full-ft", "lora"))}
    dominated = {k: [o for o, w in others.items() if w["domain"] <= v["domain"] and w["general"] < v["general"]]
                 for k, v in pro.items()}
    lines += ["", "Rule (LLaMA-Pro's claim): math perplexity ≥ 40 % lower with general perplexity at most "
                  "+1 % (the worse of the two general sets); and no full fine-tuning or LoRA row reaches at "
                  "least its domain gain with less general change."]
    for k in pro:
        lines.append(f"- **{k}**: claim {'holds' if claim[k] else 'does not hold'} "
                     f"(math {_pct(pro[k]['domain'])}, general {_pct(pro[k]['general'])}); "
                     + ("not dominated" if not dominated[k] else f"dominated by {', '.join(dominated[k])}") + ".")
    frontier = [k for k in summary if not beaten[k]]
    lines.append(f"- Frontier over every row (no other row lower on both GSM8K and the worse general set): "
                 f"{', '.join(frontier)}.")
    trained = sum(v["seconds"] for v in summary.values())
    return "\n".join(lines), {"rows": summary, "claim": claim, "dominated": dominated, "beaten": beaten,
                              "footer": f"its rows trained for {_t(trained)} in all (kept in bench/results-kept "
                                        f"as each ended, so runs on several machines add up to this table)"}


def merging(d: Path, rec: dict) -> tuple[str, dict]:
    r = _json(d / "results.json")
    rows = r["rows"]
    lines = ["| model | GSM8K ppl | code ppl | OpenStax ppl | novels ppl | math gain kept | code gain kept | "
             "merge time |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        p, k = row["ppl"], row.get("kept", {})
        lines.append(f"| {name} | {p['gsm8k']:.3f} | {p['code']:.3f} | {p['openstax']:.3f} | {p['novels']:.3f} | "
                     f"{_share(k.get('math'))} | {_share(k.get('code'))} | "
                     f"{_t(row.get('merge_seconds')) if 'merge_seconds' in row else '—'} |")
    soup = rows.get("greedy_soup", {}).get("soup")
    if soup:
        def short(path: str) -> str:  # a reference model's directory is NAME-KEY
            return Path(path).name.rsplit("-", 1)[0]

        alone = ", ".join(f"{short(k)} {v:.3f}" for k, v in soup.get("candidates_alone", {}).items())
        lines += ["", f"Greedy soup: candidates alone on the soup set {alone}; kept "
                      f"{', '.join(short(k) for k in soup.get('kept', []))} (soup perplexity "
                      f"{soup.get('soup_perplexity', float('nan')):.3f})."]
    v = r.get("verdict", {})
    lines += ["", "Rule: some merge keeps ≥ 80 % of both specialists' gains (gain kept = (healed − merged) / "
                  "(healed − specialist) on the specialist's own set).",
              f"- Best merge by its smaller share: **{v.get('best_merge')}** ({_share(v.get('best_min_share_kept'))});"
              f" the claim {'holds' if v.get('some_merge_keeps_80_percent_of_both') else 'does not hold'} here."]
    return "\n".join(lines), {"rows": rows, "verdict": v}


def logit_sum(d: Path, rec: dict) -> tuple[str, dict]:
    s = _json(d / "results.json")["sum"]
    rows = s["perplexity"]
    lines = ["| model | GSM8K ppl | OpenStax ppl | novels ppl |", "|---|---|---|---|"]
    for name, p in rows.items():
        lines.append(f"| {name} | {p['gsm8k']:.3f} | {p['openstax']:.3f} | {p['novels']:.3f} |")
    tr = s.get("training", {})
    lines += ["", f"Heads trained on {tr.get('tokens') or 0:,} tokens of a half-GSM8K, half-general mix in "
                  f"{_t(tr.get('seconds'))}."]
    ans = s.get("answers")
    if ans:
        names = [k for k in ans if k not in ("prompts", "format")]
        lines += ["", "Greedy answers (`Question: …\\nAnswer:`):", "",
                  "| question | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for i, q in enumerate(ans["prompts"]):
            cells = [ans[n][i].replace("|", "\\|").replace("\n", " ")[:80] for n in names]
            lines.append(f"| {q} | " + " | ".join(cells) + " |")
    v = s["verdict"]
    lines += ["", "Rule: a trained sum (the better weighting) within 5 % of `math` on GSM8K and within 2 % of "
                  "`healed` on general text."]
    for label, e in (v.get("each") or {v.get("row", "sum"): v}).items():
        lines.append(f"- {label}, heads trained: GSM8K vs math {_pct(e['gsm8k_vs_math'])}, general vs healed "
                     f"{_pct(e['general_vs_healed'])}.")
    lines.append(f"- The claim {'holds' if v['holds'] else 'does not hold'}"
                 f"{' (' + v['row'] + ')' if v.get('row') else ''}.")
    return "\n".join(lines), {"verdict": v, "rows": rows}


def proxy(d: Path, rec: dict) -> tuple[str, dict]:
    s = _json(d / "results.json")["proxy"]
    lines = ["| model | GSM8K ppl | gap closed |", "|---|---|---|"]
    for name, p in s["gsm8k_perplexity"].items():
        alpha = name.split()[-1] if name.startswith("proxy") else None
        lines.append(f"| {name} | {p:.3f} | {_share(s['gap_closed'].get(alpha)) if alpha else '—'} |")
    best = max(s["gap_closed"].items(), key=lambda kv: kv[1])
    lines += ["", "Gap closed = (healed − proxy) / (healed − math) on GSM8K perplexity (the paper reports "
                  "88–91 % of the gap on its benchmarks, with 7B/13B experts steering 70B).",
              f"- Best: α = {best[0]}, {_share(best[1])} of the gap closed."]
    return "\n".join(lines), {"gap_closed": s["gap_closed"]}


def contrastive(d: Path, rec: dict) -> tuple[str, dict]:
    s = _json(d / "results.json")["cd"]
    lines = ["| decoding | repeated 2-grams | repeated 4-grams | distinct-1 | distinct-2 | ppl under healed |",
             "|---|---|---|---|---|---|"]
    rows = {k: v for k, v in s.items() if not k.startswith("_")}
    for name, v in rows.items():
        lines.append(f"| {name} | {v['repeated_2gram']:.3f} | {v['repeated_4gram']:.3f} | {v['distinct_1']:.3f} | "
                     f"{v['distinct_2']:.3f} | {v['ppl_under_healed']:.2f} |")
    ex = s.get("_example", {})
    if ex:
        lines += ["", f"Prompt: “{s.get('_prompt_example', '').strip()[:300]}”", ""]
        for beta, text in ex.items():
            lines.append(f"- β {beta}: “{text.strip()[:300]}”")
    return "\n".join(lines), {"rows": rows}


def co_llm(d: Path, rec: dict) -> tuple[str, dict]:
    r = _json(d / "results.json")
    rows = r["rows"]
    lines = ["| model | GSM8K ppl | OpenStax ppl | novels ppl | mixed ppl | GSM8K hard switch | deferred GSM8K / "
             "OpenStax / novels |", "|---|---|---|---|---|---|---|"]
    for name, p in rows.items():
        t = p.get("best_threshold_on_gsm8k")
        t = "—" if t is None else f"{t:.10g}" if t > 0.999 else f"{t:.3g}"  # a confident gate's threshold is near 1
        hs = f"{p['gsm8k_hard_switch']:.3f} (t={t})" if "gsm8k_hard_switch" in p else "—"
        dr = " / ".join(_share(p.get(f"{s}_deferred")) for s in ("gsm8k", "openstax", "novels")) \
            if "gsm8k_deferred" in p else "—"
        lines.append(f"| {name} | {p['gsm8k']:.3f} | {p['openstax']:.3f} | {p['novels']:.3f} | {p['mixed']:.3f} | "
                     f"{hs} | {dr} |")
    by_class = [(name, st, p[f"{st}_deferred_by_class"]) for name, p in rows.items()
                for st in ("gsm8k", "openstax", "novels") if f"{st}_deferred_by_class" in p]
    if by_class:
        classes = ["digits", "operators", "words", "space/punctuation"]
        lines += ["", "Deferred tokens by class, at the threshold chosen on GSM8K:", "",
                  "| model | set | " + " | ".join(classes) + " |", "|---" * (len(classes) + 2) + "|"]
        for name, st, cls in by_class:
            lines.append(f"| {name} | {st} | " + " | ".join(_share(cls.get(c)) for c in classes) + " |")
    tr = r.get("training", {})
    if tr:
        lines += ["", "Training: " + "; ".join(f"{k} {v.get('tokens') or 0:,} tokens in {_t(v.get('seconds'))}"
                                               for k, v in tr.items()) + "."]
    base, asst = rows["base alone (healed)"], rows["assistant alone (math)"]
    verdict = {}
    for k in (k for k in rows if k.startswith("Co-LLM")):
        p = rows[k]
        beats = p["gsm8k"] < min(base["gsm8k"], asst["gsm8k"])
        keeps = max(p[s] / base[s] - 1 for s in ("openstax", "novels"))
        verdict[k] = {"beats_both_on_gsm8k": beats, "general_change": keeps, "holds": beats and keeps <= 0.01}
    lines += ["", "Rule: the pair beats both members on GSM8K (marginal perplexity) while general perplexity stays "
                  "within 1 % of the base's."]
    for k, v in verdict.items():
        lines.append(f"- **{k}**: {'beats' if v['beats_both_on_gsm8k'] else 'does not beat'} both members on GSM8K; "
                     f"general {_pct(v['general_change'])}; the claim {'holds' if v['holds'] else 'does not hold'}.")
    return "\n".join(lines), {"rows": rows, "verdict": verdict}


def deep_fusion(d: Path, rec: dict) -> tuple[str, dict]:
    r = _json(d / "results.json")
    rows = r["rows"]
    lines = ["| model | code-span ppl | prose-in-document ppl | OpenStax ppl | novels ppl | training |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        sp, g, tr = row["spans"], row["general"], row.get("training") or {}
        lines.append(f"| {name} | {sp['inside_ppl']:.3f} | {sp['outside_ppl']:.3f} | {g['openstax']:.4f} | "
                     f"{g['novels']:.4f} | {(str(tr.get('tokens') or 0) + ' tokens, ' + _t(tr.get('seconds'))) if tr else '—'} |")
    v = r["verdict"]
    lines += ["", f"- Code-span perplexity gain: deep fusion {_share(v['code_span_gain']['deep fusion'])}, "
                  f"LLaMA-Pro {_share(v['code_span_gain']['LLaMA-Pro'])}.",
              f"- Fence-free text with deep fusion: {'exactly the base' if v['deep_fusion_general_exactly_unchanged'] else 'NOT the base'}"
              f"; LLaMA-Pro: " + ", ".join(f"{k} {_pct(x)}" for k, x in v["llama_pro_general_change"].items()) + "."]
    return "\n".join(lines), {"verdict": v}


def calm(d: Path, rec: dict) -> tuple[str, dict]:
    r = _json(d / "run" / "results.json")
    lines = [f"Bridges trained {r['bridge_steps']} steps; the augmenting model memorized "
             f"{_share(r['augment_memorized'])} of the key values.", "",
             "| model | held-out keys EM | training keys EM | anchor's arithmetic EM |", "|---|---|---|---|"]
    for label, held, seen, arith in r["rows"]:
        lines.append(f"| {label} | {_share(held)} | {_share(seen)} | {_share(arith)} |")
    rows = {label: held for label, held, _, _ in r["rows"]}
    return "\n".join(lines), {"rows": rows}


def family(d: Path, rec: dict) -> tuple[str, dict]:
    md = (d / "family.md").read_text() if (d / "family.md").is_file() else ""
    built = _json(d / "family.json")
    lines = [md.strip(), ""]
    healed = built.get("healed")
    if healed:
        ref = json.loads((Path(healed["dir"]) / "lmexpand.json").read_text())["reference"]
        lines += [f"Healing of `healed` per segment (cap {len(ref['segments'])} segments, stop below "
                  f"{_share(ref['plateau'])} per segment):", "",
                  "| segment | tokens | OpenStax valid ppl | novels valid ppl | gain OpenStax | gain novels | time |",
                  "|---|---|---|---|---|---|---|"]
        for s in ref["segments"]:
            lines.append(f"| {s['segment']} | {s['tokens']:,} | {s['ppl']['openstax']:.3f} | {s['ppl']['novels']:.3f} | "
                         f"{_share(s['gain']['openstax'])} | {_share(s['gain']['novels'])} | {_t(s['seconds'])} |")
        png = Path(healed["dir"]).parent / "healed.png"
        if png.is_file():
            shutil.copyfile(png, DOCS / "healed.png")
            lines += ["", "![healing curve](healed.png)"]
    return "\n".join(lines), {}


RENDER: dict[str, Callable[[Path, dict], tuple[str, dict]]] = {
    "family-table": family, "expansion": expansion, "merging": merging, "logit-sum": logit_sum, "proxy": proxy,
    "contrastive": contrastive, "co-llm": co_llm, "deep-fusion": deep_fusion, "calm": calm,
}


def _replace(text: str, name: str, block: str) -> str:
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if start not in text:
        return text
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1] if end in rest else ""
    return f"{head}{start}\n{block}\n{end}{tail}"


def render_all(out: Path, archive: dict | None = None) -> dict[str, tuple[str, dict]]:
    """Each stage's block and facts: from this machine's finished stage when there is one
    (recorded into ``archive``), else from ``archive`` (what an earlier machine measured and
    committed), else "not measured yet"."""
    archive = {} if archive is None else archive
    found = stage_results(out)
    blocks: dict[str, tuple[str, dict]] = {}
    for name, fn in RENDER.items():
        if name in found:
            rec = found[name]["record"]
            md, facts = fn(found[name]["dir"], rec)
            extra = f"; {facts['footer']}" if facts.get("footer") else ""
            md += (f"\n\n*Stage `{name}`: {_t(rec['seconds'])} wall time this run{extra}, finished "
                   f"{rec['finished']}; `.venv/bin/python bench/results.py --only {name}`.*")
            blocks[name] = (md, facts)
            archive[name] = {"key": rec["key"], "finished": rec["finished"], "seconds": rec["seconds"],
                             "md": md, "facts": facts, "summary": SUMMARY[name](facts) if name in SUMMARY else []}
        elif name in archive:
            blocks[name] = (archive[name]["md"], archive[name].get("facts") or {})
        else:
            blocks[name] = ("*Not measured yet: `bench/results.py` has not finished this stage.*", {})
    return blocks

def archive_path(doc: Path) -> Path:
    """The committed record of every measured block, beside the page: a new machine (whose
    caches are empty) renders what earlier machines measured from it instead of losing it."""
    return doc.parent / "results-data.json"


def write_doc(out: Path, doc: Path, family_doc: Path | None = None) -> None:
    global DOCS
    DOCS = doc.parent  # where the plots are copied beside the page
    arch_file = archive_path(doc)
    archive = json.loads(arch_file.read_text()) if arch_file.is_file() else {}
    blocks = render_all(out, archive)
    text = doc.read_text()
    for name, (md, _) in blocks.items():
        text = _replace(text, name, md)
    text = _replace(text, "summary", summary(archive))
    doc.write_text(text)
    tmp = arch_file.with_suffix(".tmp")
    # stages in name order; inside each, the order the renderer gave (rows are in table order)
    tmp.write_text(json.dumps({k: archive[k] for k in sorted(archive)}, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(arch_file)
    family_doc = family_doc or doc.parent / "reference-models.md"
    if family_doc.is_file():
        family_doc.write_text(_replace(family_doc.read_text(), "family-table", blocks["family-table"][0]))

def _sum_expansion(ex: dict) -> list[str]:
    lines = []
    for name, v in ex.get("rows", {}).items():
        verdicts = []
        if name in ex.get("claim", {}):
            verdicts.append("LLaMA-Pro's claim holds" if ex["claim"][name] else "LLaMA-Pro's claim does not hold")
        beaten = ex.get("beaten", {}).get(name)
        if beaten is not None:
            verdicts.append(f"below the frontier ({', '.join(beaten)} better on both)" if beaten else "on the frontier")
        trained = f", {v['trainable'] / 1e6:.0f} M trained" if v.get("trainable") else ""
        lines.append(f"| {name} (expansion) | GSM8K ppl {_pct(v['domain'])} | {_pct(v['general'])} | "
                     f"{v['tokens'] or 0:,} tokens{trained}, {_t(v['seconds'])} | {'; '.join(verdicts)} |")
    return lines


def _sum_merging(mg: dict) -> list[str]:
    best = mg.get("verdict", {}).get("best_merge")
    row = mg.get("rows", {}).get(best, {}) if best else {}
    if not row:
        return []
    return [f"| merge: best = {best} | kept {_share(row['kept']['math'])} math / "
            f"{_share(row['kept']['code'])} code | {_pct(max(row['general_change'].values()))} | "
            f"no training | {'≥ 80 % of both kept' if mg['verdict']['some_merge_keeps_80_percent_of_both'] else 'no merge keeps 80 % of both'} |"]


def _sum_logit_sum(ls: dict) -> list[str]:
    if not ls:
        return []
    v = ls["verdict"]
    return [f"| logit {v.get('row', 'sum, heads trained')} | GSM8K {_pct(v['gsm8k_vs_math'])} vs math | "
            f"{_pct(v['general_vs_healed'])} vs healed | heads only | {'holds' if v['holds'] else 'does not hold'} |"]


def _sum_proxy(px: dict) -> list[str]:
    if not px:
        return []
    best = max(px["gap_closed"].items(), key=lambda kv: kv[1])
    return [f"| proxy-tuning (α {best[0]}) | {_share(best[1])} of the GSM8K gap closed | — | no training | "
            f"{'reproduces' if best[1] >= 0.8 else 'does not reproduce'} the paper's 88–91 % |"]


def _sum_contrastive(cd: dict) -> list[str]:
    rows = cd.get("rows", {})
    g = rows.get("greedy (expert alone)")
    best = min((k for k in rows if k.startswith("CD")), key=lambda k: rows[k]["repeated_4gram"], default=None)
    if not (g and best):
        return []
    every = all(rows[k]["repeated_4gram"] < g["repeated_4gram"] for k in rows if k.startswith("CD"))
    return [f"| contrastive decoding ({best}) | repeated 4-grams {g['repeated_4gram']:.3f} → "
            f"{rows[best]['repeated_4gram']:.3f} | ppl under healed {g['ppl_under_healed']:.2f} → "
            f"{rows[best]['ppl_under_healed']:.2f} | no training | "
            f"{'less repetition at every β' if every else 'more repetition at some β'} |"]


def _sum_co_llm(co: dict) -> list[str]:
    lines = []
    for k, v in co.get("verdict", {}).items():
        p = co["rows"][k]
        lines.append(f"| {k} | GSM8K ppl {p['gsm8k']:.3f} | {_pct(v['general_change'])} | gate"
                     f"{' + base' if 'base' in k.split(',')[-1] else ''} trained | "
                     f"{'holds' if v['holds'] else 'does not hold'} ("
                     f"{'beats' if v['beats_both_on_gsm8k'] else 'does not beat'} both members on GSM8K) |")
    return lines


def _sum_deep_fusion(df: dict) -> list[str]:
    if not df:
        return []
    v = df["verdict"]
    return [f"| deep-fusion experts | code-span ppl −{_share(v['code_span_gain']['deep fusion'])} | "
            f"{'exactly 0' if v['deep_fusion_general_exactly_unchanged'] else 'changed'} | experts only | "
            f"{'holds' if v['deep_fusion_general_exactly_unchanged'] and v['code_span_gain']['deep fusion'] > 0 else 'does not hold'}"
            f" (LLaMA-Pro on the same tokens: −{_share(v['code_span_gain']['LLaMA-Pro'])}) |"]


def _sum_calm(cm: dict) -> list[str]:
    rows = cm.get("rows")
    if not rows:
        return []
    anchor, calm, control = (rows.get(k) for k in ("anchor alone", "composed (CALM)",
                                                   "control: untrained augmenting model"))
    holds = None not in (anchor, calm) and calm > anchor + 0.05 and (control is None or calm > control + 0.05)
    return [f"| CALM (toy key-value) | held-out EM {_share(anchor)} → {_share(calm)} | — | bridges only | "
            f"{'holds' if holds else 'does not hold'} (control: untrained augmenting model {_share(control)}) |"]


# the summary's rows of each stage, from its facts; in this order
SUMMARY: dict[str, Callable[[dict], list[str]]] = {
    "expansion": _sum_expansion, "merging": _sum_merging, "logit-sum": _sum_logit_sum, "proxy": _sum_proxy,
    "contrastive": _sum_contrastive, "co-llm": _sum_co_llm, "deep-fusion": _sum_deep_fusion, "calm": _sum_calm,
}


def summary(archive: dict) -> str:
    """One line per method: domain gain, general change, compute, verdict; the rows each stage
    recorded (render_all records this machine's stages, earlier machines' stay as recorded)."""
    lines = ["| method | domain gain | general change | compute | verdict |", "|---|---|---|---|---|"]
    for name in SUMMARY:
        lines += archive.get(name, {}).get("summary", [])
    if len(lines) == 2:
        lines.append("| *not measured yet* | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Render docs/results.md's tables from bench/results.py's outputs.")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / ".cache" / "results")
    ap.add_argument("--doc", type=Path, default=DOCS / "results.md")
    a = ap.parse_args(argv)
    write_doc(a.out, a.doc)


if __name__ == "__main__":
    main()
