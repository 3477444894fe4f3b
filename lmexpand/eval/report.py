"""`lmexpand eval`: what expansion gained and what it kept, as JSON, Markdown and plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from lmexpand.errors import ConfigError, NonFiniteError, SourceError
from lmexpand.eval.perplexity import TextSet, logit_difference, perplexity, token_stream
from lmexpand.jsonio import read_json

log = logging.getLogger("lmexpand")

SAMPLE_PROMPTS = (
    "The capital of France is",
    "Question: Tom has 12 apples and gives 5 to Ann. How many apples does Tom have now?\nAnswer:",
    "The human heart pumps blood",
)


def resolve_model(spec: str) -> tuple[Path, Path | None]:
    """A model dir, or a training run dir (its ``model/`` and its metrics)."""
    from lmexpand.checkpoint.sources import resolve_source

    path = resolve_source(spec)
    if (path / "model" / "config.json").is_file():
        metrics = path / "metrics.jsonl"
        return path / "model", metrics if metrics.is_file() else None
    if (path.parent / "metrics.jsonl").is_file() and path.name == "model":
        return path, path.parent / "metrics.jsonl"
    return path, None


def parameter_accounting(model_dir: Path, allow_pickle: bool = False) -> dict[str, int]:
    from lmexpand.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(model_dir, need_family=False, allow_pickle=allow_pickle)  # any architecture
    sizes = {t.name: t.numel for t in reader}
    lineage = reader.lineage() or {}
    new = set(lineage.get("new_parameters") or [])
    trained = set()
    for run in lineage.get("training") or []:
        trained |= set(run.get("changed_tensors") or [])
    total = sum(sizes.values())
    n_trained = sum(sizes.get(n, 0) for n in trained)
    return {"total": total, "new": sum(sizes.get(n, 0) for n in new), "trained": n_trained, "frozen": total - n_trained}


def _load(path: Path):
    import torch

    from lmexpand.compose.loading import load_model, register_if_composed

    register_if_composed(path)
    return load_model(path, dtype=torch.float32).eval()


def _generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> str:
    import torch

    from lmexpand.eval.generation import finite_logits_guard

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                             logits_processor=finite_logits_guard("the sample generations"))
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _row_name(label: str) -> str:
    """How messages name a row: "evaluated model", "base model", "--compare old model"."""
    return {"model": "evaluated model", "base": "base model"}.get(label, f"--compare {label} model")


def unscorable(config: dict[str, Any]) -> str | None:
    """Why a model of this config has no perplexity to report (eval and `run --check` ask), or None."""
    if config.get("plausibility"):
        return ("is a contrastive-decoding composition: its plausibility mask gives probability 0 to every token "
                "outside the expert's plausible set, so its perplexity is infinite on almost any text. It is a "
                "decoding rule: score its generations (`lmexpand generate`), or evaluate the expert and amateur "
                "themselves.")
    return None


def _check_before_scoring(rows: Sequence[tuple[str, Path]], text_sets: Sequence[TextSet], out: Path,
                          seq_len: int, allow_pickle: bool, force: bool = False) -> dict[str, Any]:
    """What would make the scores fail or mean nothing, checked before any model is run:
    --out usable and not an input, every row's tokenizer loadable and the same token->id map
    (perplexities over different tokenizations are not comparable), --seq-len within every
    row's positions."""
    from lmexpand.checkpoint.reader import CheckpointReader
    from lmexpand.checkpoint.tokenizer import load_tokenizer
    from lmexpand.checkpoint.writer import check_output

    names = {"model": "evaluated model", "base": "--base model"}
    from lmexpand.checkpoint.verify import require_structure
    from lmexpand.compose.loading import is_composed, member_inputs, register_if_composed

    inputs = [*((names.get(label, f"--compare {label}"), path) for label, path in rows),
              *(m for _, path in rows for m in member_inputs(path)),
              *((f"--data {t.name}", t.path) for t in text_sets)]
    check_output(out, inputs=inputs, force=True, replaces=False, label="--out")
    from lmexpand.eval.perplexity import check_text_set

    for ts in text_sets:
        check_text_set(ts)
    if not force and out.is_dir() and any(out.iterdir()):
        from lmexpand.errors import TargetError

        raise TargetError(f"--out {out}: exists and is not empty. Pass --force to write the report into it "
                          "(results.json, report.md and the plots are replaced; other files stay), or choose another "
                          "--out.")
    tokenizers: dict[str, Any] = {}
    for label, path in rows:
        # the pickle rule of every command: pickle-only weights need --allow-pickle (then weights-only)
        reader = CheckpointReader(path, allow_pickle=allow_pickle, need_family=False)
        if not is_composed(path):  # a config counting fewer layers than the tensors would drop some silently
            require_structure(reader)
        reader.close()
        register_if_composed(path)  # its config type must be known to load its tokenizer
        tokenizers[label] = load_tokenizer(path, what=_row_name(label))
        cfg = read_json(path / "config.json", what="config.json", expect=dict, error=SourceError,
                        fix="Fix the model's config.json or re-download it.") if (path / "config.json").is_file() else {}
        reason = unscorable(cfg)
        if reason:
            raise ConfigError(f"the {_row_name(label)} {path} {reason}")
        max_pos = cfg.get("max_position_embeddings") or (cfg.get("anchor") or {}).get("max_position_embeddings")
        if isinstance(max_pos, int) and seq_len > max_pos:
            raise ConfigError(f"--seq-len {seq_len} exceeds the {_row_name(label)}'s max_position_embeddings ({max_pos}) "
                              f"({path}). Use --seq-len {max_pos} or less.")
    vocabs = {label: tok.get_vocab() for label, tok in tokenizers.items()}
    ref = vocabs["model"]
    for label, vocab in vocabs.items():
        if vocab != ref:
            diff = len(set(vocab.items()) ^ set(ref.items()))
            raise ConfigError(
                f"the {label} model ({dict(rows)[label]}) and the evaluated model ({dict(rows)['model']}) have different "
                f"tokenizers ({len(vocab):,} vs {len(ref):,} tokens, {diff:,} token->id pairs differ): their "
                "perplexities count different tokens and cannot be compared side by side. Evaluate them separately.")
    return tokenizers


