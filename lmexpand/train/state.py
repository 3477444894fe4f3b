"""Training checkpoints: only what a resume needs, written atomically.

``RUN/checkpoints/step-000050/`` holds the trainable tensors (safetensors), the optimizer
and scheduler states, every RNG state and ``state.json`` (step, tokens, data position,
fingerprints of the model and data). The frozen weights are not saved: they are the
source's, unchanged. A checkpoint is written into a temporary directory and renamed into
place, and only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmexpand.errors import ConfigError
from lmexpand.faults import kill_point

log = logging.getLogger("lmexpand")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens consumed (all processes)
    blocks: int = 0  # data position: global index of the next block
    model_fingerprint: str = ""
    data_fingerprint: str = ""


def clean_stale_checkpoint_partials(run_dir: Path) -> None:
    """Remove the half-written checkpoints of killed runs (their process is gone)."""
    from lmexpand.checkpoint.outpath import left_by_dead_process

    for p in checkpoint_dir(run_dir).glob(".step-*.partial-*"):
        if left_by_dead_process(p):
            shutil.rmtree(p, ignore_errors=True)


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(p for p in checkpoint_dir(run_dir).glob("step-*") if (p / "state.json").is_file())
    return found[-1] if found else None


def _save_rng(folder: Path) -> None:
    """RNG states as JSON + safetensors (no pickle: a run directory may come from elsewhere)."""
    import numpy as np
    from safetensors.torch import save_file

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (folder / "rng.json").write_text(json.dumps({
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }))
    save_file({"torch": torch.get_rng_state()}, folder / "rng.safetensors")


def _load_rng(folder: Path) -> None:
    import numpy as np
    from safetensors.torch import load_file

    saved = json.loads((folder / "rng.json").read_text())
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(load_file(folder / "rng.safetensors")["torch"])


def save_checkpoint(run_dir: Path, state: TrainState, trainable: dict[str, torch.Tensor],
                    optimizer: Any, scheduler: Any, keep_last: int) -> Path:
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir) / f"step-{state.step:06d}"
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _save_rng(tmp)
        kill_point("train:checkpoint-files-written")
        from lmexpand.checkpoint.hashing import sha256_file

        hashes = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / "state.json").write_text(json.dumps({**asdict(state), "sha256": hashes}, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        kill_point("train:checkpoint-before-rename")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in checkpoint_dir(run_dir).glob("step-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, state: TrainState, trainable: dict[str, torch.Tensor],
                    optimizer: Any, scheduler: Any) -> TrainState:
    """Restore into live objects; refuses a checkpoint of another model or other data."""
    from safetensors.torch import load_file

    if not (path / "state.json").is_file():
        raise ConfigError(f"{path}: not an lmexpand training checkpoint (no state.json).")
    try:
        record = json.loads((path / "state.json").read_text())
        hashes = record.pop("sha256", {})
        saved = TrainState(**record)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(
            f"{path}/state.json: not a training state this lmexpand wrote ({e}). Resume from another checkpoint "
            "(--resume RUN/checkpoints/step-N) or start a new run directory."
        ) from None
    from lmexpand.checkpoint.hashing import sha256_file

    for name, digest in hashes.items():
        if not (path / name).is_file() or sha256_file(path / name) != digest:
            raise ConfigError(
                f"{path}: {name} is missing or does not match the sha256 recorded when it was saved; the "
                "checkpoint is damaged. Resume from an earlier one (--resume RUN/checkpoints/step-N) or delete it."
            )
    if saved.model_fingerprint != state.model_fingerprint:
        raise ConfigError(
            f"{path}: this checkpoint was made from another model (fingerprint {saved.model_fingerprint[:12]} "
            f"vs {state.model_fingerprint[:12]}). Resume with the same --model, or start a new run directory."
        )
    if saved.data_fingerprint != state.data_fingerprint:
        raise ConfigError(
            f"{path}: this checkpoint was trained on other data (or the files changed). "
            "Resume with the same --data files, or start a new run directory."
        )
    tensors = load_file(path / "trainable.safetensors")
    if set(tensors) != set(trainable):
        raise ConfigError(f"{path}: its trainable tensors differ from this run's trainable set; use the same settings.")
    with torch.no_grad():
        for name, t in tensors.items():
            trainable[name].copy_(t)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _load_rng(path)
    return saved
