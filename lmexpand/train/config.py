"""Training settings: one typed model for the CLI and the recipes' ``train`` section."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from lmexpand.validation import STRICT, validate
from lmexpand.checkpoint.limits import MAX_INIT_STEPS, MAX_STEPS


class _Strict(BaseModel):
    model_config = STRICT


# by extension; a directory is a `datasets.save_to_disk` directory; anything else is plain text
_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


class DataSource(_Strict):
    """One training corpus: plain text (paragraphs separated by blank lines are documents),
    or records (JSONL, parquet, arrow, CSV, a ``datasets.save_to_disk`` directory) read
    through a text field, a template over fields, or as chat conversations."""

    path: Path
    format: Literal["auto", "text", "jsonl", "parquet", "arrow", "csv", "disk"] = Field(
        "auto", description="auto: by extension (.jsonl/.json, .parquet, .arrow, .csv; a directory is a "
        "datasets.save_to_disk directory; anything else is text)")
    field: str = Field("text", description="the field (column) holding the document text")
    template: str | None = Field(
        None, description="template over fields, e.g. 'Question: {question}\\nAnswer: {answer}' (overrides field)"
    )
    loss_from: str | None = Field(
        None, description="train only on what follows the first occurrence of this text in each document "
        "(e.g. 'Answer:'): the prompt is context, not a target. Documents without it train on every token.",
    )
    chat: Literal["auto", "messages", "alpaca", "sharegpt"] | None = Field(
        None, description="records are conversations, rendered with the model's chat template; the loss is on "
        "the assistant turns only. messages: `messages` [{role, content}]; alpaca: instruction/input/output; "
        "sharegpt: `conversations` [{from, value}]; auto: by the fields present",
    )
    weight: float | None = Field(
        None, description="mixture weight: blocks are drawn from the sources in these proportions (all sources "
        "weighted, or none)",
    )
    name: str | None = Field(None, description="the source's name in logs and metrics (default: the file name)")

    @model_validator(mode="before")
    @classmethod
    def _weight_positive(cls, values):
        import math

        w = values.get("weight") if isinstance(values, dict) else None
        if w is not None and not isinstance(w, bool) and isinstance(w, (int, float)) and not (math.isfinite(w) and w > 0):
            raise ValueError(f"the mixture weight of {values.get('path')} is {w}; a weight is a positive finite number "
                             "(e.g. --data math.jsonl:0.7 --data general.txt:0.3, recipe key weight: 0.7)")
        return values

    @property
    def kind(self) -> str:
        if self.format != "auto":
            return self.format
        if self.path.is_dir():
            return "disk"
        return _BY_SUFFIX.get(self.path.suffix.lower(), "text")

    @property
    def label(self) -> str:
        return self.name or self.path.name


class LoraSettings(_Strict):
    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class TrainConfig(_Strict):
    model: Path = Field(description="expanded model directory (with lmexpand.json)")
    data: list[DataSource] = Field(min_length=1)
    out: Path = Field(description="run directory: checkpoints, metrics, and the final model in out/model")
    seq_len: int = Field(512, gt=1)
    batch_size: int = Field(4, gt=0, description="sequences per device per micro-step")
    grad_accum: int = Field(1, gt=0)
    max_steps: int = Field(100, gt=0, le=MAX_STEPS, description="optimizer steps")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(10, ge=0, description="linear warmup steps; when not given: 10, or a tenth of "
                              "max_steps for runs shorter than 100 steps")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    gradient_checkpointing: bool = False
    lean_mlp: bool = Field(True, description="SwiGLU MLPs keep 2 of 3 activations for backward (recompute silu)")
    verify_hashes: bool = Field(
        True, description="check the model's shards against the sha256 recorded in lmexpand.json before loading "
        "(one read of the weights); --no-verify-hashes skips it",
    )
    allow_pickle: bool = Field(
        False, description="accept a model whose weights are only pytorch_model.bin (pickle), loaded weights-only. "
        "Only for trusted files")
    load_in_4bit: bool = Field(False, description="frozen base in 4-bit NF4 (bitsandbytes); trained tensors stay full precision")
    trainable: Literal["new", "all", "none"] | list[str] = Field(
        "new", description="'new' (lmexpand.json's new_parameters), 'all' (full fine-tuning), 'none' (with lora), or globs"
    )
    extra_trainable: list[str] = Field(default_factory=list, description="globs added to the trainable set, e.g. '*norm*'")
    lora: LoraSettings | None = None
    val_fraction: float = Field(0.02, ge=0, lt=1, description="documents held out for validation")
    val_every: int = Field(50, ge=0, description="optimizer steps between validations (0: only at the end)")
    val_batches: int = Field(8, gt=0)
    save_every: int = Field(0, ge=0, description="optimizer steps between checkpoints (0: none before the end)")
    keep_last: int = Field(2, gt=0)
    log_every: int = Field(1, gt=0)
    seed: int = 0
    streaming: bool = Field(False, description="stream the corpus instead of loading it (larger than RAM)")
    chat_template: str | None = Field(
        None, description="chat sources: 'chatml', or a Jinja template file, instead of the model's own chat "
        "template (needed when the tokenizer has none)")
    document_masking: bool = Field(
        False, description="packed blocks: attention stops at document boundaries (position ids restart at each "
        "document; block-diagonal causal mask, or the varlen path of flash attention)")
    pack: bool = Field(
        True, description="pack documents into seq_len blocks with EOS separators; --no-pack: one document per "
        "block, cut at seq_len and padded (padding is never a target)",
    )
    loss_chunk: int = Field(256, gt=0, description="tokens per chunk of the fused lm_head + cross-entropy")
    tensorboard: bool = True
    co_llm_init_steps: int = Field(
        0, ge=0, le=MAX_INIT_STEPS, description="Co-LLM models: steps of weak-supervision gate initialisation before training (the "
        "gate alone, weighted BCE on pseudo-labels: 1 where the assistant's argmax is the target and the base's is not)",
    )
    moe_balance_coef: float = Field(0.01, ge=0, description="MoE models: weight of the expert load-balancing loss")
    moe_z_coef: float = Field(0.001, ge=0, description="MoE models: weight of the router z-loss")
    moe_router_lr_scale: float = Field(
        0.01, gt=0, description="MoE models: routers train at lr x this. Fine-grained experts are different parts "
        "of the FFN, so routing weights drifting from 1 distort it; Adam moves every router weight by ~lr per step",
    )
    moe_bias_rate: float = Field(
        0.001, ge=0, description="MoE models with a correction bias (Glm4-MoE): aux-loss-free balancing step "
        "(DeepSeek-V3); 0 keeps the bias fixed",
    )

    @field_validator("trainable")
    @classmethod
    def _globs_not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("give at least one glob, or 'new' or 'all'")
        return v

    @model_validator(mode="after")
    def _weights_all_or_none(self) -> "TrainConfig":
        weighted = [d for d in self.data if d.weight is not None]
        if weighted and len(weighted) != len(self.data):
            bare = [str(d.path) for d in self.data if d.weight is None]
            raise ValueError(f"data: {len(weighted)} source(s) have a mixture weight and {', '.join(bare)} has none; "
                             "give every source a weight (--data FILE:WEIGHT, recipe key weight) or none")
        labels = [d.label for d in self.data]
        if weighted and len(set(labels)) != len(labels):
            raise ValueError(f"data: two mixture sources share the name {next(l for l in labels if labels.count(l) > 1)!r}; "
                             "give each a distinct name (recipe key name)")
        return self

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainConfig":
        if "warmup_steps" not in self.model_fields_set:  # a default adapts to the run it is in
            object.__setattr__(self, "warmup_steps", min(10, self.max_steps // 10))
        elif self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup steps ({self.warmup_steps}) exceed max steps ({self.max_steps}): give "
                             f"--warmup-steps (recipe key warmup_steps) of at most {self.max_steps}")
        return self


def parse_train_config(values: dict, *, style: str = "flag") -> TrainConfig:
    """Validate, reporting every problem at once with the flag (or key), value and rule."""
    return validate(TrainConfig, values, what="train", style=style)
