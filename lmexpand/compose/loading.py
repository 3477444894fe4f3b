"""One loader for any model directory lmexpand writes, composed ones included.

A composed surgery directory (CALM, logit compositions) holds only its own new tensors
and references to its members; :func:`load_model` assembles the composed model after
checking that every member still is what the surgery read (fingerprints in
``lmexpand.json``). Every other directory is a plain ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmexpand.checkpoint.composed import is_composed_config, member_references, read_config
from lmexpand.errors import CheckpointError, ConfigError

CALM_TYPE = "lmexpand_calm"
LOGITS_TYPE = "lmexpand_logits"
CO_LLM_TYPE = "lmexpand_co_llm"
DEEP_FUSION_TYPE = "lmexpand_deep_fusion"


def model_type(model_dir: Path) -> str | None:
    return read_config(model_dir).get("model_type")


def is_composed(model_dir: Path) -> bool:
    return is_composed_config(read_config(model_dir))


def member_inputs(model_dir: Path) -> list[tuple[str, Path]]:
    """The models a composed directory references (it reads them at run time), as inputs
    for the output checks: an output must not replace a member either."""
    return [(f"{role} (member of the composed model)", Path(p)) for role, p in member_references(read_config(model_dir))]


def modeling_module(kind: str | None) -> Any:
    """The modeling module of a composed model type (it registers its classes on import)."""
    if kind == CALM_TYPE:
        import lmexpand.compose.calm_modeling as m
    elif kind == LOGITS_TYPE:
        import lmexpand.compose.logits_modeling as m
    elif kind == CO_LLM_TYPE:
        import lmexpand.compose.co_llm_modeling as m
    elif kind == DEEP_FUSION_TYPE:
        import lmexpand.compose.deep_fusion_modeling as m
    else:
        return None
    return m


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
        loader = {CALM_TYPE: load_calm, LOGITS_TYPE: load_logit_composition, CO_LLM_TYPE: load_co_llm,
                  DEEP_FUSION_TYPE: load_deep_fusion}[kind]
        return loader(Path(model_dir), dtype=kwargs.get("dtype"))
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def _lineage(model_dir: Path) -> dict[str, Any]:
    f = model_dir / "lmexpand.json"
    return json.loads(f.read_text()) if f.is_file() else {}


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


def _own_tensors(model_dir: Path, prefix: str) -> dict[str, Any]:
    from lmexpand.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(model_dir, need_family=False)
    try:
        return {t.name[len(prefix):]: reader.get_tensor(t.name) for t in reader if t.name.startswith(prefix)}
    finally:
        reader.close()


def _load_own(module: Any, model_dir: Path, prefix: str, what: str) -> None:
    """The directory's tensors under ``prefix`` into ``module`` (built on the meta device),
    every one of them and nothing else."""
    module.to_empty(device="cpu")
    missing, unexpected = module.load_state_dict(_own_tensors(model_dir, prefix), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: {what} tensors do not match the config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")


def load_calm(model_dir: Path, dtype: Any = None) -> Any:
    """Bridges from ``model_dir``, both models from the paths the surgery recorded (or,
    in a self-contained export, from the directory itself)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    from lmexpand.compose.calm_modeling import CalmConfig, CalmForCausalLM

    config = CalmConfig.from_pretrained(model_dir)
    dtype = dtype or torch.float32
    if not config.anchor_path:  # self-contained (exported)
        return CalmForCausalLM.from_pretrained(model_dir, dtype=dtype)
    check_members(model_dir)
    with torch.device("meta"):
        model = CalmForCausalLM(config)
    from transformers.utils import logging as hf_logging

    model.anchor = AutoModelForCausalLM.from_pretrained(config.anchor_path, dtype=dtype)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the augmenting model's lm_head is not needed: no load report for it
    try:
        model.augment = AutoModel.from_pretrained(config.augment_path, dtype=dtype)
    finally:
        hf_logging.set_verbosity(level)
    _load_own(model.bridges, model_dir, "bridges.", "bridge")
    return model.float() if dtype == torch.float32 else model


