"""The composed half of ``lmexpand export``: a composed directory made self-contained.

Every member's tensors go inside (prefixed as the composed model names them, by the kind's
``self_contained`` hook), member paths are cleared, and the kind's modeling file ships
beside them (``auto_map``: loading needs ``trust_remote_code=True``, not lmexpand).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.checkpoint.safetensors_format import TensorSlot
from lmexpand.checkpoint.writer import OutputTensor, RawCopy
from lmexpand.compose.kinds import KINDS


def self_contained_sources(model_dir: Path, config: dict[str, Any],
                           readers: list[CheckpointReader]) -> tuple[list[OutputTensor], Any]:
    """The members' tensors to add to the export of ``model_dir`` (whose reader is
    ``readers[0]``), ``config`` edited to match, and the modeling file to ship (``name``,
    ``path``). Members' readers are appended to ``readers``."""
    from lmexpand.compose.loading import check_members, modeling_module

    check_members(model_dir, config)
    kind = KINDS[config["model_type"]]
    modeling = modeling_module(kind.model_type)
    own = {t.name for t in readers[0]}
    out = kind.self_contained(config, own, readers)
    stem = f"modeling_{kind.model_type}"
    config["auto_map"] = {"AutoConfig": f"{stem}.{kind.config_class}",
                          "AutoModelForCausalLM": f"{stem}.{kind.model_class}"}
    return out, SimpleNamespace(name=f"{stem}.py", path=Path(modeling.__file__))


def embedded_member(prefix: str, path: str, own: set[str], readers: list[CheckpointReader]) -> list[OutputTensor]:
    """A member's tensors under ``prefix``, except those the composition holds itself (a
    trained head). Its head is always written out (a tied member's from its embedding
    bytes): the exported config unties every member, so nothing depends on how a nested
    model re-ties its weights when loaded."""
    member = CheckpointReader(path)
    readers.append(member)
    fam = member.family
    out = [OutputTensor(TensorSlot(prefix + t.name, t.dtype, t.shape), RawCopy(t)) for t in member
           if prefix + t.name not in own]
    if prefix + fam.lm_head not in own and fam.lm_head not in member:
        emb = member.info(fam.embed)
        out.append(OutputTensor(TensorSlot(prefix + fam.lm_head, emb.dtype, emb.shape), RawCopy(emb)))
    return out
