"""Config and tokenizer files that transformers 4.x and 5.x read the same way.

transformers 5 writes RoPE settings only as ``rope_parameters`` (theta, scaling, the
partial rotary factor) and names a generic fast
tokenizer ``"tokenizer_class": "TokenizersBackend"``. transformers 4.57 ignores the first (it
reads ``rope_theta`` and ``rope_scaling``, and silently falls back to theta 10,000: logits off
by up to 10 for SmolLM2's 100,000) and refuses the second. Every checkpoint lmexpand writes
goes through :func:`for_every_client`, which adds the legacy keys beside the new ones (same
values; transformers 5 reads either) and names the tokenizer ``PreTrainedTokenizerFast`` (the
class 4.x loads tokenizer.json with; in 5.x the same name is an alias of TokenizersBackend).
Nothing else in the files changes, and files that need nothing are written byte for byte.
"""

from __future__ import annotations

import json
from typing import Any

LEGACY_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _legacy_rope(cfg: dict[str, Any]) -> bool:
    """Add ``rope_theta`` / ``rope_scaling`` beside ``rope_parameters`` in this config and in
    its sub-configs (``text_config`` and the like); True if anything was added."""
    changed = False
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        # the per-layer-type form (Gemma-3, OLMo-3): 4.x reads the global layers' settings at
        # the top level and the sliding layers' theta as rope_local_base_freq (Gemma-3's name;
        # a class that rotates every layer alike ignores it)
        local = (rope.get("sliding_attention") or {}).get("rope_theta")
        if local is not None and "rope_local_base_freq" not in cfg:
            cfg["rope_local_base_freq"] = local
            changed = True
        rope = rope["full_attention"]
    if isinstance(rope, dict) and "rope_theta" in rope:  # (the per-layer-type form: its global layers)
        # 4.x reads these at the top level (Glm4-MoE's default partial_rotary_factor is 0.5
        # there, 1.0 for our outputs: rotating half the head would change every logit)
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope and key not in cfg:
                cfg[key] = rope[key]
                changed = True
        kind = rope.get("rope_type", "default")
        if kind != "default" and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
            changed = True
    for value in cfg.values():
        if isinstance(value, dict):
            changed |= _legacy_rope(value)
    return changed


def for_every_client(name: str, content: bytes) -> bytes:
    """The file ``name`` as written: config.json and tokenizer_config.json made readable by
    transformers 4.x and 5.x alike; any other file, or one that needs nothing, unchanged."""
    if name not in ("config.json", "tokenizer_config.json"):
        return content
    try:
        data = json.loads(content)
    except ValueError:
        return content  # not ours to judge here (the reader reports unreadable configs)
    if not isinstance(data, dict):
        return content
    if name == "config.json":
        changed = _legacy_rope(data)
    else:
        cls = data.get("tokenizer_class")
        changed = cls in LEGACY_TOKENIZER_CLASS
        if changed:
            data["tokenizer_class"] = LEGACY_TOKENIZER_CLASS[cls]
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode() if changed else content
