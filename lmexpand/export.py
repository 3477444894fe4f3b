"""`lmexpand export`: a clean Hugging Face directory with a model card.

The tensors are streamed (raw byte copies) into new shards; the config loses lmexpand's
private keys; tokenizer, chat template and generation config come along; README.md is a
model card recording the lineage (source, surgery and its arguments, what trained, on
what data, for how many tokens) and, if given, the evaluation table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmexpand.checkpoint.reader import LINEAGE_FILE, CheckpointReader
from lmexpand.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE, unchanged_tensor, write_checkpoint
from lmexpand.errors import ConfigError

PRIVATE_CONFIG_KEYS = ("_name_or_path", "_model_name_or_path", "_commit_hash", "lmexpand")


def resolve_export_source(spec: str | Path) -> Path:
    from lmexpand.checkpoint.sources import resolve_source

    path = resolve_source(spec)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    return path


def find_eval_results(model_dir: Path, explicit: Path | None) -> dict[str, Any] | None:
    if explicit is not None:
        f = explicit / "results.json" if explicit.is_dir() else explicit
        if not f.is_file():
            raise ConfigError(f"--eval {explicit}: no results.json there; run `lmexpand eval ... --out DIR` first.")
        return _read_results(f, "--eval")
    for candidate in (model_dir.parent / "eval" / "results.json", model_dir / "eval" / "results.json"):
        if candidate.is_file():
            return _read_results(candidate, "the evaluation found beside the model")
    return None


def _read_results(path: Path, what: str) -> dict[str, Any]:
    """An `lmexpand eval` results.json, checked for what the model card reads from it."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: not a readable results.json ({type(e).__name__}: {e}). Run `lmexpand eval "
                          "... --out DIR` again to rewrite it, or give another --eval.") from None
    ppl = results.get("perplexity") if isinstance(results, dict) else None
    rows_ok = isinstance(ppl, dict) and all(
        isinstance(row, dict) and all(isinstance(v, dict) and isinstance(v.get("ppl"), (int, float)) for v in row.values())
        for row in ppl.values())
    if not rows_ok:
        raise ConfigError(f"{what} {path}: not the results.json `lmexpand eval` writes (no perplexity table of "
                          "numbers). Run `lmexpand eval ... --out DIR` again, or give another --eval.")
    return results


def model_card(config: dict[str, Any], lineage: dict[str, Any] | None, results: dict[str, Any] | None,
               n_params: int, remote_code: bool = False) -> str:
    arch = (config.get("architectures") or ["?"])[0]
    kind = config.get("model_type")
    load = ("`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`: a composed model runs several "
            "models at once, a class transformers does not ship, so its modeling file "
            f"`modeling_{kind}.py` comes with it" if remote_code else
            "`AutoModelForCausalLM.from_pretrained(path)` (no remote code)")
    lines = ["---", "library_name: transformers", "tags: [lmexpand]", "---", "",
             f"# {arch} grown with lmexpand", "",
             f"{n_params:,} parameters, {config.get('num_hidden_layers')} layers. Loads with {load}.", ""]
    if lineage:
        chain = list(lineage.get("history") or []) + [lineage]
        lines += ["## Lineage", ""]
        for step in chain:
            if step.get("method"):
                srcs = ", ".join(s.get("path", "?") for s in step.get("sources", []))
                args = ", ".join(f"{k}={v}" for k, v in (step.get("arguments") or {}).items() if v is not None)
                lines.append(f"- surgery **{step['method']}** ({args}) of `{srcs}`: "
                             f"{step.get('parameters_new', 0):,} new parameters"
                             + (", function-preserving at init" if step.get("function_preserving") else ""))
        for run in lineage.get("training") or []:
            lines.append(f"- trained `{run.get('trainable')}` ({run.get('trainable_parameters', 0):,} parameters) for "
                         f"{run.get('steps')} steps / {run.get('tokens', 0):,} tokens on "
                         f"{', '.join(Path(d).name for d in run.get('data', []))}"
                         + (f"; final validation loss {run['final_val_loss']:.4f}" if run.get("final_val_loss") else ""))
        lines.append("")
    if results:
        ppl = results.get("perplexity", {})
        if ppl:
            sets = list(next(iter(ppl.values())))
            lines += ["## Evaluation", "", "| model | " + " | ".join(f"{s} ppl" for s in sets) + " |",
                      "|---" * (len(sets) + 1) + "|"]
            for label, row in ppl.items():
                lines.append(f"| {label} | " + " | ".join(f"{row[s]['ppl']:.4f}" for s in sets) + " |")
            st = results.get("settings", {})
            lines += ["", f"Perplexity on the first {st.get('max_tokens', '?')} tokens of each set "
                      f"(windows of {st.get('seq_len', '?')} tokens).", ""]
    return "\n".join(lines) + "\n"


def export_model(spec: str | Path, out: str | Path, *, force: bool = False, eval_dir: Path | None = None,
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, allow_pickle: bool = False) -> Path:
    from lmexpand.compose.loading import is_composed

    model_dir = resolve_export_source(spec)
    reader = CheckpointReader(model_dir, need_family=False, allow_pickle=allow_pickle)
    readers = [reader]
    config = {k: v for k, v in reader.config.items() if k not in PRIVATE_CONFIG_KEYS}
    lineage = reader.lineage()
    results = find_eval_results(model_dir, eval_dir)
    outputs = [unchanged_tensor(reader, t) for t in reader]
    files: dict[str, bytes | Path] = {p.name: p for p in reader.carry_files()}
    remote_code = is_composed(model_dir)  # members referenced or already inside: the modeling file ships
    if remote_code:
        from lmexpand.compose.exporting import self_contained_sources

        more, modeling_file = self_contained_sources(model_dir, config, readers)
        outputs += more
        files[modeling_file.name] = modeling_file.path
    n_params = sum(math.prod(o.slot.shape) for o in outputs)
    files["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    files["README.md"] = model_card(config, lineage, results, n_params, remote_code=remote_code).encode()
    if lineage is not None:
        files[LINEAGE_FILE] = (json.dumps(lineage, indent=2) + "\n").encode()
    try:
        return write_checkpoint(out, outputs, files=files, force=force, max_shard_size=max_shard_size,
                                sources=[r.path for r in readers], description=f"export -> {Path(out).name}")
    finally:
        for r in readers:
            r.close()
