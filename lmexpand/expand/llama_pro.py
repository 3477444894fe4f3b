"""LLaMA-Pro block expansion (Wu et al., 2024, arXiv 2401.02415).

Section 3.1 of the paper: split the L decoder blocks into N groups; after each group insert
P copies of the group's last block whose *output* linear layers -- attention ``o_proj`` and
MLP ``down_proj`` -- are set to zero. A pre-norm block computes ``h + attn(norm(h))`` and
then ``h + mlp(norm(h))``; with both output projections zero (and their biases, if any) each
residual branch adds exactly 0, so the new block is the identity and the expanded model
computes exactly what the source did, in any precision. Families whose branches end in a
post-norm (Gemma, OLMo-2: ``h + norm(attn(h))``) get that norm's scale zeroed instead (weight
0, or -1 for Gemma's ``(1 + w)``), the projections copied; which tensors end a branch is
family data (``Family.branch_ends``). Only the new blocks train
(Section 3.2), so the original weights -- and what they know -- stay untouched.

Paper setting: LLaMA-2-7B, N = 8 groups of 4 blocks, P = 1 -> 40 blocks.
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field, field_validator, model_validator

from lmexpand.checkpoint.limits import MAX_LAYERS
from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.errors import ConfigError
from lmexpand.expand.plan import NewInit, Op, Plan, Read, TensorPlan, Zeros, remap_layers
from lmexpand.expand.registry import MethodConfig, register_method


class LlamaProConfig(MethodConfig):
    add: int | None = Field(
        None, gt=0,
        description="Number of groups N: the L blocks are split into N groups and P identity "
        "copies are inserted at each group boundary (N*P new blocks). When N does not divide L, "
        "the first L mod N groups get one block more.",
    )
    per_group: int = Field(1, gt=0, description="Copies P inserted per group (or per position).")
    positions: list[int] | None = Field(
        None, description="Insert after these 0-based layer indices instead of using groups, e.g. 3,7,11."
    )
    copy_from: Literal["previous", "next"] = Field(
        "previous",
        description="Copy the block before the insertion point (the paper) or the one after it. "
        "With groups, 'next' inserts before each group's first block, copying it.",
    )

    @field_validator("positions")
    @classmethod
    def _positions_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one layer index")
        dup = sorted({p for p in v if v.count(p) > 1})
        if dup:
            raise ValueError(f"layer index {dup[0]} appears more than once")
        if min(v) < 0:
            raise ValueError(f"layer index {min(v)} is negative; indices are 0-based")
        return sorted(v)

    @model_validator(mode="after")
    def _one_mode(self) -> "LlamaProConfig":
        if (self.add is None) == (self.positions is None):
            raise ValueError("give exactly one of --add N (groups) or --positions i,j,... (explicit layers)")
        return self


def group_bounds(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """[start, end) of each group; the first ``num_layers % groups`` groups get one more."""
    base, extra = divmod(num_layers, groups)
    bounds, start = [], 0
    for g in range(groups):
        end = start + base + (1 if g < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def insertion_points(num_layers: int, cfg: LlamaProConfig) -> dict[int, int]:
    """``{insert_after: copy_of}``; ``insert_after == -1`` means before the first block."""
    points: dict[int, int] = {}
    if cfg.add is not None:
        if cfg.add > num_layers:
            raise ConfigError(
                f"--add {cfg.add}: the model has {num_layers} blocks, so at most {num_layers} groups "
                f"(one copy after every block). Use --add 1..{num_layers}, or --per-group for more copies."
            )
        for start, end in group_bounds(num_layers, cfg.add):
            if cfg.copy_from == "previous":
                points[end - 1] = end - 1
            else:
                points[start - 1] = start
        return points
    assert cfg.positions is not None
    bad = [p for p in cfg.positions if p >= num_layers]
    if bad:
        raise ConfigError(
            f"--positions: layer {bad[0]} is out of range; the model has {num_layers} blocks (0..{num_layers - 1})."
        )
    for p in cfg.positions:
        if cfg.copy_from == "next":
            if p == num_layers - 1:
                raise ConfigError(
                    f"--positions {p} with --copy-from next: block {p} is the last one, there is no next "
                    "block to copy. Use --copy-from previous for this position."
                )
            points[p] = p + 1
        else:
            points[p] = p
    return points


@register_method(
    "llama-pro",
    config=LlamaProConfig,
    summary="LLaMA-Pro block expansion: insert identity-initialized copies of blocks.",
    help="""Insert copies of decoder blocks whose attention output projection and MLP down
