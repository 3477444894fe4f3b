"""Integrity checks of a model directory: recorded shard hashes, config/tensor agreement,
finite values.

Every directory lmexpand writes records each weight file's sha256 and size in
``lmexpand.json`` (``"shards"``). :func:`verify_shards` recomputes them (training calls it
before loading a model); :func:`verify` adds the structural checks of ``lmexpand verify``:
the tensors are exactly what the config's architecture expects (names and shapes, from a
model built on the ``meta`` device: nothing allocated), and the new tensors (or all, on
request) hold no NaN or Inf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lmexpand.checkpoint.limits import SIZE_LIMITS, check_config_sizes
from lmexpand.checkpoint.reader import LINEAGE_FILE, CheckpointReader
from lmexpand.errors import CheckpointError
from lmexpand.jsonio import read_json

def recorded_shards(model_dir: Path) -> dict[str, dict[str, Any]] | None:
    path = Path(model_dir) / LINEAGE_FILE
    if not path.is_file():
        return None
    lineage = read_json(path, what="the lineage file", error=CheckpointError,
                        fix="It is damaged: restore it or re-run the step that wrote it.")
    shards = lineage.get("shards") if isinstance(lineage, dict) else None
    return shards if isinstance(shards, dict) else None


def verify_shards(model_dir: Path, shards: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Problems with the recorded shard hashes of ``model_dir`` (empty: all match, or none
    recorded). Checks sizes first (free), then sha256 of every recorded file. ``shards``:
    the record, when the caller has already read it."""
    from lmexpand.checkpoint.hashing import sha256_file

    model_dir = Path(model_dir)
    shards = recorded_shards(model_dir) if shards is None else shards
    if not shards:
        return []
    problems = []
    for name, rec in shards.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            problems.append(f"{name!r}: not a plain file name (a hostile lineage file)")
            continue
        path = model_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != rec.get("bytes"):
            problems.append(f"{name}: {path.stat().st_size:,} bytes, {rec.get('bytes'):,} recorded")
    if problems:
        return problems
    for name, rec in shards.items():
        if sha256_file(model_dir / name) != rec.get("sha256"):
            problems.append(f"{name}: sha256 differs from the recorded one (the file changed after it was written)")
    weight_files = {p.name for p in model_dir.glob("*.safetensors")}
    unrecorded = sorted(weight_files - set(shards))
    if unrecorded:
        problems.append(f"{unrecorded[0]}: a weight file no hash was recorded for")
    return problems


def require_intact(model_dir: Path) -> None:
    """Raise if ``model_dir``'s shards do not match their recorded hashes (training calls this)."""
    problems = verify_shards(model_dir)
    if problems:
        raise CheckpointError(
            f"{model_dir}: the weights do not match the sha256 recorded when lmexpand wrote them: "
            + "; ".join(problems[:3]) + ". The files are corrupted or were modified: re-run the surgery "
            "(or restore the files). Run `lmexpand verify " + str(model_dir) + "` for the full list."
        )


