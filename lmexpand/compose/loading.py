"""One loader for any model directory lmexpand writes, composed ones included.

A composed surgery directory holds only its own new tensors and references to its members;
:func:`load_model` asks the registry (:mod:`lmexpand.compose.kinds`) for its kind and calls
the kind's ``load`` hook, which assembles the model after checking that every member still
is what the surgery read (fingerprints in ``lmexpand.json``, :func:`check_members`). Every
other directory is a plain ``AutoModelForCausalLM.from_pretrained``. The helpers below are
what the kinds' hooks share.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from lmexpand.compose.kinds import KINDS, composed_kind, member_references, read_config
from lmexpand.errors import CheckpointError, ConfigError, SourceError
from lmexpand.jsonio import read_json


def model_type(model_dir: Path) -> str | None:
    return read_config(model_dir).get("model_type")


def is_composed(model_dir: Path) -> bool:
    return composed_kind(read_config(model_dir)) is not None


def member_inputs(model_dir: Path) -> list[tuple[str, Path]]:
    """The models a composed directory references (it reads them at run time), as inputs
    for the output checks: an output must not replace a member either."""
    return [(f"{role} (member of the composed model)", Path(p)) for role, p in member_references(read_config(model_dir))]


def modeling_module(kind: str | None) -> Any:
    """The modeling module of a composed model type (it registers its classes on import)."""
    if kind not in KINDS:
        return None
    return importlib.import_module(f"lmexpand.compose.{KINDS[kind].modeling}")


def register_if_composed(model_dir: Path) -> None:
    """Make transformers' Auto classes know the composed config (tokenizer loading reads it)."""
    modeling_module(model_type(model_dir))


def load_model(model_dir: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    kind = model_type(model_dir)
    if is_composed(model_dir):
        if kwargs.get("quantization_config") is not None:
            raise ConfigError(f"4-bit loading is not supported for composed models ({kind}): load the members in "
                              "4 bits is not implemented; train in bf16 or fp32.")
        return KINDS[kind].load(Path(model_dir), dtype=kwargs.get("dtype"))
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def _lineage(model_dir: Path) -> dict[str, Any]:
    f = model_dir / "lmexpand.json"
    return read_json(f, what="lmexpand.json (the model's lineage)", expect=dict, error=SourceError,
                     fix="Restore it from the output that wrote it, or delete it to load the model without its "
                         "lineage.") if f.is_file() else {}


def check_members(model_dir: Path, config: dict[str, Any] | None = None) -> None:
    """Every referenced member exists and has the fingerprint the surgery recorded."""
    from lmexpand.checkpoint.reader import CheckpointReader

    config = config if config is not None else read_config(model_dir)
    recorded = {s.get("path"): s.get("sha256") for s in _lineage(model_dir).get("sources", [])}
    for role, path in member_references(config):
        if not Path(path).is_dir():
            raise CheckpointError(f"{model_dir}: the {role} {path} is gone; the composed model needs it "
                                  "(or export a self-contained copy with `lmexpand export`).")
        want = recorded.get(str(Path(path).resolve()))
        if want and CheckpointReader(path).fingerprint()["sha256"] != want:
            raise CheckpointError(f"{model_dir}: the {role} {path} changed since the surgery (fingerprint "
                                  "differs); the composition was made for the old weights. Run the surgery again "
                                  "on the new model.")


def own_tensors(model_dir: Path, prefix: str) -> dict[str, Any]:
    from lmexpand.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(model_dir, need_family=False)
    try:
        return {t.name[len(prefix):]: reader.get_tensor(t.name) for t in reader if t.name.startswith(prefix)}
    finally:
        reader.close()


def load_own(module: Any, model_dir: Path, prefix: str, what: str) -> None:
    """The directory's tensors under ``prefix`` into ``module`` (built on the meta device),
    every one of them and nothing else."""
    module.to_empty(device="cpu")
    missing, unexpected = module.load_state_dict(own_tensors(model_dir, prefix), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: {what} tensors do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")


def member_from_own_tensors(model_dir: Path, prefix: str, config: Any, dtype: Any) -> Any:
    """A member stored inside the composed directory under ``prefix``."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():  # every weight is loaded below: skip the random init
        member = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = member.load_state_dict(own_tensors(model_dir, prefix), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: the {prefix[:-1]} tensors do not match its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")
    return member