projection are zero, so the expanded model computes exactly what the source did
(LLaMA-Pro, arXiv 2401.02415). Only the new blocks are listed as trainable.

\b
Examples:
  lmexpand surgery llama-pro smollm2-135m out/pro --add 6
  lmexpand surgery llama-pro ./llama-2-7b out/llama-pro-8b --add 8      # the paper: 32 -> 40
  lmexpand surgery llama-pro smollm2-135m out/pro --positions 9,19,29 --per-group 2
  lmexpand surgery llama-pro smollm2-135m out/pro --add 6 --dry-run""",
)
def plan_llama_pro(readers: Sequence[CheckpointReader], cfg: LlamaProConfig) -> Plan:
    (reader,) = readers
    family = reader.family
    assert family is not None
    num_layers = reader.num_layers
    points = insertion_points(num_layers, cfg)
    total = num_layers + len(points) * cfg.per_group
    if total > MAX_LAYERS:
        raise ConfigError(f"--per-group {cfg.per_group}: the output would have {total:,} layers; at most "
                          f"{MAX_LAYERS:,} are accepted. Lower --per-group or --add.")

    layer_map: list[int | str] = []  # output layer -> source layer, or "new copy of k"
    layer_sources: list[int] = []

    def insert_copies(after: int) -> None:
        if after in points:
            for _ in range(cfg.per_group):
                layer_map.append(f"new copy of {points[after]}")
                layer_sources.append(points[after])

    insert_copies(-1)
    for layer in range(num_layers):
        layer_map.append(layer)
        layer_sources.append(layer)
        insert_copies(layer)

    def identity_op(relative: str) -> Op | None:
        # what ends each residual branch (output projection, or post-norm) outputs exactly 0:
        # the branch adds exactly 0 (families.py says which tensors and the norm's zero point)
        offset = family.branch_end_offset(relative)
        if offset is None:
            return None
        return Zeros() if offset == 0 else NewInit(0.0, 0, mean=-offset)

    tensors: list[TensorPlan] = []
    new_parameters: list[str] = []
    non_layer = [t for t in reader if family.split_layer_name(t.name) is None]
    tensors += [TensorPlan(t.name, t.dtype, t.shape, Read(t.name)) for t in non_layer if t.name == family.embed]
    for out_layer, (entry, src_layer) in enumerate(zip(layer_map, layer_sources)):
        is_new = isinstance(entry, str)
        for t in reader.layer_tensors(src_layer):
            _, relative = family.split_layer_name(t.name)  # type: ignore[misc]
            name = family.layer_name(out_layer, relative)
            op = (identity_op(relative) if is_new else None) or Read(t.name)
            tensors.append(TensorPlan(name, t.dtype, t.shape, op))
            if is_new:
                new_parameters.append(name)
    tensors += [TensorPlan(t.name, t.dtype, t.shape, Read(t.name)) for t in non_layer if t.name != family.embed]

    try:
        config = remap_layers(reader.config, family.num_layers_key, family.per_layer_keys, layer_sources)
    except ValueError as e:
        raise ConfigError(f"{reader.path}/config.json: {e}; fix the config.") from None

    notes = []
    if cfg.add is not None:
        sizes = [end - start for start, end in group_bounds(num_layers, cfg.add)]
        if len(set(sizes)) > 1:
            notes.append(f"{num_layers} blocks do not split evenly into {cfg.add} groups: group sizes {sizes}")
    return Plan(
        method="llama-pro",
        arguments=cfg.model_dump(),
        sources=[reader.path],
        config=config,
        tensors=tensors,
        new_parameters=new_parameters,
        function_preserving=True,
        layer_map=layer_map,
        notes=notes,
        extra_lineage={"trainable_default": "new_parameters"},
    )