def run_eval(model_spec: str, text_sets: Sequence[TextSet], out: Path, *, base: str | None = None,
             compare: Sequence[tuple[str, str]] = (), max_tokens: int = 16384, seq_len: int = 256,
             stride: int | None = None, samples: bool = True, allow_pickle: bool = False,
             lm_eval: Any = None, force: bool = False) -> dict[str, Any]:
    """Score every row, then (``lm_eval``: :class:`~lmexpand.eval.harness.LmEvalSettings`) run
    lm-evaluation-harness on the evaluated model; write results.json and report.md."""
    if not text_sets:
        raise ConfigError("give at least one --data NAME=FILE to score.")
    names = [t.name for t in text_sets]
    if len(set(names)) != len(names):
        raise ConfigError(f"--data names must be unique, got {names}.")
    stride = stride or seq_len
    model_dir, metrics_path = resolve_model(model_spec)
    rows: list[tuple[str, Path]] = []
    if base is not None:
        rows.append(("base", resolve_model(base)[0]))
    rows += [(label, resolve_model(spec)[0]) for label, spec in compare]
    rows.append(("model", model_dir))
    tokenizers = _check_before_scoring(rows, text_sets, out, seq_len, allow_pickle, force)  # loaded once, used below
    prepared = None
    if lm_eval is not None:
        from lmexpand.eval.harness import prepare_lm_eval

        prepared = prepare_lm_eval(lm_eval)  # tasks, data and device checked before any scoring

    results: dict[str, Any] = {
        "model": str(model_dir), "settings": {"max_tokens": max_tokens, "seq_len": seq_len, "stride": stride},
        "perplexity": {}, "parameters": parameter_accounting(model_dir, allow_pickle),
    }
    loaded: dict[str, Any] = {}
    tokenizer = None  # the first row's, for the MoE load
    model_tokenizer = None  # the evaluated model's, for the samples
    for label, path in rows:
        model, tok = _load(path), tokenizers[label]
        tokenizer = tokenizer or tok
        if label == "model":
            model_tokenizer = tok
        loaded[label] = model
        results["perplexity"][label] = {}
        streams = {ts.name: token_stream(ts, tok, max_tokens) for ts in text_sets}
        for ts in text_sets:
            ids = streams[ts.name]
            try:
                results["perplexity"][label][ts.name] = perplexity(model, ids, seq_len=seq_len, stride=stride)
            except NonFiniteError as e:
                raise NonFiniteError(f"the {_row_name(label)} {path} {e} (text set {ts.name}); nothing was written.") from None
            log.info("%s on %s: ppl %.3f (%d tokens)", label, ts.name,
                     results["perplexity"][label][ts.name]["ppl"], results["perplexity"][label][ts.name]["tokens"])
        if label == "model" and _has_deferral_gate(model):
            from lmexpand.eval.co_llm import deferral_table

            first = deferral_table(model, tok, streams[text_sets[0].name], seq_len)
            best = first["best"]
            results["co_llm"] = {text_sets[0].name: first, **{
                ts.name: deferral_table(model, tok, streams[ts.name], seq_len, at_logit=best["threshold_logit"])
                for ts in text_sets[1:]}}
            log.info("co-llm: best threshold on %s %.10g (%.1f %% deferred, hard-switch ppl %.3f): use it with "
                     "`lmexpand generate --threshold %.10g`", text_sets[0].name, best["threshold"],
                     100 * best["deferral_rate"], best["switch_ppl"], best["threshold"])
        if label not in ("base", "model"):
            del loaded[label]
    if "base" in loaded:
        vocab = min(loaded["model"].config.vocab_size, loaded["base"].config.vocab_size)
        try:
            results["function_preservation"] = logit_difference(loaded["model"], loaded["base"], vocab_size=vocab)
        except NonFiniteError as e:
            raise NonFiniteError(f"{e} ({dict(rows)['model']} vs {dict(rows)['base']}); nothing was written.") from None
    if samples:
        # the model was loaded once above; its tokenizer serves both rows' prompts
        results["samples"] = [{"prompt": p, "model": _generate(loaded["model"], model_tokenizer, p),
                               **({"base": _generate(loaded["base"], model_tokenizer, p)} if "base" in loaded else {})}
                              for p in SAMPLE_PROMPTS]
    from lmexpand.eval.moe import expert_load

    results["moe"] = expert_load(loaded["model"], token_stream(text_sets[0], tokenizer, 2048), seq_len=seq_len)
    if lm_eval is not None:
        from lmexpand.eval.harness import run_lm_eval

        results["lm_eval"] = run_lm_eval(loaded["model"], model_tokenizer, lm_eval, prepared, out)
    if metrics_path is not None:
        results["training_log"] = str(metrics_path)
    write_report(results, out, metrics_path)
    return results


