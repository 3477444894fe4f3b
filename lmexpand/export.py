"""`lmexpand export`: a clean Hugging Face directory with a model card.

The tensors are streamed (raw byte copies) into new shards; the config loses lmexpand's
private keys; tokenizer, chat template and generation config come along; README.md is a
model card recording the lineage (source, surgery and its arguments, what trained, on
what data, for how many tokens) and, if given, the evaluation table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmexpand.checkpoint.reader import LINEAGE_FILE, CheckpointReader
from lmexpand.checkpoint.safetensors_format import TensorSlot
from lmexpand.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE, OutputTensor, RawCopy, write_checkpoint
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
        return json.loads(f.read_text())
    for candidate in (model_dir.parent / "eval" / "results.json", model_dir / "eval" / "results.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def model_card(config: dict[str, Any], lineage: dict[str, Any] | None, results: dict[str, Any] | None,
               n_params: int) -> str:
    arch = (config.get("architectures") or ["?"])[0]
    lines = ["---", "library_name: transformers", "tags: [lmexpand]", "---", "",
             f"# {arch} grown with lmexpand", "",
             f"{n_params:,} parameters, {config.get('num_hidden_layers')} layers. Loads with "
             "`AutoModelForCausalLM.from_pretrained(path)` (no remote code).", ""]
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
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    model_dir = resolve_export_source(spec)
    reader = CheckpointReader(model_dir)
    config = {k: v for k, v in reader.config.items() if k not in PRIVATE_CONFIG_KEYS}
    lineage = reader.lineage()
    results = find_eval_results(model_dir, eval_dir)
    outputs = [OutputTensor(TensorSlot(t.name, t.dtype, t.shape), RawCopy(t)) for t in reader]
    files: dict[str, bytes | Path] = {p.name: p for p in reader.carry_files()}
    files["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    files["README.md"] = model_card(config, lineage, results, reader.total_params).encode()
    if lineage is not None:
        files[LINEAGE_FILE] = (json.dumps(lineage, indent=2) + "\n").encode()
    try:
        return write_checkpoint(out, outputs, files=files, force=force, max_shard_size=max_shard_size,
                                sources=[model_dir], description=f"export -> {Path(out).name}")
    finally:
        reader.close()
