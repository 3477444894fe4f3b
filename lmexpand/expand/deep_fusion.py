"""Deep-fusion experts (CogVLM, Wang et al. 2023, arXiv 2311.03079 §2.2), for text spans;
the model is :mod:`lmexpand.compose.deep_fusion_modeling`.

CogVLM adds to every layer a trainable copy of the attention's QKV/output projections and
of the FFN, initialised from the LLM's own weights; image tokens use the copies, text tokens
the originals, attention stays joint. Here the "new kind" of token is any token inside a
span delimited by marker tokens (Markdown code fences, formula delimiters, a language tag):
the expert fires only there, so a text without markers is computed by the original weights
alone, bit for bit. The surgery writes the expert copies (raw byte copies of the source's
projections, the new parameters) and references the source by path and fingerprint.

Markers must be single tokens; every token of the vocabulary that decodes to the marker
(ignoring surrounding whitespace: "```", " ```", "```\\n") counts. Markers themselves are
processed by the original weights. A vision encoder is out of scope: the token types are a
[batch, seq] mask computed from the ids, so a later embedding input could set it directly.
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field, field_validator

from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.checkpoint.tokenizer import load_tokenizer
from lmexpand.compose.kinds.deep_fusion import KIND
from lmexpand.errors import ConfigError
from lmexpand.expand.layer_spec import parse_layer_spec, select_layers
from lmexpand.expand.plan import Plan, Read, TensorPlan
from lmexpand.expand.registry import MethodConfig, comma_list, register_method


class DeepFusionMethodConfig(MethodConfig):
    open: str = Field(..., description="Marker that opens a span (a single token), e.g. '```'. Alone, it toggles.")
    close: str | None = Field(None, description="Marker that closes a span (a single token); default: --open toggles.")
    layers: str = Field("all", description="Layers with experts: all, every:N (layers N-1, 2N-1, ...), or I,J,... "
                        "(0-based).")
    parts: list[Literal["attn", "mlp"]] = Field(["attn", "mlp"], description="Which projections get experts: attn "
                                                "(q, k, v, o), mlp (gate, up, down).")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: str) -> str:
        return parse_layer_spec(v, "give all, every:N, or comma-separated layer indices")

    @field_validator("parts", mode="before")
    @classmethod
    def _parts(cls, v):
        return comma_list(v, "attn, mlp or attn,mlp")


def marker_ids(tokenizer, marker: str, flag: str) -> list[int]:
    """Every token id that decodes to ``marker`` (whitespace around it ignored); the marker
    itself must be one token."""
    if not marker.strip():
        raise ConfigError(f"{flag} {marker!r}: give a visible marker, e.g. '```'.")
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ConfigError(f"{flag} {marker!r} is not a single token of this tokenizer: it tokenizes as {len(ids)} "
                          f"tokens {pieces} (ids {ids}). Choose a marker that is one token (a span delimiter the "
                          "tokenizer keeps whole), or add it as a token to the tokenizer first.")
    target = marker.strip()
    forms = sorted(i for tok, i in tokenizer.get_vocab().items()
                   if tokenizer.convert_tokens_to_string([tok]).strip() == target)
    return sorted(set(forms) | set(ids))


@register_method(
    "deep-fusion",
    config=DeepFusionMethodConfig,
    summary="Deep-fusion experts: per-layer expert projections for tokens inside marked spans.",
    help="""Add CogVLM-style expert copies of the attention and/or MLP projections, used only by
tokens inside spans delimited by marker tokens (e.g. Markdown code fences). Any text
without a marker is computed by the original weights, bit for bit; at init the model is
exact everywhere (the experts are copies). Only the experts train. OUT holds the experts
and a reference to SOURCE; `lmexpand export` makes it self-contained.

\b
Examples:
  lmexpand surgery deep-fusion smollm2-135m out/df --open '```'
  lmexpand surgery deep-fusion ./model out/df --open '<math>' --close '</math>' --layers every:2 --parts mlp""",
)
def plan_deep_fusion(readers: Sequence[CheckpointReader], cfg: DeepFusionMethodConfig) -> Plan:
    (src,) = readers
    fam = src.family
    tok = load_tokenizer(src.path, what="SOURCE")
    open_ids = marker_ids(tok, cfg.open, "--open")
    close_ids = marker_ids(tok, cfg.close, "--close") if cfg.close is not None else None
    if close_ids is not None and set(open_ids) & set(close_ids):
        raise ConfigError(f"--open {cfg.open!r} and --close {cfg.close!r} share token ids; give one marker to toggle, "
                          "or two different ones.")
    layers = select_layers(cfg.layers, src.num_layers, name=f"--layers {cfg.layers}", every_within_model=True)
    projections = []
    if "attn" in cfg.parts:
        projections += [n[:-len(".weight")] for n in fam.layer_tensors
                        if n.startswith("self_attn.") and n.endswith("_proj.weight")]
    if "mlp" in cfg.parts:
        projections += list(fam.mlp_projections)
    tensors = []
    for i in layers:
        for proj in projections:
            for leaf in ("weight", "bias"):
                name = fam.layer_name(i, f"{proj}.{leaf}")
                if name in src:
                    info = src.info(name)
                    tensors.append(TensorPlan(f"experts.{i}.{proj}.{leaf}", info.dtype, tuple(info.shape), Read(name)))
    config = {
        "model_type": KIND.model_type,
        "architectures": [KIND.model_class],
        "source": dict(src.config),
        "source_path": str(src.path.resolve()),
        "open_ids": open_ids,
        "close_ids": close_ids,
        "layers": layers,
        "projections": projections,
        "vocab_size": src.config.get("vocab_size"),
        "hidden_size": src.config.get("hidden_size"),
        "num_hidden_layers": src.num_layers,
        "max_position_embeddings": src.config.get("max_position_embeddings"),
        "bos_token_id": src.config.get("bos_token_id"),
        "eos_token_id": src.config.get("eos_token_id"),
        "pad_token_id": src.config.get("pad_token_id"),
        "tie_word_embeddings": False,
    }
    show = lambda ids: ", ".join(f"{i} {tok.convert_ids_to_tokens(i)!r}" for i in ids)  # noqa: E731
    notes = [f"--open {cfg.open!r}: token ids {show(open_ids)}"]
    if close_ids is not None:
        notes.append(f"--close {cfg.close!r}: token ids {show(close_ids)}")
    else:
        notes.append("one marker: each occurrence toggles the span")
    notes.append(f"experts in {len(layers)} layers ({cfg.layers}) for {', '.join(projections)}; markers themselves use "
                 "the original weights")
    return Plan(method="deep-fusion", arguments=cfg.model_dump(mode="json"), sources=[src.path], config=config,
                tensors=tensors, new_parameters=[t.name for t in tensors], function_preserving=True, notes=notes,
                extra_lineage={"trainable_default": "new_parameters"})