def write_report(results: dict[str, Any], out: Path, metrics_path: Path | None) -> None:
    """results.json, report.md and the plots, each written beside itself and renamed into
    place (a kill leaves the previous file or the new one, never half of one; what a killed
    run left is removed by the next); a full disk is a :class:`DiskFullError`."""
    import errno
    import os

    from lmexpand.checkpoint.writer import clean_stale_partials, partial_path
    from lmexpand.errors import DiskFullError, TargetError
    from lmexpand.faults import io_fault, kill_point

    def atomic(name: str, write) -> None:
        tmp = partial_path(out / name)
        try:
            io_fault(1)  # (the disk-full tests)
            write(tmp)
            os.replace(tmp, out / name)
        finally:
            if tmp.exists():
                tmp.unlink()

    try:
        clean_stale_partials(out)  # beside --out, and inside it
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_partials(out / "results.json")
        kill_point("eval:before-report")
        plots = []
        if metrics_path is not None:
            atomic("loss.png", lambda p: _plot_losses(metrics_path, p))
            plots.append("loss.png")
        atomic("perplexity.png", lambda p: _plot_perplexity(results["perplexity"], p))
        plots.append("perplexity.png")
        if results.get("moe"):
            atomic("expert_load.png", lambda p: _plot_expert_load(results["moe"], p))
            plots.append("expert_load.png")
        if results.get("co_llm"):
            from lmexpand.eval.co_llm import plot

            atomic("co_llm.png", lambda p: plot(results["co_llm"], p))
            plots.append("co_llm.png")
        results["plots"] = plots
        text = json.dumps(results, indent=2, allow_nan=False) + "\n"  # (every score was checked finite)
        atomic("results.json", lambda p: p.write_text(text))
        atomic("report.md", lambda p: p.write_text(render_markdown(results)))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"--out {out}: the disk filled up while writing the report ({e.strerror}); no file "
                                "was left half-written. Free some space (the report takes well under a MB) or choose "
                                "another --out, and run eval again.") from None
        raise TargetError(f"--out {out}: cannot write the report ({e.strerror or e}). Check the directory and "
                          "try again.") from None