@dataclass
class Report:
    path: str
    hashes: str = "not recorded"
    shards_checked: int = 0
    structure: str = "not checked"
    tensors: int = 0
    values_checked: int = 0
    values_scope: str = "none"
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _expected_shapes(model_dir: Path, config: Mapping[str, Any]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Parameter/buffer shapes of the architecture the config names, and the names that may
    be absent from the file (tied head, non-persistent buffers): from the family's own
    formula for the dense families lmexpand knows (no torch import: surgery stays at copy
    speed), else from the model built on ``meta``."""
    from lmexpand.checkpoint.families import FAMILIES

    family = next((f for f in FAMILIES.values() if config.get("model_type") in f.model_types), None)
    known = family.expected_shapes(config) if family is not None else None
    if known is not None:
        return known
    return _meta_shapes(model_dir)


def _meta_shapes(model_dir: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    state = model.state_dict()
    optional = set()
    if getattr(cfg, "tie_word_embeddings", False) or getattr(cfg.get_text_config(), "tie_word_embeddings", False):
        optional.add("lm_head.weight")
    optional |= {n for n, _ in model.named_buffers()} - set(state)
    return {k: tuple(v.shape) for k, v in state.items()}, optional


def _check_structure(reader: CheckpointReader, report: Report) -> None:
    from lmexpand.checkpoint.moe_layout import param_name, piece_shape

    try:
        expected, optional = _expected_shapes(reader.path, reader.config)
    except Exception as e:  # transformers raises many kinds for a config it cannot build
        report.problems.append(f"config.json: transformers cannot build the architecture it names ({e})")
        return
    covered = set()
    for t in reader:
        pname, piece = param_name(t.name)
        if pname not in expected:
            report.problems.append(f"{t.name}: a tensor the config's architecture does not have")
            continue
        want = piece_shape(expected[pname], piece)
        if tuple(t.shape) != want:
            report.problems.append(f"{t.name}: shape {list(t.shape)}, the config implies {list(want)}")
        covered.add(pname)
    missing = sorted(set(expected) - covered - optional)
    for name in missing[:10]:
        report.problems.append(f"{name}: missing from the weight files")
    if len(missing) > 10:
        report.problems.append(f"... and {len(missing) - 10} more missing tensors")
    report.structure = "names and shapes match the config" if not report.problems else "mismatch"


def require_structure(reader: CheckpointReader) -> None:
    """Every tensor's name and shape as the config's architecture implies, or a
    :class:`CheckpointError` naming the first difference (surgery calls this before it
    writes: a wrong q_proj shape was once reported function-preserving; a config that counts
    fewer layers than the tensors hold would silently drop layers)."""
    report = Report(path=str(reader.path))
    _check_structure(reader, report)
    if report.problems:
        more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
        raise CheckpointError(
            f"{reader.path}: the weights do not match config.json: {report.problems[0]}{more}. Fix config.json or "
            f"use the weights it belongs to (`lmexpand verify {reader.path}` lists every difference).")


VALUE_SCOPES = ("written", "new", "all", "none")


def verify(model_dir: str | Path, *, values: str = "written", allow_pickle: bool = False) -> Report:
    """Every check ``lmexpand verify`` runs. ``values``, the tensors scanned for NaN/Inf:
    'written' (the default: every tensor of the weight files lmexpand wrote and recorded in
    lmexpand.json, i.e. the values it is responsible for; none in a directory it did not
    write), 'new' (those lmexpand.json lists as new), 'all', or 'none'."""
    from lmexpand.checkpoint.finite import non_finite_tensors
    from lmexpand.compose.kinds import composed_kind  # (the declarations: data every layer may read)

    model_dir = Path(model_dir)
    reader = CheckpointReader(model_dir, need_family=False, allow_pickle=allow_pickle)
    check_config_sizes(reader.config, str(model_dir / "config.json"))
    report = Report(str(model_dir), tensors=len(reader.tensors))
    shards = recorded_shards(model_dir)
    if shards:
        problems = verify_shards(model_dir, shards)
        report.problems += problems
        report.shards_checked = len(shards)
        report.hashes = "match" if not problems else "MISMATCH"
    kind = reader.config.get("model_type")
    declared = composed_kind(reader.config)
    if declared is not None:
        prefixes = declared.tensor_prefixes
        bad = [t.name for t in reader if not t.name.startswith(prefixes)]
        report.problems += [f"{n}: not a tensor of a composed model ({kind}: {', '.join(prefixes)}...)" for n in bad]
        report.structure = f"composed ({kind}): its tensors are checked against the config when loaded"
    else:
        _check_structure(reader, report)
    if values not in VALUE_SCOPES:
        raise ValueError(f"values={values!r}")
    if values != "none":
        lineage = reader.lineage() or {}
        if values == "all":
            names = [t.name for t in reader]
        elif values == "written":
            names = [t.name for t in reader if t.file.name in (shards or {})]
        else:
            names = [n for n in lineage.get("new_parameters") or [] if n in reader]
        for name, bad, numel in non_finite_tensors(reader, names):
            report.problems.append(f"{name}: {bad:,} NaN/Inf values of {numel:,}")
        report.values_checked = len(names)
        report.values_scope = values
    reader.close()
    return report


def human_report(r: Report) -> list[str]:
    lines = [
        f"{r.path}: {'OK' if r.ok else 'FAILED'}",
        f"  shard hashes: {r.hashes}" + (f" ({r.shards_checked} files)" if r.shards_checked else
                                         " (not written by lmexpand, or by a version before hashes)"),
        f"  structure: {r.structure} ({r.tensors} tensors)",
        f"  finite values: {r.values_checked} tensors checked" + {
            "written": " (every tensor lmexpand wrote)" if r.values_checked else
                       " (lmexpand recorded no weight file here: --values all scans every tensor)",
            "new": " (the new tensors)", "all": " (every tensor)", "none": " (--values none)"}[r.values_scope],
    ]
    lines += [f"  problem: {p}" for p in r.problems]
    return lines


__all__ = ["SIZE_LIMITS", "Report", "check_config_sizes", "human_report", "require_intact", "verify",
           "verify_shards"]
