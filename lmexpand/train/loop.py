"""Continued pretraining of the new parameters: one explicit loop over accelerate.

Read top to bottom: set up (data, model, freezing, optimizer, schedule), then the loop
(micro-batches with gradient accumulation, clipping, optimizer and schedule steps,
logging, validation, checkpoints), then the final model, written by the streaming writer
with the source's unchanged tensors copied byte for byte. The same code runs on one CPU,
one GPU, or many processes under ``accelerate launch`` (DDP, FSDP, DeepSpeed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from lmexpand.errors import ConfigError, TrainingDivergedError
from lmexpand.faults import kill_point
from lmexpand.train.config import TrainConfig

log = logging.getLogger("lmexpand")


def lr_lambda(cfg: TrainConfig):
    """Linear warmup to ``lr``, then cosine (or linear) decay to ``min_lr_ratio * lr``."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return factor


def _resume_point(cfg: TrainConfig, resume: bool | Path, force: bool) -> Path | None:
    """Decide where a resume starts; refuse to mix runs silently. Deletes nothing."""
    from lmexpand.train.state import clean_stale_checkpoint_partials, latest_checkpoint

    run_dir = cfg.out
    if resume:
        clean_stale_checkpoint_partials(run_dir)
        ckpt = Path(resume) if isinstance(resume, Path) else latest_checkpoint(run_dir)
        if ckpt is None:
            raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from (looked in {run_dir}/checkpoints). "
                              "Run without --resume to start it.")
        _compare_with_run(cfg, run_dir)
        return ckpt
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise ConfigError(
                f"{run_dir}: exists and is not empty (an earlier run?). Pass --resume to continue it, "
                "--force to start over (its contents are deleted), or choose another --out."
            )
    return None


# settings that decide which tokens each step sees or which parameters train: a resume with
# other values would not continue the run but start another one on top of it
_RESUME_MUST_MATCH = ("seq_len", "batch_size", "grad_accum", "pack", "seed", "val_fraction", "document_masking",
                      "streaming", "chat_template", "trainable", "extra_trainable", "lora", "load_in_4bit")


def _compare_with_run(cfg: TrainConfig, run_dir: Path) -> None:
    """--resume against the settings the run started with (train_config.json): refused when
    the blocks or the trained set would differ (the data itself is compared by fingerprint
    with the checkpoint), stated when only the schedule or logging changes."""
    from lmexpand.validation import first_few, flag_name

    saved_path = run_dir / "train_config.json"
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        return  # (a run of a version before this file, or --resume-from another place: the checkpoint's checks hold)
    current = json.loads(cfg.model_dump_json())
    changed = sorted(k for k in set(saved) | set(current)
                     if saved.get(k) != current.get(k) and k not in ("out", "data", "model"))  # (fingerprinted)
    hard = [k for k in changed if k in _RESUME_MUST_MATCH]
    if hard:
        raise ConfigError("--resume: " + first_few([f"{flag_name(k)} {current.get(k)!r} (the run used {saved.get(k)!r})"
                                                    for k in hard])
                          + f": the steps would not see the blocks or train the parameters the run in {run_dir} did. "
                          "Resume with the run's values, or start a new run (--force, or another --out).")
    if changed:
        log.warning("--resume with settings changed since %s started: %s; they apply from the resumed step on",
                    run_dir, "; ".join(f"{flag_name(k)} {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:10]))


def _load_model(cfg: TrainConfig, model_dir: Path, trainable_hint: set[str] | None, use_bf16: bool):
    import torch

    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if use_bf16 else torch.float32}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        # keep every module that trains (and the head) in full precision
        # patterns are regexes to transformers: escape the dots of module names
        skip = sorted({re.escape(n.rsplit(".", 1)[0]) for n in (trainable_hint or set())} | {"lm_head"})
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if use_bf16 else torch.float32,
            llm_int8_skip_modules=skip,
        )
    from lmexpand.compose.loading import load_model

    return load_model(model_dir, **kwargs)


