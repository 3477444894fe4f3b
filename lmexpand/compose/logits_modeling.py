"""Models composed at their outputs: a weighted sum of members' next-token logits, with an
optional plausibility mask. One mechanism for three published methods:

- **logit sum** (yuyijiong/Combined_LLM): ``z = z_1 + z_2 (+ ...)``, a product of experts
  ``p ∝ p_1·p_2``; only each member's LM head trains. The official code concatenates the
  backbones' last hidden states under one head ``[W_1 | W_2]``, which is the same sum;
  here every member keeps its own (untied) head, so training never moves an embedding.
- **proxy-tuning** (Liu et al. 2024, arXiv 2401.08565):
  ``z = z_base + α·(z_expert − z_antiexpert)``: weights ``(1, α, −α)``.
- **contrastive decoding** (O'Brien & Lewis 2023, arXiv 2309.09117):
  ``(1+β)·z_expert − β·z_amateur`` over the tokens the expert finds plausible,
  ``z_expert ≥ log α + max z_expert`` (−inf elsewhere): weights ``(1+β, −β)``, mask on
  member 0.

Every member reads the same token ids (one tokenizer); members whose vocabularies differ
only by padding rows are cut to the common prefix ``config.vocab_size``. The sum is taken
in fp32, member by member in order. Each member keeps its own KV cache during
generation (:class:`LogitCompositionCache`) and runs once per step.

This file imports only torch and transformers: ``lmexpand export`` ships it beside a
self-contained checkpoint (``auto_map``), loaded with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.
"""

from __future__ import annotations

import inspect as _inspect
import math
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# transformers 5.24 renamed the cache argument ``past_key_values`` -> ``cache``; the name the
# installed version uses, for everything passed to or read from transformers.
CACHE_KW = "cache" if "cache" in _inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"


class LogitCompositionConfig(PretrainedConfig):
    model_type = "lmexpand_logits"

    def __init__(self, members: list | None = None, member_paths: list | None = None, weights: list | None = None,
                 roles: list | None = None, trained_heads: bool = False, plausibility: dict | None = None,
                 method: str = "logit-sum", use_cache: bool = True, **kwargs):
        self.members = [dict(m) for m in (members or [])]
        self.member_paths = list(member_paths or [None] * len(self.members))
        self.weights = [float(w) for w in (weights or [1.0] * len(self.members))]
        self.roles = list(roles or [f"member {i}" for i in range(len(self.members))])
        self.trained_heads = trained_heads
        self.plausibility = dict(plausibility) if plausibility else None  # {"member": i, "alpha": a}
        self.method = method
        self.use_cache = use_cache
        if self.members:
            first = self.members[0]
            kwargs.setdefault("vocab_size", min(m["vocab_size"] for m in self.members))
            for key in ("hidden_size", "num_hidden_layers"):
                if key in first:
                    kwargs.setdefault(key, first[key])
            kwargs["max_position_embeddings"] = min(m.get("max_position_embeddings") or 10**9 for m in self.members)
        kwargs["tie_word_embeddings"] = False  # members tie (or not) their own heads, inside
        super().__init__(**kwargs)

    def member_config(self, i: int) -> PretrainedConfig:
        d = dict(self.members[i])
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        if self.trained_heads or not self.member_paths[i]:
            # the composition holds this member's head itself (a trained copy, or, in a
            # self-contained export, every tensor written out): never tied to its embedding
            cfg.tie_word_embeddings = False
        return cfg


class LogitCompositionCache(DynamicCache):
    """Member 0's cache (this object) and one cache per further member."""

    def __init__(self, configs: list[PretrainedConfig]):
        super().__init__(config=configs[0])
        self.others = [DynamicCache(config=c) for c in configs[1:]]

    def member(self, i: int) -> DynamicCache:
        return self if i == 0 else self.others[i - 1]


