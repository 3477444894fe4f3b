"""Run a plan: streamed to disk (any size) or applied in memory (tests, small models).

Both paths compute every tensor with the same op code, and the streamed path's raw byte
copies are by construction the source bytes, so the two agree bitwise.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from lmexpand import __version__
from lmexpand.checkpoint.reader import LINEAGE_FILE, CheckpointReader, st_dtype_of
from lmexpand.checkpoint.safetensors_format import TensorSlot
from lmexpand.checkpoint.writer import (DEFAULT_MAX_SHARD_SIZE, Computed, OutputTensor, RawCopy,
                                        write_checkpoint)
from lmexpand.checkpoint.writer import Zeros as ZeroBytes
from lmexpand.expand.plan import Plan, Read, TensorGetter, TensorPlan, Zeros

if TYPE_CHECKING:
    import torch

log = logging.getLogger("lmexpand")


def compute_tensor(t: TensorPlan, get: TensorGetter) -> "torch.Tensor":
    """One output tensor's values, in the plan's dtype and shape."""
    from lmexpand.expand.plan import _torch_dtype

    value = t.op.compute(get, t.shape, t.dtype)
    value = value.to(_torch_dtype(t.dtype))
    if tuple(value.shape) != t.shape:
        raise ValueError(f"{t.name}: op gave shape {tuple(value.shape)}, plan says {t.shape} (a bug in the plan)")
    return value


def lineage_record(plan: Plan, readers: Sequence[CheckpointReader]) -> dict[str, Any]:
    previous = [r.lineage() for r in readers]
    return {
        "lmexpand_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": plan.method,
        "arguments": plan.arguments,
        "sources": [r.fingerprint() for r in readers],
        "function_preserving": plan.function_preserving,
        "num_layers": len(plan.layer_map) if plan.layer_map else None,
        "layer_map": plan.layer_map,
        "new_parameters": list(plan.new_parameters),
        "parameters_total": plan.total_params,
        "parameters_new": plan.new_params,
        **plan.extra_lineage,
        "history": [p for p in previous if p],
    }


def execute(
    plan: Plan,
    out: str | Path,
    *,
    force: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    allow_pickle: bool = False,
    readers: Sequence[CheckpointReader] | None = None,
    threads: int = 1,
) -> Path:
    """Stream ``plan`` into a new model directory ``out`` (atomically). With ``threads`` > 1
    computed tensors are prepared by that many worker threads, at most ``threads`` + 1 ahead
    of the writer (torch releases the GIL in its kernels); they are written in plan order."""
    plan.validate()
    if plan.readers is not None:
        readers = plan.readers
    readers = list(readers) if readers is not None else [CheckpointReader(p, allow_pickle=allow_pickle) for p in plan.sources]

    def get(model: int, name: str) -> "torch.Tensor":
        return readers[model].get_tensor(name)

    outputs: list[OutputTensor] = []
    for t in plan.tensors:
        slot = TensorSlot(t.name, t.dtype, t.shape)
        op = t.op
        if isinstance(op, Read) and not readers[op.model].is_pickle:
            info = readers[op.model].info(op.name)
            if info.dtype == t.dtype and info.shape == t.shape:
                outputs.append(OutputTensor(slot, RawCopy(info)))
                continue
        if isinstance(op, Zeros):
            outputs.append(OutputTensor(slot, ZeroBytes()))
        else:
            outputs.append(OutputTensor(slot, Computed(lambda t=t: _finite(t, compute_tensor(t, get)),
                                                       finite_checked=True)))
    _check_referenced_members(plan, readers)

    pool = _Prefetch(outputs, threads) if threads > 1 else None
    files: dict[str, bytes | Path] = {p.name: p for p in readers[plan.carry_from].carry_files()
                                      if plan.carry_tokenizer or p.name == "generation_config.json"}
    files.update(plan.files)
    from lmexpand.checkpoint.tokenizer import TOKENIZER_FILES

    if not any(name in files for name in TOKENIZER_FILES):
        import logging

        logging.getLogger("lmexpand").warning(
            "warning: the source %s has no tokenizer, so neither will %s: train, eval and generate need one "
            "(copy the base model's tokenizer files into it)", readers[0].path, out)
    files["config.json"] = (json.dumps(plan.config, indent=2, sort_keys=True) + "\n").encode()
    files[LINEAGE_FILE] = (json.dumps(lineage_record(plan, readers), indent=2) + "\n").encode()
    try:
        return write_checkpoint(
            out, outputs, files=files, max_shard_size=max_shard_size, force=force,
            sources=plan.sources, description=f"{plan.method} -> {Path(out).name}",
        )
    finally:
        if pool is not None:
            pool.close()
        for r in readers:
            r.close()


class _Prefetch:
    """Replaces each computed producer by one that returns a worker's result, keeping the
    next ``threads`` computations submitted. A memory budget of the largest tensor's bytes is
    taken in plan order before each computation (a tensor as large as the budget runs alone,
    small ones run side by side), so the peak stays that of the largest tensor's computation
    plus ``threads`` small ones, not ``threads`` large ones at once. Taking it in order also
    keeps ordered resources (the random methods' draws) free of deadlock."""

    def __init__(self, outputs: list[OutputTensor], threads: int):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        # torch's own thread count is left as it is: it decides how long reductions (norms,
        # sums) are split, so changing it would change the bits of slerp, model_stock, rescaled
        # DARE... relative to a run with the default (mergekit's)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="lmexpand-merge")
        self._ahead = threads
        self._lock = threading.Lock()
        self._budget = threading.Condition()
        self._order = [i for i, o in enumerate(outputs) if isinstance(o.producer, Computed)]
        self._fns = {i: outputs[i].producer.fn for i in self._order}
        self._cost = {k: outputs[i].slot.nbytes for k, i in enumerate(self._order)}
        self._capacity = max(self._cost.values(), default=1) or 1
        self._free = self._capacity
        self._ticket = 0
        self._closed = False
        self._futures: dict[int, Any] = {}
        self._submitted = 0
        for k, i in enumerate(self._order):
            outputs[i] = OutputTensor(outputs[i].slot, Computed(lambda k=k: self._take(k)))

    def _run(self, k: int) -> "torch.Tensor":
        cost = min(self._cost[k], self._capacity)
        with self._budget:
            while not self._closed and (self._ticket != k or self._free < cost):
                self._budget.wait(timeout=1.0)
            if self._closed:
                raise RuntimeError("stopped")
            self._free -= cost
            self._ticket += 1
            self._budget.notify_all()
        try:
            return self._fns[self._order[k]]()
        finally:
            with self._budget:
                self._free += cost
                self._budget.notify_all()

    def _take(self, k: int) -> "torch.Tensor":
        with self._lock:
            while self._submitted < min(len(self._order), k + self._ahead):
                self._futures[self._submitted] = self._pool.submit(self._run, self._submitted)
                self._submitted += 1
            future = self._futures.pop(k)
        return future.result()

    def close(self) -> None:
        with self._budget:
            self._closed = True
            self._budget.notify_all()
        for f in self._futures.values():
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._futures.clear()


def _check_referenced_members(plan: Plan, readers: Sequence[CheckpointReader]) -> None:
    """A composed model's directory references its members instead of copying them, and
    every later step (train, eval, generate, export) runs them: their values are checked
    now, once, like the values a surgery copies (the writer checks those). Tensors the plan
    reads itself are checked when written."""
    from lmexpand.checkpoint.finite import describe, non_finite_tensors
    from lmexpand.compose.kinds import is_composed_config, member_references

    if not is_composed_config(plan.config):
        return
    read = {(m, name) for t in plan.tensors for m, name in t.op.reads()}
    roles = {Path(p).resolve(): role for role, p in member_references(plan.config)}
    for i, reader in enumerate(readers):
        found = non_finite_tensors(reader, [t.name for t in reader if (i, t.name) not in read])
        if found:
            from lmexpand.errors import CheckpointError

            role = roles.get(Path(reader.path).resolve(), f"member {i}")
            raise CheckpointError(
                f"{plan.method}: the {role} {reader.path} holds NaN/Inf values: {describe(found)}. A composition "
                "runs its members as they are, so every output would carry them; nothing was written. Use a member "
                f"without them (`lmexpand verify {reader.path} --values all` lists them).")


def _finite(t, value: "torch.Tensor") -> "torch.Tensor":
    """Every tensor the plan computes is in memory anyway: one that holds NaN/Inf (from a
    source tensor it read, or from the arithmetic) stops the write, naming it and the
    source tensors it came from. Raw-copied tensors are checked by the writer from the bytes
    it hashes."""
    import torch

    # one reduction, no temporary (NaN propagates through min/max, Inf shows in one of them)
    if value.is_floating_point() and value.numel() and not all(bool(torch.isfinite(x)) for x in torch.aminmax(value.reshape(-1))):
        from lmexpand.errors import CheckpointError

        bad = int((~torch.isfinite(value)).sum())
        reads = sorted({name for _, name in t.op.reads()})
        raise CheckpointError(
            f"{t.name}: the surgery computed {bad:,} non-finite value(s) (NaN/Inf) for this tensor, from "
            f"{', '.join(reads) or 'no source tensor'}; nothing was written. Check the source with "
            "`lmexpand verify SOURCE --values all`, and the surgery's numeric arguments.")
    return value


def apply_to_state_dicts(plan: Plan, state_dicts: Sequence[Mapping[str, "torch.Tensor"]]) -> dict[str, "torch.Tensor"]:
    """The plan's output tensors computed from in-memory source state dicts."""
    plan.validate()

    def get(model: int, name: str) -> "torch.Tensor":
        return state_dicts[model][name]

    return {t.name: compute_tensor(t, get) for t in plan.tensors}


def apply_to_model(plan: Plan, models: Sequence[Any]) -> Any:
    """Apply ``plan`` to in-memory source models; returns a new stock transformers model."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    tensors = apply_to_state_dicts(plan, [{k: v.detach() for k, v in m.state_dict().items()} for m in models])
    cfg = dict(plan.config)
    config = CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
    dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"plan writes tensors the model class does not have: {unexpected[:3]}")
    tied = {k for k in missing if k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied:
        raise ValueError(f"plan leaves parameters unset: {sorted(set(missing) - tied)[:3]}")
    return model.eval()


def logit_delta(source: str | Path, expanded: str | Path) -> float:
    """max |logit difference| between two model directories on a fixed padded batch (fp32):
    how far a surgery moved the function."""
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(expanded, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(a.config.vocab_size, b.config.vocab_size), (2, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    with torch.no_grad():
        return (a(input_ids=ids, attention_mask=mask).logits - b(input_ids=ids, attention_mask=mask).logits).abs().max().item()


__all__ = ["logit_delta", "execute", "apply_to_model", "apply_to_state_dicts", "compute_tensor", "lineage_record", "st_dtype_of"]