def load_logit_composition(model_dir: Path, dtype: Any = None) -> Any:
    """Members from the paths the surgery recorded; with trained heads, each member's head
    is replaced by the composition's own untied copy (``members.I.lm_head.weight``)."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from lmexpand.compose.logits_modeling import LogitCompositionConfig, LogitCompositionForCausalLM

    config = LogitCompositionConfig.from_pretrained(model_dir)
    dtype = dtype or torch.float32
    if not any(config.member_paths):  # self-contained (exported)
        return LogitCompositionForCausalLM.from_pretrained(model_dir, dtype=dtype)
    check_members(model_dir)
    with torch.device("meta"):
        model = LogitCompositionForCausalLM(config)
    heads = _own_tensors(model_dir, "members.")
    for i, path in enumerate(config.member_paths):
        member = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        weight = heads.pop(f"{i}.lm_head.weight", None)
        if config.trained_heads:
            if weight is None:
                raise CheckpointError(f"{model_dir}: members.{i}.lm_head.weight is missing (the trained head of "
                                      f"{path}); the directory is incomplete.")
            head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
            head.weight = nn.Parameter(weight.to(torch.float32), requires_grad=True)
            member.lm_head = head
            member.config.tie_word_embeddings = False
        model.members[i] = member
    if heads:
        raise CheckpointError(f"{model_dir}: tensors that match no member head: {sorted(heads)[:3]}.")
    return model.float() if dtype == torch.float32 else model


def load_co_llm(model_dir: Path, dtype: Any = None) -> Any:
    """The gate from ``model_dir``, base and assistant from the recorded paths."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmexpand.compose.co_llm_modeling import CoLlmConfig, CoLlmForCausalLM

    config = CoLlmConfig.from_pretrained(model_dir)
    dtype = dtype or torch.float32
    if not config.base_path and not config.assistant_path:  # self-contained (exported)
        return CoLlmForCausalLM.from_pretrained(model_dir, dtype=dtype)
    check_members(model_dir)
    with torch.device("meta"):
        model = CoLlmForCausalLM(config)
    for which in ("base", "assistant"):
        path = getattr(config, f"{which}_path")
        if path:
            setattr(model, which, AutoModelForCausalLM.from_pretrained(path, dtype=dtype))
        else:  # trained into this directory (--trainable gate+base)
            setattr(model, which, _from_own_tensors(model_dir, f"{which}.", config.member_config(which), dtype))
    _load_own(model.gate, model_dir, "gate.", "gate")
    model.gate.float()
    return model.float() if dtype == torch.float32 else model


def _from_own_tensors(model_dir: Path, prefix: str, config: Any, dtype: Any) -> Any:
    """A member stored inside the composed directory under ``prefix``."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():  # every weight is loaded below: skip the random init
        member = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = member.load_state_dict(_own_tensors(model_dir, prefix), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: the {prefix[:-1]} tensors do not match its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}).")
    return member


def load_deep_fusion(model_dir: Path, dtype: Any = None) -> Any:
    """Experts from ``model_dir``, the source from the recorded path; routing re-attached."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmexpand.compose.deep_fusion_modeling import DeepFusionConfig, DeepFusionForCausalLM

    config = DeepFusionConfig.from_pretrained(model_dir)
    dtype = dtype or torch.float32
    if not config.source_path:  # self-contained (exported)
        return DeepFusionForCausalLM.from_pretrained(model_dir, dtype=dtype)
    check_members(model_dir)
    with torch.device("meta"):
        model = DeepFusionForCausalLM(config)
    model.source = AutoModelForCausalLM.from_pretrained(config.source_path, dtype=dtype)
    _load_own(model.experts, model_dir, "experts.", "expert")
    model.attach()
    return model.float() if dtype == torch.float32 else model