def combine(logits: list[torch.Tensor], weights: list[float], plausibility: dict | None) -> torch.Tensor:
    """``Σ w_i·z_i`` in fp32, in member order; with ``plausibility = {member: m, alpha: a}``
    tokens with ``z_m < log a + max z_m`` get −inf."""
    total = None
    for w, z in zip(weights, logits):
        term = z.float() * w
        total = term if total is None else total + term
    if plausibility:
        ref = logits[plausibility["member"]].float()
        cutoff = math.log(plausibility["alpha"]) + ref.max(dim=-1, keepdim=True).values
        total = total.masked_fill(ref < cutoff, float("-inf"))
    return total


class LogitCompositionForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LogitCompositionConfig
    base_model_prefix = "composition"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: LogitCompositionConfig):
        super().__init__(config)
        self.members = nn.ModuleList(AutoModelForCausalLM.from_config(config.member_config(i))
                                     for i in range(len(config.members)))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from a member or from the composition's own files

    def get_input_embeddings(self) -> nn.Module:
        return self.members[0].get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return _ConcatenatedHeads(self)

    def get_decoder(self) -> nn.Module:
        return _ConcatenatedDecoder(self)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        if model_kwargs.get(CACHE_KW) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_KW] = self.new_cache()

    def new_cache(self) -> LogitCompositionCache:
        return LogitCompositionCache([self.config.member_config(i) for i in range(len(self.members))])

    def member_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: Any = None, logits_to_keep: int = 0,
                      **kwargs) -> list[torch.Tensor]:
        """Each member's own logits (its full forward: family-specific logit scaling
        included), cut to the common vocabulary."""
        v = self.config.vocab_size
        out = []
        for i, member in enumerate(self.members):
            res = member(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=cache is not None, logits_to_keep=logits_to_keep,
                         **{CACHE_KW: cache.member(i) if cache is not None else None}, **kwargs)
            out.append(res.logits[..., :v])
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, cache: Any = None,
                **kwargs) -> CausalLMOutputWithPast:
        use_cache = (self.config.use_cache if use_cache is None else use_cache) and not self.training
        cache = cache if cache is not None else past_key_values  # either name (see CACHE_KW)
        if not isinstance(cache, LogitCompositionCache):
            cache = self.new_cache() if use_cache else None
        kwargs = {k: v for k, v in kwargs.items() if k in ("cache_position",)}
        logits = combine(self.member_logits(input_ids, attention_mask, position_ids, cache, logits_to_keep, **kwargs),
                         self.config.weights, self.config.plausibility)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KW: cache})


class _ConcatenatedDecoder(nn.Module):
    """``get_decoder()`` for lmexpand's fused loss: the members' last hidden states side by
    side, each scaled by its weight, so that ``[W_1 | W_2 | ...]·[w_1·h_1; w_2·h_2; ...]``
    is the weighted logit sum (the official logit-sum code's own form)."""

    def __init__(self, model: LogitCompositionForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        if self.model.config.plausibility:
            raise ValueError("a plausibility-masked composition has no trainable head (nothing to train)")
        hs = []
        for w, member in zip(self.model.config.weights, self.model.members):
            h = member.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            hs.append(h.to(member.get_output_embeddings().weight.dtype) * w)
        return BaseModelOutputWithPast(last_hidden_state=torch.cat(hs, dim=-1))


class _ConcatenatedHeads(nn.Module):
    """``get_output_embeddings()``: ``.weight`` is the members' heads cut to the common
    vocabulary and concatenated along the hidden dimension (gradients flow to each head)."""

    def __init__(self, model: LogitCompositionForCausalLM):
        super().__init__()
        self._model = [model]  # not a submodule: the heads stay registered under members.*

    @property
    def weight(self) -> torch.Tensor:
        model = self._model[0]
        v = model.config.vocab_size
        heads = [m.get_output_embeddings().weight[:v] for m in model.members]
        dtype = heads[0].dtype
        return torch.cat([h.to(dtype) for h in heads], dim=1)


AutoConfig.register("lmexpand_logits", LogitCompositionConfig, exist_ok=True)
AutoModelForCausalLM.register(LogitCompositionConfig, LogitCompositionForCausalLM, exist_ok=True)
