"""The trained model as a full Hugging Face directory.

Only what training changed comes from memory: the trainable tensors, and the weights LoRA
adapters touch (merged as ``W_source + ΔW`` from the *source* tensor, so a 4-bit frozen base
never leaks quantization error into the output). Every other tensor is copied from the
source checkpoint byte for byte by the streaming writer.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Callable

from lmexpand.checkpoint.reader import LINEAGE_FILE, CheckpointReader, torch_dtype_name
from lmexpand.checkpoint.safetensors_format import TensorSlot
from lmexpand.checkpoint.writer import Computed, OutputTensor, RawCopy, unchanged_tensor, write_checkpoint
from lmexpand.train.config import TrainConfig


def changed_tensors(reader: CheckpointReader, model: Any,
                    full: dict[str, Any] | None = None) -> dict[str, Callable[[], Any]]:
    """Saved tensor name -> function giving its new value, for everything training changed.

    ``full``: parameter name -> full value, where the model's own parameters are shards
    (FSDP); the model then only says which parameters were trained."""
    import torch

    base = model.base_model.model if hasattr(model, "peft_config") else model
    changed: dict[str, Callable[[], Any]] = {}

    def as_source_dtype(name: str, value: "torch.Tensor") -> "torch.Tensor":
        return value.detach().to("cpu", getattr(torch, torch_dtype_name(reader.info(name).dtype))).contiguous()

    from lmexpand.checkpoint.moe_layout import param_name, piece_of

    params = dict(base.named_parameters())
    buffers = {n: b for n, b in base.named_buffers() if n.endswith("e_score_correction_bias")}  # MoE balancing
    for saved in reader.tensors:
        pname, piece = param_name(saved)
        p = params.get(pname)
        if p is not None and p.requires_grad:
            value = full[pname] if full is not None else p
            changed[saved] = lambda saved=saved, p=value, piece=piece: as_source_dtype(saved, piece_of(p, piece))
        elif saved in buffers:
            changed[saved] = lambda saved=saved: as_source_dtype(saved, buffers[saved])
    for module_name, module in base.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and len(lora_a) and hasattr(module, "get_delta_weight"):
            weight_name = module_name + ".weight"
            adapter = next(iter(lora_a.keys()))

            def merged(weight_name=weight_name, module=module, adapter=adapter):
                with torch.no_grad():
                    delta = module.get_delta_weight(adapter).float().cpu()
                return as_source_dtype(weight_name, reader.get_tensor(weight_name).float() + delta)

            changed[weight_name] = merged
    return changed


def write_trained_model(reader: CheckpointReader, model: Any, cfg: TrainConfig, out: Path,
                        training: dict[str, Any], full: dict[str, Any] | None = None) -> Path:
    changed = changed_tensors(reader, model, full)
    outputs = [
        OutputTensor(TensorSlot(t.name, t.dtype, t.shape), Computed(changed[t.name])) if t.name in changed
        else unchanged_tensor(reader, t)
        for t in reader
    ]
    lineage = reader.lineage() or {"method": None, "new_parameters": []}
    runs = list(lineage.get("training", []))
    runs.append({
        **training,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "trainable": cfg.trainable, "extra_trainable": cfg.extra_trainable,
        "lora": cfg.lora.model_dump() if cfg.lora else None, "load_in_4bit": cfg.load_in_4bit,
        "changed_tensors": sorted(changed),
        "source_model": reader.fingerprint(),
    })
    lineage["training"] = runs
    files: dict[str, bytes | Path] = {p.name: p for p in reader.carry_files()}
    files["config.json"] = reader.path / "config.json"
    embedded, config, member_readers = _embed_trained_members(reader, model)
    if embedded:
        outputs += embedded
        files["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
        runs[-1]["changed_tensors"] = sorted(set(runs[-1]["changed_tensors"]) | {
            o.slot.name for o in embedded if isinstance(o.producer, Computed)})
    files[LINEAGE_FILE] = (json.dumps(lineage, indent=2) + "\n").encode()
    if hasattr(model, "peft_config"):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            for p in Path(d).iterdir():
                files[f"lora_{p.name}"] = p.read_bytes()
    try:
        return write_checkpoint(out, outputs, files=files, force=True,
                                sources=[reader.path, *(r.path for r in member_readers)],
                                description="writing trained model")
    finally:
        for r in member_readers:
            r.close()


def _embed_trained_members(reader: CheckpointReader, model: Any) -> tuple[list[OutputTensor], dict, list]:
    """A composed model whose training changed a member's weights (Co-LLM with
    ``--trainable gate+base``): that member's tensors go into the trained directory under
    its prefix -- trained ones from memory, the rest raw-copied from the member's files --
    and its path is cleared (the member is now part of the composition)."""
    import torch

    from lmexpand.compose.kinds import composed_kind, read_config

    config = read_config(reader.path)
    declared = composed_kind(config)
    members = declared.embeddable_members if declared else {}
    params = dict(model.named_parameters())
    outputs: list[OutputTensor] = []
    readers: list[CheckpointReader] = []
    for prefix, (path_key, config_key) in members.items():
        if not config.get(path_key) or not any(n.startswith(prefix) and p.requires_grad for n, p in params.items()):
            continue
        member = CheckpointReader(config[path_key])
        readers.append(member)
        module = model.get_submodule(prefix[:-1])
        state = {n: p for n, p in module.named_parameters(remove_duplicate=False)}
        fam = member.family
        names = [t.name for t in member] + ([fam.lm_head] if fam.lm_head not in member else [])
        for name in names:
            info = member.info(name if name in member else fam.embed)
            p = state.get(name)
            if p is not None and p.requires_grad:
                outputs.append(OutputTensor(TensorSlot(prefix + name, info.dtype, info.shape), Computed(
                    lambda p=p, dt=info.dtype: p.detach().to("cpu", getattr(torch, torch_dtype_name(dt))).contiguous())))
            else:
                outputs.append(OutputTensor(TensorSlot(prefix + name, info.dtype, info.shape), RawCopy(info)))
        config[path_key] = None
        config[config_key] = {**config[config_key], "tie_word_embeddings": False}
    return outputs, config, readers