def _co_llm_gate_init(cfg: TrainConfig, accelerator, loss_model, data, metrics) -> None:
    """Co-LLM's weak-supervision initialisation of the gate (before the main loop, fresh
    optimizer over the gate alone, the first training blocks in order)."""
    import numpy as np
    import torch

    wrapper = accelerator.unwrap_model(loss_model)
    model = wrapper.model
    gate = model.gate.weight
    opt = torch.optim.AdamW([gate], lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)
    blocks = data.train_block_iter(0)
    world, rank = accelerator.num_processes, accelerator.process_index
    for step in range(1, cfg.co_llm_init_steps + 1):
        rows = [next(blocks) for _ in range(cfg.batch_size * world)][rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        ids, labels = wrapper.inputs_and_labels(torch.as_tensor(np.stack(rows)).to(accelerator.device))
        loss, positive = model.lmexpand_init_loss(ids, None, labels)
        loss.backward()
        gate.grad = accelerator.reduce(gate.grad, reduction="mean")
        opt.step()
        opt.zero_grad(set_to_none=True)
        every = max(1, cfg.co_llm_init_steps // 20)  # about 20 lines, whatever the number of steps
        if accelerator.is_main_process and (step % every == 0 or step in (1, cfg.co_llm_init_steps)):
            log.info("co-llm gate init %d/%d: weighted BCE %.4f, pseudo-labels positive %.1f %%", step,
                     cfg.co_llm_init_steps, loss.item(), 100 * positive.item())
        if accelerator.is_main_process:
            if metrics is not None:
                metrics.write(json.dumps({"gate_init_step": step, "gate_init_bce": loss.item(),
                                          "gate_init_positive": positive.item()}) + "\n")


def _param_groups(cfg: TrainConfig, trained: dict, monitor) -> list[dict]:
    """One group, or two for MoE models: routers at lr x moe_router_lr_scale."""
    if not monitor:
        return [{"params": list(trained.values())}]
    from lmexpand.checkpoint.moe_layout import is_router_weight

    routers = [p for n, p in trained.items() if is_router_weight(n)]
    rest = [p for n, p in trained.items() if not is_router_weight(n)]
    groups = [{"params": rest}] if rest else []
    if routers:
        groups.append({"params": routers, "lr": cfg.lr * cfg.moe_router_lr_scale})
    return groups


def _optimizer(cfg: TrainConfig, params: list):
    import torch

    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def train(cfg: TrainConfig, *, resume: bool | Path = False, force: bool = False) -> Path:
    """Run training; returns the final model directory (``cfg.out / "model"``)."""
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from lmexpand.checkpoint.reader import CheckpointReader
    from lmexpand.checkpoint.tokenizer import load_tokenizer
    from lmexpand.checkpoint.sources import resolve_source
    from lmexpand.train.data import fingerprint_sources, load_packed_data
    from lmexpand.train.freeze import add_lora, apply_freezing, print_parameter_table, trainable_names
    from lmexpand.train.loss import CausalLMLoss
    from lmexpand.train.state import TrainState, load_checkpoint, save_checkpoint

    # ---- setup: everything that can fail on bad input fails here, before any write ----
    model_dir = resolve_source(cfg.model)
    from lmexpand.checkpoint.writer import check_output

    # the run directory against every input first: `--out MODEL --force` must never delete MODEL
    from lmexpand.compose.loading import is_composed, member_inputs

    resume_source = [("--resume-from", resume)] if isinstance(resume, Path) else []
    check_output(cfg.out, inputs=[("--model", model_dir), *member_inputs(model_dir),
                                  *(("--data", d.path) for d in cfg.data), *resume_source],
                 force=True, replaces=not resume, label="--out")
    reader = CheckpointReader(model_dir, need_family=False, allow_pickle=cfg.allow_pickle)  # any architecture
    if cfg.verify_hashes:
        from lmexpand.checkpoint.verify import require_intact

        require_intact(model_dir)
    if not is_composed(model_dir):  # a config counting fewer layers than the tensors would drop some silently
        from lmexpand.checkpoint.verify import require_structure

        require_structure(reader)
    from lmexpand.compose.kinds import composed_kind

    declared = composed_kind(reader.config)
    if cfg.co_llm_init_steps and not (declared and declared.gate_init):
        raise ConfigError(f"--co-llm-init-steps initialises a Co-LLM gate; {model_dir} is a "
                          f"{reader.config.get('model_type')} model. Drop the option, or make a Co-LLM model first "
                          "(`lmexpand surgery co-llm BASE ASSISTANT OUT`).")
    max_pos = reader.config.get("max_position_embeddings")
    if max_pos and cfg.seq_len > max_pos:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings ({max_pos}). "
                          f"Use --seq-len {max_pos} or less.")
    if cfg.document_masking and is_composed(model_dir):
        raise ConfigError(f"--document-masking: {model_dir} is a composed model (several models run together), "
                          "whose members take no position ids from lmexpand. Drop --document-masking, or train "
                          "with --no-pack (one document per block) to keep documents apart.")
    resume_from = _resume_point(cfg, resume, force)

    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision="bf16" if use_bf16 else "no",
        log_with="tensorboard" if cfg.tensorboard else None,
        project_dir=str(cfg.out),
    )
    sharded = _check_distribution(accelerator, cfg, resume_from)
    set_seed(cfg.seed)
    from lmexpand.compose.loading import register_if_composed

    register_if_composed(model_dir)
    tokenizer = load_tokenizer(model_dir, what="--model")
    _quiet_datasets()
    with accelerator.main_process_first():
        data = load_packed_data(cfg.data, tokenizer, seq_len=cfg.seq_len, val_fraction=cfg.val_fraction,
                                seed=cfg.seed, streaming=cfg.streaming, pack=cfg.pack,
                                chat_template=cfg.chat_template, document_masking=cfg.document_masking,
                                model=str(cfg.model))

    # trainable set first (on a meta copy it costs nothing), so 4-bit loading can skip it
    hint = _trainable_hint(cfg, model_dir, reader) if cfg.load_in_4bit else None
    model = _load_model(cfg, model_dir, hint, use_bf16)
    names = trainable_names(model, model_dir, cfg)
    apply_freezing(model, names)
    if use_bf16:  # new parameters train in full precision (AdamW on bf16 weights loses updates)
        for n, p in model.named_parameters():
            if n in names:
                p.data = p.data.float()
    if cfg.lean_mlp:
        from lmexpand.train.lean import use_lean_mlps

        use_lean_mlps(model)
    if cfg.lora is not None:
        model = add_lora(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if accelerator.is_main_process:
        print_parameter_table(model)
    params = [p for p in model.parameters() if p.requires_grad]
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # counted before accelerate wraps the model: FSDP leaves each process a shard of each
    n_trainable, trainable_bytes = sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)
    monitor = _router_monitor(model, model_dir, cfg)
    # state that training changes besides parameters: MoE correction biases (balancing)
    buffers = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")} if monitor else {}

    optimizer = _optimizer(cfg, _param_groups(cfg, trained, monitor))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    loss_model = CausalLMLoss(model, cfg.loss_chunk)
    # The scheduler is stepped by hand once per optimizer step: accelerate's wrapper would
    # step it once per process, changing the schedule with the number of processes.
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)

    _check_space(cfg, reader, trainable_bytes, accelerator.is_main_process)
    state = TrainState(model_fingerprint=reader.fingerprint()["sha256"], data_fingerprint=fingerprint_sources(cfg.data, cfg.chat_template))
    if resume_from is not None:
        state = load_checkpoint(resume_from, state, {**trained, **buffers}, optimizer, scheduler)
        log.info("resumed from %s at step %d", resume_from, state.step)

    # every check passed: only now touch the run directory (and clear what killed runs left beside it)
    if accelerator.is_main_process:
        from lmexpand.checkpoint.writer import clean_stale_partials

        clean_stale_partials(cfg.out)
    if force and resume_from is None and cfg.out.exists() and accelerator.is_main_process:
        shutil.rmtree(cfg.out)
    accelerator.wait_for_everyone()
    created_out = not cfg.out.exists()
    cfg.out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (cfg.out / "train_config.json").write_text(cfg.model_dump_json(indent=2))
    if cfg.tensorboard:
        accelerator.init_trackers("tensorboard", config={"lr": cfg.lr, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
                                                         "grad_accum": cfg.grad_accum, "max_steps": cfg.max_steps})
    metrics = open(cfg.out / "metrics.jsonl", "a") if accelerator.is_main_process else None

    world, rank = accelerator.num_processes, accelerator.process_index
    per_step_blocks = cfg.batch_size * world * cfg.grad_accum
    blocks = data.train_block_iter(state.blocks)

    def micro_batch() -> "torch.Tensor":
        """This process's share of the next global micro-batch (same blocks for any world size)."""
        rows = [next(blocks) for _ in range(cfg.batch_size * world)]
        mine = rows[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        return torch.as_tensor(np.stack(mine)).to(accelerator.device)

    def validate_blocks(val_blocks) -> float | None:
        """Mean loss over the same validation blocks for any world size (each process takes
        its share, then the sums are reduced)."""
        n = min(len(val_blocks), cfg.val_batches * cfg.batch_size * world)
        if n == 0:
            return None
        mine = val_blocks[rank:n:world]
        loss_model.eval()
        total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        with torch.no_grad():
            for i in range(0, len(mine), cfg.batch_size):
                ids = torch.as_tensor(mine[i:i + cfg.batch_size]).to(accelerator.device)
                loss, _ = loss_model(ids)
                total += loss.double() * len(ids)
        loss_model.train()
        return (accelerator.reduce(total, reduction="sum") / n).item()

    def validate() -> tuple[float | None, dict[str, float]]:
        """The validation loss and, for a mixture, each source's (the overall loss is then
        their mean weighted by the mixture weights)."""
        if data.mixture is None:
            return validate_blocks(data.val_blocks), {}
        per_source = {p.name: validate_blocks(p.val) for p in data.parts}
        got = [(v, w) for v, w in zip(per_source.values(), data.mixture.p) if v is not None]
        overall = sum(v * w for v, w in got) / sum(w for _, w in got) if got else None
        return overall, {k: v for k, v in per_source.items() if v is not None}

    source_blocks = data.blocks_per_source(0, state.blocks)  # per source, so far (a resume recounts exactly)

    if cfg.co_llm_init_steps and state.step == 0:
        _co_llm_gate_init(cfg, accelerator, loss_model, data, metrics)

    # ---- the loop ----------------------------------------------------------------------
    loss_model.train()
    progress = _Progress(cfg.max_steps, state.step, accelerator.is_main_process)
    last_val = None
    if state.step == 0 and cfg.val_every:  # the starting point of the validation curve
        last_val, per_source = validate()
        if last_val is not None and metrics is not None:
            metrics.write(json.dumps({"step": 0, "val_loss": last_val, "tokens": 0,
                                      **{f"val_loss/{k}": v for k, v in per_source.items()}}) + "\n")
    start_time = time.perf_counter()
    start_tokens = state.tokens
    first_step = state.step
    while state.step < cfg.max_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        aux_total = torch.zeros((), device=accelerator.device)
        grad_norm = None
        for _ in range(cfg.grad_accum):
            ids = micro_batch()
            with accelerator.accumulate(loss_model):
                loss, aux = loss_model(ids)
                if monitor:
                    aux = aux + monitor.aux_loss().to(loss.device)
                accelerator.backward(loss + aux)
                if accelerator.sync_gradients:
                    # the norm of the synchronized gradients: the same number on every process,
                    # so every process stops together when it is not finite (inf: measure only)
                    # FSDP: each process holds a shard of each gradient; the wrapped model's own
                    # clip_grad_norm_ (which accelerate calls when given all of its parameters)
                    # all-reduces the norm, where clipping `params` would use this shard's alone
                    grad_norm = accelerator.clip_grad_norm_(list(loss_model.parameters()) if sharded else params,
                                                            cfg.max_grad_norm or float("inf"))
                    _stop_if_not_finite(grad_norm, state.step + 1, cfg)
                    if state.step == first_step:
                        _stop_if_unreachable(grad_norm, model, tokenizer, cfg, created_out, data)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / cfg.grad_accum
            aux_total += aux.detach() / cfg.grad_accum
        scheduler.step()
        state.step += 1
        source_blocks = [a + b for a, b in zip(source_blocks, data.blocks_per_source(state.blocks, per_step_blocks))]
        state.blocks += per_step_blocks
        state.tokens += per_step_blocks * cfg.seq_len

        loss_value = accelerator.reduce(step_loss, reduction="mean").item()
        elapsed = time.perf_counter() - start_time
        record: dict[str, Any] = {
            "step": state.step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
            "tokens": state.tokens, "tokens_per_s": (state.tokens - start_tokens) / max(elapsed, 1e-9),
            "elapsed_s": elapsed,
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if data.mixture is not None:  # the realized token share of each source so far
            total_blocks = max(1, sum(source_blocks))
            record.update({f"share/{p.name}": n / total_blocks for p, n in zip(data.parts, source_blocks)})
        if aux_total.item():
            record["aux_loss"] = accelerator.reduce(aux_total, reduction="mean").item()
        if monitor:
            record.update(monitor.after_step(lambda t: accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu()))
        if (cfg.val_every and state.step % cfg.val_every == 0) or state.step == cfg.max_steps:
            last_val, per_source = validate()
            if last_val is not None:
                record["val_loss"] = last_val
                record.update({f"val_loss/{k}": v for k, v in per_source.items()})
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if cfg.tensorboard:
            accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                            step=state.step)
        progress.update(record, cfg.log_every)
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.max_steps:
            if accelerator.is_main_process:
                save_checkpoint(cfg.out, state, {**{n: p.data for n, p in trained.items()}, **buffers}, optimizer,
                                scheduler, cfg.keep_last)
            accelerator.wait_for_everyone()
        kill_point(f"train:after-step:{state.step}")
    progress.close()
    if metrics is not None:
        metrics.close()

    # ---- the result: the full model, original tensors streamed from the source ----------
    out_model = cfg.out / "model"
    # FSDP: each process holds a shard of every parameter; gather the full values (a
    # collective: every process takes part, the main process receives them)
    full = _gathered_parameters(accelerator, loss_model) if sharded else None
    if accelerator.is_main_process:
        from lmexpand.train.export_trained import write_trained_model

        write_trained_model(
            reader, accelerator.unwrap_model(loss_model).model, cfg, out_model,
            training={"steps": state.step, "tokens": state.tokens, "data": [str(d.path) for d in cfg.data],
                      "data_fingerprint": state.data_fingerprint, "final_val_loss": last_val,
                      "trainable_parameters": n_trainable},
            full=full,
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _summary(cfg, state, start_tokens, time.perf_counter() - start_time, last_val, data, source_blocks, out_model)
    accelerator.end_training()  # closes trackers (and the process group): last
    return out_model


def _summary(cfg: TrainConfig, state, start_tokens: int, seconds: float, last_val, data, source_blocks,
             out_model: Path) -> None:
    """Where everything is, once the run is over."""
    from lmexpand.units import human_count

    done = state.tokens - start_tokens
    log.info("trained %d steps, %s tokens in %.0f s (%s tokens/s)%s", state.step, human_count(state.tokens), seconds,
             human_count(done / max(seconds, 1e-9)),
             f"; final validation loss {last_val:.4f}" if last_val is not None else "")
    if data.mixture is not None:
        total = max(1, sum(source_blocks))
        log.info("token share: %s", ", ".join(f"{p.name} {n / total:.1%} (weight {w:.1%})"
                                              for p, n, w in zip(data.parts, source_blocks, data.mixture.p)))
    log.info("metrics: %s", cfg.out / "metrics.jsonl")
    if cfg.tensorboard:
        log.info("TensorBoard: tensorboard --logdir %s", cfg.out / "tensorboard")
    log.info("model: %s", out_model)


def _check_distribution(accelerator, cfg: TrainConfig, resume_from: Path | None) -> bool:
    """Before anything is loaded or written: the processes really train together, and the
    options asked for work with the way they share the model. True under FSDP (parameters
    sharded across processes)."""
    import os

    from accelerate.utils import DistributedType

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes == 1:
        raise ConfigError(
            f"{launched} processes were launched, but accelerate set up no distributed training in them (it found no "
            "GPU for the FSDP, DeepSpeed or multi-GPU config): each would train alone and write the same --out. On "
            "CPUs, launch data parallel as `ACCELERATE_USE_CPU=true torchrun --nproc_per_node N -m lmexpand train ...`; "
            "the FSDP and DeepSpeed configs need GPUs (docs/training.md)."
        )
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if accelerator.distributed_type == DistributedType.DEEPSPEED or sharded:
        kind = "FSDP" if sharded else "DeepSpeed"
        if cfg.save_every or resume_from is not None:
            raise ConfigError(
                f"--save-every and --resume are not supported under {kind} yet: its optimizer state is sharded across "
                "processes and lmexpand's checkpoints hold one process's state. Train without them under "
                f"{kind}, or use data parallel (recipes/accelerate/ddp.yaml), where both work."
            )
        if cfg.co_llm_init_steps:
            raise ConfigError(f"--co-llm-init-steps is not supported under {kind}; run the gate initialisation with "
                              "data parallel or one process, then continue from its output.")
    return sharded


def _gathered_parameters(accelerator, loss_model) -> dict[str, Any] | None:
    """The full values of the trained parameters of an FSDP-wrapped model on the main process
    (None on the others), by the model's own parameter names. Every process must call it.

    FSDP1 (``use_orig_params``): inside ``summon_full_params`` the original parameters hold
    their full values; FSDP2: each parameter is a DTensor, gathered by ``full_tensor()``.
    Only the trained parameters are copied (the frozen ones are streamed from the source).
    """
    import torch

    wrapped = accelerator.unwrap_model(loss_model).model

    def trained() -> dict[str, Any]:
        out = {}
        for name, p in wrapped.named_parameters():
            if p.requires_grad:
                value = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[name.replace("_fsdp_wrapped_module.", "")] = value.detach().to("cpu", copy=True)
        return out

    if getattr(accelerator, "is_fsdp2", False):
        full = trained()
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with torch.no_grad(), FSDP.summon_full_params(loss_model, writeback=False):
            full = trained()
    return full if accelerator.is_main_process else None


def _check_space(cfg: TrainConfig, reader, trainable_bytes: int, main_process: bool) -> None:
    """Before step 1: room for the final model and the checkpoints kept (weights + AdamW's two
    moments per trained tensor), on the device of --out."""
    if not main_process:
        return
    from lmexpand.checkpoint.writer import existing_ancestor
    from lmexpand.errors import DiskFullError
    from lmexpand.units import human_bytes

    kept = min(cfg.keep_last, cfg.max_steps // cfg.save_every) if cfg.save_every else 0
    need = reader.total_bytes + kept * 3 * trainable_bytes
    # a run being replaced (--force) frees what it holds; count what is free now, to be safe
    free = shutil.disk_usage(existing_ancestor(cfg.out.resolve())).free
    if free < need:
        raise DiskFullError(
            f"--out {cfg.out}: training needs about {human_bytes(need)} (final model {human_bytes(reader.total_bytes)}"
            f" + {kept} checkpoint(s) of {human_bytes(3 * trainable_bytes)}) but only {human_bytes(free)} is free "
            "there. Free space, choose --out on another disk, or keep fewer checkpoints (--keep-last, --save-every).")


def _stop_if_not_finite(grad_norm, step: int, cfg: TrainConfig) -> None:
    """A NaN/Inf gradient (from a NaN/Inf loss, or weights) would be written into every
    trained tensor: stop before the optimizer step, keeping the checkpoints written so far."""
    import math

    norm = float(grad_norm)
    if math.isfinite(norm):
        return
    from lmexpand.train.state import latest_checkpoint

    last = latest_checkpoint(cfg.out)
    kept = f"the last good checkpoint is {last} (continue with --resume once fixed)" if last else \
        "no checkpoint was written before it (--save-every N keeps some)"
    raise TrainingDivergedError(
        f"step {step}: the gradient norm is {norm} (the loss or the weights hold NaN/Inf). Training stopped before "
        f"applying this step, and no final model was written; {kept}. Lower --lr, check the data, or look for NaN/Inf "
        f"in the model with `lmexpand verify {cfg.model} --values all`.")


def _markers_later(model, data, blocks: int = 20_000) -> bool:
    """A kind whose new tensors run only inside marked spans (deep fusion): whether a marker
    appears in the first ``blocks`` training blocks (the first batch may miss the spans of
    sparse data)."""
    import numpy as np

    ids = list(getattr(model.config, "open_ids", []) or [])
    if not ids:
        return False
    for i, row in enumerate(data.train_block_iter(0)):
        if i >= blocks:
            return False
        if np.isin(np.asarray(row), ids).any():
            return True
    return False


def _stop_if_unreachable(grad_norm, model, tokenizer, cfg: TrainConfig, created_out: bool, data) -> None:
    """A zero gradient on every trainable tensor after the first batch: the data cannot train
    them (deep fusion without markers once trained for hours and changed nothing). Stop
    before the first optimizer step, saying why; a run directory made by this run is removed.
    (Deep fusion on data whose first batch has no span, but later blocks do, goes on.)"""
    if float(grad_norm) != 0.0:
        return
    from lmexpand.compose.kinds import KINDS

    declared = KINDS.get(getattr(model.config, "model_type", None))  # why, when a composed kind says
    if declared and declared.span_markers and _markers_later(model, data):
        log.warning("the first batch holds no marked span, so the experts got no gradient from it; later blocks "
                    "have markers: training goes on")
        return
    reason = (declared and declared.no_gradient) or (
        "no trainable tensor takes part in computing the loss of this data (the trainable set, --trainable / "
        "--extra-trainable, or --loss-from leaving no target)")
    markers = ""
    if "{markers}" in reason:
        ids = list(getattr(model.config, "open_ids", []) or []) + list(getattr(model.config, "close_ids", []) or [])
        markers = ", ".join(repr(tokenizer.decode([i])) for i in ids[:4]) or "none"
    if created_out:
        shutil.rmtree(cfg.out, ignore_errors=True)
    raise ConfigError(f"{cfg.model}: every trainable tensor has a zero gradient after the first batch of "
                      f"{', '.join(str(d.path) for d in cfg.data)}, so training would change nothing: "
                      + reason.format(markers=markers) + ". Nothing was trained or written.")


def _router_monitor(model, model_dir: Path, cfg: TrainConfig):
    """Router balancing for MoE models (none for dense ones)."""
    from lmexpand.train.freeze import read_lineage
    from lmexpand.train.moe import RouterMonitor

    moe = (read_lineage(model_dir) or {}).get("moe") or {}
    monitor = RouterMonitor(model, balance_coef=cfg.moe_balance_coef, z_coef=cfg.moe_z_coef,
                            bias_rate=cfg.moe_bias_rate, replicas=moe.get("replicas"))
    if monitor:
        log.info("MoE: %d routers; balance loss x%g, z-loss x%g, correction-bias rate %g", len(monitor.routers),
                 cfg.moe_balance_coef, cfg.moe_z_coef, cfg.moe_bias_rate)
    return monitor if monitor else None


def _trainable_hint(cfg: TrainConfig, model_dir: Path, reader) -> set[str]:
    """The trainable names computed from an empty (meta) model, before the real load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmexpand.train.freeze import trainable_names

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return trainable_names(meta, model_dir, cfg)


def _quiet_datasets() -> None:
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


class _Progress:
    """A rich progress bar on a terminal (steps, tokens/s, time left), else a log line every
    ``log_every`` steps with the same numbers (``LMEXPAND_NO_PROGRESS`` forces the lines)."""

    def __init__(self, total: int, done: int, enabled: bool):
        import sys

        self.enabled = enabled
        self.total, self.start_step, self.start = total, done, time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty() and not os.environ.get("LMEXPAND_NO_PROGRESS"):
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                console=Console(stderr=True))
            self.task = self.bar.add_task("train", total=total, completed=done, info="")
            self.bar.start()

    def update(self, r: dict, log_every: int) -> None:
        if not self.enabled:
            return
        info = f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:.0f} tok/s"
        if "val_loss" in r:
            info += f"  val {r['val_loss']:.4f}"
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=info)
        elif r["step"] % log_every == 0 or "val_loss" in r:
            steps = r["step"] - self.start_step
            left = (time.perf_counter() - self.start) / max(steps, 1) * (self.total - r["step"])
            log.info("step %d/%d: %s  ETA %s", r["step"], self.total, info, _clock(left))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
