"""CALM composition (Bansal et al., 2024, arXiv 2401.02412): anchor + augmenting model +
new cross-attention bridges; only the bridges train.

The surgery writes a small directory: the bridges' tensors (``bridges.N.*``, float32), a
config of the CALM kind (:mod:`lmexpand.compose.kinds.calm`) that embeds both models'
configs and the layer pairs, references to the two source checkpoints (path + fingerprint,
checked when loading), and the anchor's tokenizer. The composed model is
:mod:`lmexpand.compose.calm_modeling`; ``lmexpand export`` turns the directory into a self-contained one (both models' weights,
bridges, the modeling file via ``auto_map``).

Bridge layout: each bridge's output projection ``o_proj`` is zero, so at init the composed
model computes exactly the anchor. ``proj`` maps the augmenting width to the anchor's;
``q/k/v_proj`` are N(0, init_std); the RMSNorm weights are 1.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.compose.kinds.calm import KIND
from lmexpand.errors import ConfigError
from lmexpand.expand.plan import NewInit, Plan, TensorPlan, Zeros
from lmexpand.expand.registry import MethodConfig, register_method
from lmexpand.jsonio import read_json

_PAIRS = re.compile(r"^\d+:\d+(,\d+:\d+)*$")


class CalmMethodConfig(MethodConfig):
    every: int | None = Field(
        None, gt=0, description="A bridge at every K-th anchor layer (layers K-1, 2K-1, ...), reading the "
        "augmenting layer chosen by --augment-layers.",
    )
    pairs: list[tuple[int, int]] | None = Field(
        None, description="Explicit bridges ANCHOR_LAYER:AUGMENT_LAYER,... (0-based), e.g. 0:3,1:3,2:3.",
    )
    augment_layers: Literal["proportional", "last"] = Field(
        "proportional", description="With --every: the augmenting layer at the same relative depth, or always "
        "its last layer.",
    )
    heads: int = Field(4, gt=0, description="Attention heads per bridge (must divide the anchor width).")
    positions: Literal["rope", "none"] = Field(
        "rope", description="Rotary positions in the bridges' attention (both models read the same tokens), so a "
        "bridge can tell the current document from earlier ones in a packed sequence; 'none': content only.",
    )
    init_std: float = Field(0.02, gt=0, description="Std of the bridges' projection weights (o_proj starts at zero).")
    seed: int = Field(0, description="Seed of the bridge initialization.")

    @field_validator("pairs", mode="before")
    @classmethod
    def _parse_pairs(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.replace(" ", "")
            if not _PAIRS.match(text):
                raise ValueError(f"{v!r}: write ANCHOR_LAYER:AUGMENT_LAYER pairs, e.g. 0:3,1:3")
            return [tuple(int(x) for x in p.split(":")) for p in text.split(",")]
        return v

    @model_validator(mode="after")
    def _one_mode(self) -> "CalmMethodConfig":
        if (self.every is None) == (self.pairs is None):
            raise ValueError("give exactly one of --every K or --pairs A:G,...")
        if self.pairs is not None:
            if not self.pairs:
                raise ValueError("give at least one pair")
            if len(set(self.pairs)) != len(self.pairs):
                raise ValueError("a pair appears twice")
        return self


def resolve_pairs(cfg: CalmMethodConfig, n_anchor: int, n_aug: int) -> list[tuple[int, int]]:
    if cfg.pairs is not None:
        for a, g in cfg.pairs:
            if a >= n_anchor:
                raise ConfigError(f"--pairs {a}:{g}: anchor layer {a} is out of range; the anchor has {n_anchor} "
                                  f"layers (0..{n_anchor - 1}).")
            if g >= n_aug:
                raise ConfigError(f"--pairs {a}:{g}: augmenting layer {g} is out of range; the augmenting model has "
                                  f"{n_aug} layers (0..{n_aug - 1}).")
        return sorted(cfg.pairs)
    assert cfg.every is not None
    if cfg.every > n_anchor:
        raise ConfigError(f"--every {cfg.every}: the anchor has {n_anchor} layers, so K must be 1..{n_anchor}.")
    anchors = list(range(cfg.every - 1, n_anchor, cfg.every))
    if cfg.augment_layers == "last":
        return [(a, n_aug - 1) for a in anchors]
    return [(a, max(0, round((a + 1) * n_aug / n_anchor) - 1)) for a in anchors]


def _vocab(reader: CheckpointReader) -> tuple[Any, ...] | None:
    """The token -> id map (and added tokens) from tokenizer.json, or None if absent."""
    path = reader.path / "tokenizer.json"
    if not path.is_file():
        return None
    tok = read_json(path, what="the tokenizer", expect=dict, error=ConfigError,
                    fix="Fix or re-download the model's tokenizer.json.")
    vocab = (tok.get("model") or {}).get("vocab")
    added = sorted((t.get("id"), t.get("content")) for t in tok.get("added_tokens") or [])
    return (json.dumps(vocab, sort_keys=True), tuple(added))


def check_tokenizers(anchor: CheckpointReader, aug: CheckpointReader) -> list[str]:
    va, vg = anchor.config.get("vocab_size"), aug.config.get("vocab_size")
    where = f"anchor {anchor.path} and augmenting model {aug.path}"
    if va != vg:
        raise ConfigError(f"{where} have different vocabularies (vocab_size {va} vs {vg}); CALM feeds the same "
                          "token ids to both models, so they must share the tokenizer.")
    ta, tg = _vocab(anchor), _vocab(aug)
    if ta is not None and tg is not None and ta != tg:
        raise ConfigError(f"{where} have the same vocab_size but different tokenizers (tokenizer.json token->id "
                          "maps differ); CALM needs the same ids in both.")
    if ta is None or tg is None:
        return [f"no tokenizer.json in {'the anchor' if ta is None else 'the augmenting model'}: only vocab_size was "
                "compared"]
    return []


@register_method(
    "calm",
    config=CalmMethodConfig,
    sources=("ANCHOR", "AUGMENT"),
    summary="CALM composition: anchor + augmenting model joined by cross-attention bridges.",
    help="""Compose an anchor LLM with an augmenting LLM through new cross-attention bridges
