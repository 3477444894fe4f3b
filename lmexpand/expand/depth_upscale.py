"""SOLAR depth up-scaling (Kim et al., 2023, arXiv 2312.15166) and layer-slice stacking.

Section 2.1 of the paper: take an n-layer base model twice, drop the last m layers of the
first copy and the first m layers of the second, and stack what is left: 2(n - m) layers
(SOLAR 10.7B: n = 32, m = 8 -> 48 layers), then continue pretraining *all* parameters.
The general form stacks any list of layer slices ``[start, end)`` taken from one or more
models of the same architecture and shapes ("frankenmerges"); embeddings, final norm and
LM head come from one named model (default: the first slice's).

Depth up-scaling is NOT function-preserving: at the seam the hidden state leaves layer
``n - m - 1`` and enters layer ``m``, which was trained to see the output of layer
``m - 1``. The paper reports an initial drop that continued pretraining recovers quickly.
``seam_scale`` multiplies the residual-branch outputs (``o_proj`` and ``down_proj``,
weights and biases; a post-norm's scale in families whose branches end in one, see
``Family.branch_ends``) of the ``seam_layers`` layers on each side of every seam by a factor,
so those layers add less to the residual stream and the jump is softer. It is a heuristic
from depth-up-scaling practice, off by default.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import BaseModel, Field, field_validator, model_validator

from lmexpand.checkpoint.limits import MAX_LAYERS
from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.errors import ConfigError
from lmexpand.expand.plan import Op, Plan, Read, Scale, TensorPlan
from lmexpand.expand.registry import MethodConfig, comma_list, names_matching, register_method
from lmexpand.validation import STRICT

log = logging.getLogger("lmexpand")

SOURCE = "source"  # the name of the SOURCE argument in slices
_SLICE_TEXT = re.compile(r"^\s*(?:([\w.-]+):)?\s*(-?\d+)\s*-\s*(-?\d+)\s*$")


class SliceSpec(BaseModel):
    """Layers ``[start, end)`` of one model."""

    model_config = STRICT

    model: str = Field(SOURCE, description="'source' (the SOURCE argument) or a name from `models`")
    layers: tuple[int, int] = Field(description="[start, end): 0-based, end excluded")

    @field_validator("layers")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        start, end = v
        if start < 0:
            raise ValueError(f"layer {start} is negative; layers are 0-based")
        if start >= end:
            raise ValueError(f"[{start}, {end}) is empty: start must be below end (end is excluded)")
        return v


class UpscaleConfig(MethodConfig):
    drop: int | None = Field(
        None, gt=0,
        description="The paper's recipe for an L-layer model: layers [0, L-M) then [M, L), "
        "2(L-M) layers in all. SOLAR 10.7B: L=32, --drop 8 -> 48 layers.",
    )
    slices: list[SliceSpec] | None = Field(
        None,
        description="Explicit slices instead of --drop, in order: 'START-END,...' with END "
        "excluded, or 'NAME:START-END' for a model from --models (e.g. 0-24,other:8-32).",
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="More models for slices, NAME=DIR,... (same architecture and shapes as SOURCE).",
    )
    embed_from: str | None = Field(
        None, description="Model giving embeddings, final norm and LM head: 'source' or a NAME "
        "from --models (default: the first slice's model).",
    )
    trainable: list[str] = Field(
        default_factory=lambda: ["all"],
        description="What continued pretraining trains (written to lmexpand.json): 'all' (the "
        "paper), 'duplicated' (the second occurrence of every layer used twice), or "
        "comma-separated globs over output tensor names.",
    )
    seam_scale: float | None = Field(
        None, ge=0,
        description="Multiply what the layers next to each seam add to the residual stream (o_proj/down_proj "
        "weights and biases, or the post-norm's scale) by this factor to soften the jump. Off by default.",
    )
    seam_layers: int = Field(1, gt=0, description="With --seam-scale: how many layers on each side of a seam.")

    @field_validator("slices", mode="before")
    @classmethod
    def _parse_slices(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        out = []
        for part in [p for p in v.split(",") if p.strip()]:
            m = _SLICE_TEXT.match(part)
            if not m:
                raise ValueError(f"{part.strip()!r}: write START-END or NAME:START-END (END excluded), e.g. 0-24,8-32")
            out.append({"model": m.group(1) or SOURCE, "layers": (int(m.group(2)), int(m.group(3)))})
        return out

    @field_validator("slices")
    @classmethod
    def _not_empty(cls, v: list[SliceSpec] | None) -> list[SliceSpec] | None:
        if v is not None and not v:
            raise ValueError("give at least one slice")
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        out: dict[str, str] = {}
        for part in [p for p in v.split(",") if p.strip()]:
            name, sep, path = part.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"{part.strip()!r}: write NAME=DIR, e.g. other=./models/other")
            out[name.strip()] = path.strip()
        return out

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        if SOURCE in v:
            raise ValueError(f"{SOURCE!r} names the SOURCE argument; choose another name")
        for name in v:
            if not re.fullmatch(r"[\w.-]+", name):
                raise ValueError(f"model name {name!r}: use letters, digits, '_', '-', '.'")
        return v

    @field_validator("trainable", mode="before")
    @classmethod
    def _parse_trainable(cls, v: Any) -> Any:
        return comma_list(v, "'all', 'duplicated' or globs")

    @model_validator(mode="after")
    def _one_mode(self) -> "UpscaleConfig":
        if (self.drop is None) == (self.slices is None):
            raise ValueError("give exactly one of --drop M (the paper's recipe) or --slices (explicit layer ranges)")
        known = {SOURCE, *self.models}
        used = [s.model for s in self.slices or []] + ([self.embed_from] if self.embed_from else [])
        for name in used:
            if name not in known:
                raise ValueError(f"slice model {name!r} is not defined; known models: {', '.join(sorted(known))} "
                                 "(add it with --models NAME=DIR)")
        keywords = {"all", "duplicated"} & set(self.trainable)
        if keywords and len(self.trainable) > 1:
            raise ValueError(f"{sorted(keywords)[0]!r} cannot be combined with other entries: {self.trainable}")
        return self


# Config entries that must agree for layers of two models to be stacked.
_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
               "vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act", "rms_norm_eps")


@dataclass
class _Model:
    name: str
    reader: CheckpointReader
    index: int  # position in the plan's sources


def _check_compatible(base: _Model, other: _Model) -> list[str]:
    """Errors for a model that cannot be stacked with ``base``; notes for soft differences."""
    a, b = base.reader, other.reader
    where = f"models {base.name!r} ({a.path}) and {other.name!r} ({b.path})"
    if a.family.name != b.family.name:
        raise ConfigError(f"{where} are different architectures: {a.family.name} vs {b.family.name}; "
                          "slices must come from one family.")
    for key in _SHAPE_KEYS:
        va, vb = a.config.get(key), b.config.get(key)
        if key == "tie_word_embeddings":
            va, vb = a.tie_word_embeddings, b.tie_word_embeddings
        if va != vb:
            raise ConfigError(f"{where} differ in {key}: {va!r} vs {vb!r}; their layers cannot be stacked.")
    ta = {t.name: t for t in a}
    for t in b:
        if t.name in ta and ta[t.name].shape != t.shape:
            raise ConfigError(f"{where} differ in the shape of {t.name}: {ta[t.name].shape} vs {t.shape}.")
    notes = []
    dtypes_a, dtypes_b = {t.dtype for t in a}, {t.dtype for t in b}
    if dtypes_a != dtypes_b:
        notes.append(f"{where} store different dtypes ({sorted(dtypes_a)} vs {sorted(dtypes_b)}); "
                     f"{other.name!r} layers are cast to the dtype of {base.name!r}")
    if _tokenizer_digest(a) != _tokenizer_digest(b):
        notes.append(f"WARNING: {where} have different tokenizer files; the output carries the tokenizer of "
                     f"{base.name!r}. Stacking models trained with different tokenizers rarely works.")
    return notes


def _tokenizer_digest(reader: CheckpointReader) -> str:
    h = hashlib.sha256()
    for p in reader.carry_files():
        if p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _open_models(readers: Sequence[CheckpointReader], cfg: UpscaleConfig) -> dict[str, _Model]:
    from lmexpand.checkpoint.sources import open_source

    models = {SOURCE: _Model(SOURCE, readers[0], -1)}
    used = {s.model for s in cfg.slices or []} | ({cfg.embed_from} if cfg.embed_from else set())
    for name, path in cfg.models.items():
        if name in used:
            models[name] = _Model(name, open_source(path), -1)
    return models


def resolve_slices(num_layers: int, cfg: UpscaleConfig) -> list[SliceSpec]:
    if cfg.drop is None:
        assert cfg.slices is not None
        return list(cfg.slices)
    L, M = num_layers, cfg.drop
    if 2 * (L - M) <= L:
        raise ConfigError(
            f"--drop {M} on a {L}-layer model gives 2*({L}-{M}) = {2 * (L - M)} layers, "
            f"{'fewer than' if 2 * (L - M) < L else 'no more than'} the source's {L}: depth up-scaling "
            f"must add layers. Use --drop below {L}/2 (at most {(L - 1) // 2}); the paper drops a quarter (L/4 = {L // 4})."
        )
    return [SliceSpec(model=SOURCE, layers=(0, L - M)), SliceSpec(model=SOURCE, layers=(M, L))]


@register_method(
    "upscale",
    config=UpscaleConfig,
    summary="SOLAR depth up-scaling: stack layer slices of one or more models.",
    help="""Stack layer ranges of one or more same-architecture models into a deeper model