def _has_deferral_gate(model: Any) -> bool:
    """A composed kind whose gate defers to a member (Co-LLM): its report adds the deferral table."""
    from lmexpand.compose.kinds import KINDS

    declared = KINDS.get(getattr(model.config, "model_type", None))
    return bool(declared and declared.deferral_gate)


def fmt(x: float) -> str:
    """Numbers as printed in report.md (and compared with results.json by the tests)."""
    return f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"


def render_markdown(r: dict[str, Any]) -> str:
    ppl = r["perplexity"]
    sets = list(next(iter(ppl.values())))
    lines = [f"# Evaluation of `{r['model']}`", ""]
    s = r["settings"]
    lines += [f"Perplexity on the first {s['max_tokens']:,} tokens of each set, windows of {s['seq_len']} "
              f"tokens, stride {s['stride']}.", ""]
    lines += ["| model | " + " | ".join(f"{n} ppl" for n in sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for label, row in ppl.items():
        lines.append(f"| {label} | " + " | ".join(fmt(row[n]["ppl"]) for n in sets) + " |")
    if "base" in ppl and "model" in ppl:
        lines += ["", "Change vs base:", ""]
        for n in sets:
            b, m = ppl["base"][n]["ppl"], ppl["model"][n]["ppl"]
            lines.append(f"- {n}: {fmt(b)} -> {fmt(m)} ({100 * (m - b) / b:+.2f} %)")
    p = r["parameters"]
    lines += ["", "## Parameters", "", "| total | new (surgery) | trained | frozen |", "|---|---|---|---|",
              f"| {p['total']:,} | {p['new']:,} | {p['trained']:,} | {p['frozen']:,} |"]
    if "function_preservation" in r:
        fp = r["function_preservation"]
        lines += ["", "## Function preservation vs base", "",
                  f"max |Δlogit| = {fp['max_abs_dlogit']:.6g}, mean |Δlogit| = {fp['mean_abs_dlogit']:.6g} "
                  "(fixed padded batch of 4 × 48 random tokens)."]
    if r.get("moe"):
        m = r["moe"]
        lines += ["", "## MoE expert load", "",
                  f"{m['routers']} routers, {m['experts']} experts, top-{m['top_k']}: expert load ranges from "
                  f"{m['min_load']:.4f} to {m['max_load']:.4f} (balanced: {m['balanced_load']:.4f}) "
                  f"on the first 2,048 tokens of the first text set; per layer in results.json."]
    if r.get("co_llm"):
        from lmexpand.eval.co_llm import render

        lines += render(r["co_llm"])
    if r.get("lm_eval"):
        from lmexpand.eval.harness import render as render_harness

        lines += render_harness(r["lm_eval"])
    for plot in r.get("plots", []):
        lines += ["", f"![{plot}]({plot})"]
    if r.get("samples"):
        lines += ["", "## Samples (greedy, 32 tokens)", ""]
        for smp in r["samples"]:
            lines.append(f"**Prompt:** {smp['prompt']!r}")
            for who in ("base", "model"):
                if who in smp:
                    lines.append(f"- {who}: {smp[who]!r}")
            lines.append("")
    return "\n".join(lines) + "\n"


def _plot_losses(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    train = [(r["step"], r["loss"]) for r in rec if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rec if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)


def _plot_perplexity(ppl: dict[str, dict[str, dict[str, float]]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(ppl)
    sets = list(next(iter(ppl.values())))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(sets) * len(labels) ** 0.5 + 4), 4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [j + i * width for j in range(len(sets))]
        vals = [ppl[label][s]["ppl"] for s in sets]
        bars = ax.bar(xs, vals, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(sets))], sets)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("perplexity by text set")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)


def _plot_expert_load(moe: dict[str, Any], png: Path) -> None:
    """Layer x expert heatmap of the fraction of routing choices, relative to balanced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(moe["load"])
    grid = np.array([moe["load"][n] for n in names]) / moe["balanced_load"]
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.35 * grid.shape[1]), min(12, 2 + 0.25 * grid.shape[0])))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer (router)")
    ax.set_yticks(range(len(names)), [n.split(".layers.")[-1].split(".")[0] for n in names], fontsize=7)
    ax.set_title(f"expert load / balanced load (top-{moe['top_k']}, {moe['experts']} experts)")
    fig.colorbar(im, ax=ax, label="x balanced (1 = balanced)")
    fig.tight_layout()
    fig.savefig(png, dpi=110, format="png")
    plt.close(fig)