(CALM, arXiv 2401.02412). Both models stay frozen and untouched; only the bridges train.
The bridges' output projections start at zero, so the composed model equals the anchor
at init. OUT holds the bridges and references to both models; `lmexpand export` makes a
self-contained directory (loaded with trust_remote_code=True).

\b
Examples:
  lmexpand surgery calm ./anchor ./augment out/calm --every 4
  lmexpand surgery calm ./anchor ./augment out/calm --pairs 0:3,1:3,2:3 --heads 4
  lmexpand surgery calm smollm2-135m smollm2-135m out/calm --every 6 --dry-run""",
)
def plan_calm(readers: Sequence[CheckpointReader], cfg: CalmMethodConfig) -> Plan:
    anchor, aug = readers
    notes = check_tokenizers(anchor, aug)
    pairs = resolve_pairs(cfg, anchor.num_layers, aug.num_layers)
    d_a, d_g = int(anchor.config["hidden_size"]), int(aug.config["hidden_size"])
    if d_a % cfg.heads:
        raise ConfigError(f"--heads {cfg.heads} does not divide the anchor width {d_a}.")
    if cfg.positions == "rope" and (d_a // cfg.heads) % 2:
        raise ConfigError(f"--heads {cfg.heads}: bridge heads of {d_a // cfg.heads} dims; rotary positions need an even "
                          "number. Choose other --heads or --positions none.")
    tensors: list[TensorPlan] = []
    for i in range(len(pairs)):
        p = f"bridges.{i}."
        seed = cfg.seed * 1_000_003 + i * 16
        tensors += [
            TensorPlan(p + "norm_q.weight", "F32", (d_a,), NewInit(0.0, 0, mean=1.0)),
            TensorPlan(p + "norm_kv.weight", "F32", (d_g,), NewInit(0.0, 0, mean=1.0)),
            TensorPlan(p + "proj.weight", "F32", (d_a, d_g), NewInit(cfg.init_std, seed + 1)),
            TensorPlan(p + "q_proj.weight", "F32", (d_a, d_a), NewInit(cfg.init_std, seed + 2)),
            TensorPlan(p + "k_proj.weight", "F32", (d_a, d_a), NewInit(cfg.init_std, seed + 3)),
            TensorPlan(p + "v_proj.weight", "F32", (d_a, d_a), NewInit(cfg.init_std, seed + 4)),
            TensorPlan(p + "o_proj.weight", "F32", (d_a, d_a), Zeros()),
        ]
    config = {
        "model_type": KIND.model_type,
        "architectures": [KIND.model_class],
        "anchor": dict(anchor.config),
        "augment": dict(aug.config),
        "pairs": [list(p) for p in pairs],
        "num_heads": cfg.heads,
        "bridge_rope_theta": 10000.0 if cfg.positions == "rope" else None,
        "anchor_path": str(anchor.path.resolve()),
        "augment_path": str(aug.path.resolve()),
        "vocab_size": anchor.config.get("vocab_size"),
        "hidden_size": d_a,
        "num_hidden_layers": anchor.num_layers,
        "max_position_embeddings": anchor.config.get("max_position_embeddings"),
        "bos_token_id": anchor.config.get("bos_token_id"),
        "eos_token_id": anchor.config.get("eos_token_id"),
        "pad_token_id": anchor.config.get("pad_token_id"),
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    notes.append(f"{len(pairs)} bridges (anchor layer:augmenting layer): "
                 + ", ".join(f"{a}:{g}" for a, g in pairs) + f"; widths {d_g} -> {d_a}")
    return Plan(
        method="calm",
        arguments=cfg.model_dump(mode="json"),
        sources=[anchor.path, aug.path],
        config=config,
        tensors=tensors,
        new_parameters=[t.name for t in tensors],
        function_preserving=True,
        layer_map=[],
        notes=notes,
        extra_lineage={"trainable_default": "new_parameters", "calm": {"pairs": [list(p) for p in pairs]}},
    )