(SOLAR depth up-scaling, arXiv 2312.15166). Not function-preserving: continued
pretraining recovers the seam. --trainable says what that training updates.

\b
Examples:
  lmexpand surgery upscale smollm2-135m out/dus --drop 8          # 30 -> 44 layers
  lmexpand surgery upscale ./llama-2-7b out/solar --drop 8        # the paper: 32 -> 48
  lmexpand surgery upscale ./a out/frank --slices 0-20,b:8-32 --models b=./b
  lmexpand surgery upscale smollm2-135m out/dus --drop 8 --trainable duplicated --dry-run""",
)
def plan_upscale(readers: Sequence[CheckpointReader], cfg: UpscaleConfig) -> Plan:
    models = _open_models(readers, cfg)
    slices = resolve_slices(readers[0].num_layers, cfg)
    base = models[cfg.embed_from or slices[0].model]
    # the base model is source 0 of the plan: its config, tokenizer and files are carried
    ordered = [base.name] + [n for n in models if n != base.name]
    for i, n in enumerate(ordered):
        models[n].index = i
    family = base.reader.family
    assert family is not None
    notes: list[str] = []
    for m in models.values():
        if m is not base:
            notes += _check_compatible(base, m)

    for i, s in enumerate(slices):
        n = models[s.model].reader.num_layers
        start, end = s.layers
        if end > n:
            raise ConfigError(f"slice {i + 1} ({s.model}: [{start}, {end})): model {s.model!r} has {n} layers "
                              f"(0..{n - 1}), so the end may be at most {n}.")

    total = sum(end - start for s in slices for start, end in [s.layers])
    if total > MAX_LAYERS:
        raise ConfigError(f"the slices give {total:,} layers; at most {MAX_LAYERS:,} are accepted.")
    # output layer -> (model, source layer)
    sources: list[tuple[_Model, int]] = [(models[s.model], k) for s in slices for k in range(*s.layers)]
    seams = _seam_layers(slices, cfg.seam_layers) if cfg.seam_scale is not None else set()

    seen: set[tuple[str, int]] = set()
    duplicated: set[int] = set()
    for out_layer, (m, k) in enumerate(sources):
        if (m.name, k) in seen:
            duplicated.add(out_layer)
        seen.add((m.name, k))

    tensors: list[TensorPlan] = []
    base_dtype = {t.name: t.dtype for t in base.reader}
    non_layer = [t for t in base.reader if family.split_layer_name(t.name) is None]
    tensors += [TensorPlan(t.name, t.dtype, t.shape, Read(t.name, base.index)) for t in non_layer if t.name == family.embed]
    for out_layer, (m, k) in enumerate(sources):
        for t in m.reader.layer_tensors(k):
            _, relative = family.split_layer_name(t.name)  # type: ignore[misc]
            name = family.layer_name(out_layer, relative)
            op: Op = Read(t.name, m.index)
            offset = family.branch_end_offset(relative) if out_layer in seams else None
            if offset is not None:  # scales what the branch adds (a post-norm's scale about its zero point)
                op = Scale(op, cfg.seam_scale, offset)  # type: ignore[arg-type]
            tensors.append(TensorPlan(name, base_dtype.get(family.layer_name(0, relative), t.dtype), t.shape, op))
    tensors += [TensorPlan(t.name, t.dtype, t.shape, Read(t.name, base.index)) for t in non_layer if t.name != family.embed]

    trainable = _trainable(cfg.trainable, tensors, duplicated, family)
    config = _config(base, sources, family)
    single = len({m.name for m, _ in sources}) == 1
    layer_map: list[int | str] = [k if single else f"{m.name}:{k}" for m, k in sources]
    seam_at = [i for i in range(1, len(sources)) if sources[i] != (sources[i - 1][0], sources[i - 1][1] + 1)]
    notes.append(
        f"not function-preserving: {len(seam_at)} seam(s) at output layer(s) {', '.join(map(str, seam_at)) or '-'} "
        "(the hidden state skips to a layer trained on another depth); continued pretraining recovers it"
    )
    if seams:
        notes.append(f"seam scale {cfg.seam_scale:g} on {'/'.join(family.branch_ends)} of output layers {sorted(seams)}")
    if cfg.trainable == ["duplicated"] and not duplicated:
        raise ConfigError("--trainable duplicated: no layer appears twice in these slices, so nothing would train. "
                          "Use --trainable all or globs.")
    return Plan(
        method="upscale",
        arguments=cfg.model_dump(mode="json"),
        sources=[models[n].reader.path for n in ordered],
        config=config,
        tensors=tensors,
        new_parameters=trainable,
        function_preserving=False,
        layer_map=layer_map,
        notes=notes,
        extra_lineage={
            "trainable_default": "new_parameters",
            "trainable": cfg.trainable,
            "slices": [{"model": s.model, "layers": list(s.layers)} for s in slices],
            "models": {n: str(models[n].reader.path) for n in ordered},
            "duplicated_layers": sorted(duplicated),
            "seams": seam_at,
        },
        readers=[models[n].reader for n in ordered],
    )


def _seam_layers(slices: list[SliceSpec], width: int) -> set[int]:
    """Output indices of the ``width`` layers on each side of every boundary between two
    slices that do not continue each other (same model, end == next start)."""
    out: set[int] = set()
    starts = [0]
    for s in slices:
        starts.append(starts[-1] + s.layers[1] - s.layers[0])
    for i in range(1, len(slices)):
        prev, cur = slices[i - 1], slices[i]
        if prev.model == cur.model and prev.layers[1] == cur.layers[0]:
            continue
        seam = starts[i]
        out |= set(range(max(starts[i - 1], seam - width), min(starts[i + 1], seam + width)))
    return out


def _trainable(choice: list[str], tensors: list[TensorPlan], duplicated: set[int], family) -> list[str]:
    if choice == ["all"]:
        return [t.name for t in tensors]
    if choice == ["duplicated"]:
        return [t.name for t in tensors if (s := family.split_layer_name(t.name)) and s[0] in duplicated]
    return names_matching([t.name for t in tensors], choice)


def _config(base: _Model, sources: list[tuple[_Model, int]], family) -> dict[str, Any]:
    out = dict(base.reader.config)
    out[family.num_layers_key] = len(sources)
    for key in family.per_layer_keys:
        if isinstance(out.get(key), list):
            values = []
            for m, k in sources:
                lst = m.reader.config.get(key)
                if not isinstance(lst, list) or len(lst) != m.reader.num_layers:
                    raise ConfigError(f"{m.reader.path}/config.json: {key} must list one value per layer "
                                      f"({m.reader.num_layers}); fix the config.")
                values.append(lst[k])
            out[key] = values
    return out
