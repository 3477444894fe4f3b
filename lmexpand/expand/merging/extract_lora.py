"""LoRA extraction: a fine-tune's weight change as a PEFT adapter on its base
(``mergekit-extract-lora``'s job, with its defaults).

Recipe (Hu et al. 2021, *LoRA*, arXiv 2106.09685: ``W' = W + B·A·alpha/r``; the best rank-r
approximation of a matrix is its truncated SVD, Eckart & Young 1936):

1. Check from headers that TUNED and BASE are one family with the same tensors and shapes.
2. For every linear projection of the decoder layers (2-D ``*.weight``), one at a time:
   ``Δ = W_tuned − W_base`` (in the models' dtype, as mergekit), ``Δ = U S Vᵀ`` in fp32,
   ``A = √S_r Vᵀ_r`` and ``B = U_r √S_r`` (the scale split between the factors), cast to the
   models' dtype; ``alpha = r`` so PEFT's scaling is 1. Its relative error
   ``‖Δ − B·A‖_F / ‖Δ‖_F`` is measured with the stored factors. A changed bias of such a
   projection goes into ``lora_B.bias`` (PEFT's ``lora_bias``).
3. Every other tensor that changed (embeddings, head, norms) is stored whole, as PEFT's
   ``modules_to_save`` (named by full path); unchanged ones are left out (mergekit stores
   embeddings and head always, and names modules by their last component).
4. Write ``adapter_model.safetensors``, ``adapter_config.json`` and a README with the error per
   module into a temporary directory beside OUT, renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from lmexpand.errors import ConfigError

if TYPE_CHECKING:
    import torch


def _factors(delta: "torch.Tensor", rank: int, device: str) -> tuple["torch.Tensor", "torch.Tensor", float]:
    """(A, B, relative error) of the rank-``rank`` truncated SVD of ``delta`` (mergekit's
    ``TaskVectorDecompositionTask`` with distribute_scale)."""
    import torch

    work = delta.to(device=device, dtype=torch.float32)
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    r = min(rank, s.shape[0])
    sqrt_s = torch.diag(torch.sqrt(s[:r]))
    a = (sqrt_s @ vh[:r]).to(delta.dtype)
    b = (u[:, :r] @ sqrt_s).to(delta.dtype)
    norm = torch.linalg.matrix_norm(work)
    residual = torch.linalg.matrix_norm(work - b.float() @ a.float())
    error = float(residual / norm) if float(norm) > 0 else 0.0
    return a.cpu(), b.cpu(), error


def extract_lora(tuned: str | Path, base: str | Path, out: str | Path, rank: int, *, force: bool = False,
                 device: str = "cpu", allow_pickle: bool = False,
                 progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Write the adapter; returns the report (modules, ranks, errors, what was stored whole)."""
    import torch
    from safetensors.torch import save_file

    from lmexpand.checkpoint.reader import CheckpointReader
    from lmexpand.checkpoint.sources import resolve_source
    from lmexpand.checkpoint.outpath import check_output

    tuned_path, base_path = resolve_source(tuned), resolve_source(base)
    out = Path(out)
    target = check_output(out, inputs=[("TUNED", tuned_path), ("BASE", base_path)], force=force, label="OUT")
    t_reader = CheckpointReader(tuned_path, allow_pickle=allow_pickle)
    b_reader = CheckpointReader(base_path, allow_pickle=allow_pickle)
    fam = t_reader.family
    problems = []
    if b_reader.family.name != fam.name:
        problems.append(f"TUNED {tuned} is a {fam.name} model but BASE {base} is {b_reader.family.name}")
    names = [i.name for i in t_reader]
    for info in t_reader:
        if info.name not in b_reader:
            problems.append(f"BASE has no tensor {info.name}")
        elif b_reader.info(info.name).shape != info.shape:
            what = "the vocabularies differ" if info.name in (fam.embed, fam.lm_head) else "the models differ in size"
            problems.append(f"{info.name} is {list(info.shape)} in TUNED but {list(b_reader.info(info.name).shape)} "
                            f"in BASE ({what})")
        if len(problems) >= 3:
            break
    missing = [i.name for i in b_reader if i.name not in t_reader][:1]
    if missing and not problems:
        problems.append(f"TUNED has no tensor {missing[0]}")
    if problems:
        raise ConfigError("extract-lora: " + "; ".join(problems) + ". TUNED must be a fine-tune of BASE: the same "
                          "architecture, size and vocabulary.")

    linear = [n for n in names if fam.split_layer_name(n) is not None and n.endswith(".weight")
              and len(t_reader.info(n).shape) == 2]
    biases = {n[:-len(".weight")] + ".bias" for n in linear}
    tensors: dict[str, "torch.Tensor"] = {}
    modules: list[dict[str, Any]] = []
    whole: list[str] = []
    lora_bias = False
    for i, name in enumerate(names):
        if name in biases:
            continue
        t, b = t_reader.get_tensor(name), b_reader.get_tensor(name)
        module = name.rsplit(".", 1)[0]
        if name in linear:
            progress(f"[{i + 1}/{len(names)}] {module}")
            a_f, b_f, error = _factors(t - b, rank, device)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a_f.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b_f.contiguous()
            entry = {"module": module, "shape": list(t.shape), "rank": a_f.shape[0], "relative_error": error}
            bias = module + ".bias"
            if bias in t_reader and not torch.equal(t_reader.get_tensor(bias), b_reader.get_tensor(bias)):
                tensors[f"base_model.model.{module}.lora_B.bias"] = (t_reader.get_tensor(bias)
                                                                     - b_reader.get_tensor(bias)).contiguous()
                lora_bias = True
                entry["bias"] = "delta in lora_B.bias"
            modules.append(entry)
        elif not torch.equal(t, b):
            tensors[f"base_model.model.{name}"] = t.contiguous()
            whole.append(name)
    if not modules:
        raise ConfigError(f"extract-lora: {tuned} has no linear projections in its layers to decompose.")
    t_reader.close()
    b_reader.close()

    max_rank = max(m["rank"] for m in modules)
    different = {m["module"]: m["rank"] for m in modules if m["rank"] != max_rank}
    # full module paths: PEFT matches modules_to_save by suffix, so "norm" would also wrap every
    # layer's input_layernorm (and then expect weights for them)
    saved_modules = sorted({n.rsplit(".", 1)[0] for n in whole})
    if lora_bias:  # PEFT gives every lora_B a bias then: zeros where the projection's bias did not change
        for m in modules:
            key = f"base_model.model.{m['module']}.lora_B.bias"
            if key not in tensors:
                b_weight = tensors[f"base_model.model.{m['module']}.lora_B.weight"]
                tensors[key] = b_weight.new_zeros(b_weight.shape[0])
    config = {
        "base_model_name_or_path": str(base), "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": max_rank, "lora_alpha": max_rank, "rank_pattern": different, "alpha_pattern": different,
        "target_modules": sorted({m["module"].split(".")[-1] for m in modules}),
        "modules_to_save": saved_modules or None, "lora_dropout": 0.0, "fan_in_fan_out": False,
        "bias": "none", "lora_bias": lora_bias, "use_rslora": False, "inference_mode": True,
    }
    errors = [m["relative_error"] for m in modules]
    worst = max(modules, key=lambda m: m["relative_error"])
    report = {"tuned": str(tuned), "base": str(base), "rank": rank, "modules": len(modules),
              "mean_relative_error": sum(errors) / len(errors), "max_relative_error": worst["relative_error"],
              "worst_module": worst["module"], "stored_whole": whole, "per_module": modules}
    lines = ["---", "library_name: peft", "tags: [lora, extracted, lmexpand]", "---", "",
             f"# LoRA of rank {rank} extracted from `{tuned}` over `{base}`", "",
             "Truncated SVD of each linear projection's change (`lmexpand extract-lora`); the relative error is "
             "`‖Δ − B·A‖_F / ‖Δ‖_F` with the stored factors.", "",
             f"Mean relative error {report['mean_relative_error']:.3g}, worst {worst['relative_error']:.3g} "
             f"({worst['module']}).", ""]
    if whole:
        lines += [f"Stored whole (`modules_to_save`): {', '.join(f'`{n}`' for n in whole)}.", ""]
    lines += ["| module | shape | rank | relative error |", "|---|---|---|---|"]
    lines += [f"| `{m['module']}` | {m['shape']} | {m['rank']} | {m['relative_error']:.3g} |" for m in modules]

    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text("\n".join(lines) + "\n")
        (tmp / "extract_lora.json").write_text(json.dumps(report, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def summary_line(report: dict[str, Any], out: Optional[Path] = None) -> str:
    where = f"{out}: " if out else ""
    return (f"{where}rank-{report['rank']} LoRA of {report['modules']} modules, relative error mean "
            f"{report['mean_relative_error']:.3g}, worst {report['max_relative_error']:.3g} ({report['worst_module']})"
            + (f"; stored whole: {len(report['stored_whole'])} tensors" if report["stored_whole"] else ""))
