"""Co-LLM (Shen et al. 2024, arXiv 2403.03870; clinicalml/co-llm): a base model that learns,
token by token, when to defer to an assistant model.

A latent choice per token: ``P(x_t) = (1 - g_t)·P_base(x_t) + g_t·P_asst(x_t)`` with the gate
``g_t = σ(w·h_t)`` read from the base's last hidden state ``h_t`` (the official code stores
``w`` as an extra row of the base's LM head; here it is ``gate.weight`` [1, hidden], zero at
init: ``g = 0.5``). Training maximises the marginal likelihood of the target tokens,
``−logsumexp(log σ(−s_t) + log p_base(x_t), log σ(s_t) + log p_asst(x_t))`` with
``s_t = w·h_t``; the assistant is frozen (no gradients).

Outputs: ``forward`` returns the log of the marginal distribution as ``logits`` (so
perplexity is the marginal's); during ``generate`` it returns the hard switch: the
assistant's logits where ``g_t > threshold``, the base's elsewhere (threshold 1 = the base
alone, 0 = the assistant alone). While generating, the assistant runs only when some row
defers: the tokens it has not seen wait in the cache and are fed to it in one catch-up call
(its KV cache lags the base's until then). ``deferrals`` records, per generated step, which
rows deferred.

This file imports only torch and transformers (``lmexpand export`` ships it, ``auto_map``).
"""

from __future__ import annotations

import inspect as _inspect
import math
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_KW = "cache" if "cache" in _inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"


def _logit(p: float) -> float:
    if p >= 1:
        return math.inf
    if p <= 0:
        return -math.inf
    return math.log(p) - math.log1p(-p)


def postprocess_logits(config: dict, logits: torch.Tensor) -> torch.Tensor:
    """What the member's own ``*ForCausalLM`` does after its ``lm_head`` (config keys, any
    family): times ``logit_scale``, divided by ``logits_scaling`` (Granite), soft-capped by
    ``final_logit_softcapping`` (Gemma). Unchanged for a plain head."""
    if config.get("logit_scale") is not None:
        logits = logits * config["logit_scale"]
    if config.get("logits_scaling") is not None:
        logits = logits / config["logits_scaling"]
    cap = config.get("final_logit_softcapping")
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits

class CoLlmConfig(PretrainedConfig):
    model_type = "lmexpand_co_llm"

    def __init__(self, base: dict | None = None, assistant: dict | None = None, base_path: str | None = None,
                 assistant_path: str | None = None, threshold: float = 0.5, use_cache: bool = True, **kwargs):
        self.base = dict(base or {})
        self.assistant = dict(assistant or {})
        self.base_path = base_path
        self.assistant_path = assistant_path
        self.threshold = float(threshold)
        self.use_cache = use_cache
        if self.base:
            kwargs.setdefault("vocab_size", min(self.base["vocab_size"], self.assistant.get("vocab_size", 10**9)))
            for key in ("hidden_size", "num_hidden_layers", "max_position_embeddings"):
                if key in self.base:
                    kwargs.setdefault(key, self.base[key])
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def member_config(self, which: str) -> PretrainedConfig:
        d = dict(self.base if which == "base" else self.assistant)
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        if not (self.base_path if which == "base" else self.assistant_path):
            cfg.tie_word_embeddings = False  # self-contained export: every head written out
        return cfg


class CoLlmCache(DynamicCache):
    """The base's cache (this object), the assistant's, and the tokens the assistant has not
    seen yet (fed to it when some row defers)."""

    def __init__(self, base: PretrainedConfig, assistant: PretrainedConfig):
        super().__init__(config=base)
        self.assistant = DynamicCache(config=assistant)
        self.pending: list[torch.Tensor] = []
        self.pending_positions: list[torch.Tensor | None] = []


class CoLlmForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CoLlmConfig
    base_model_prefix = "co_llm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: CoLlmConfig):
        super().__init__(config)
        self.base = AutoModelForCausalLM.from_config(config.member_config("base"))
        self.assistant = AutoModelForCausalLM.from_config(config.member_config("assistant"))
        self.gate = nn.Linear(config.base["hidden_size"], 1, bias=False)
        self.threshold = config.threshold  # generate-time override: set model.threshold
        self.deferrals: list[torch.Tensor] = []  # per generated step: which rows deferred
        self.gate_values: list[torch.Tensor] = []  # per generated step: each row's g
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "gate", None):
            nn.init.zeros_(module.weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def trainable_sets(self) -> dict[str, list[str]]:
        """Named trainable sets for ``lmexpand train --trainable NAME``: the gate alone (the
        default), or the gate and the whole base model (the paper's setting)."""
        base = [f"base.{n}" for n, _ in self.base.named_parameters()]
        return {"gate": ["gate.weight"], "gate+base": ["gate.weight", *base]}

    def new_cache(self) -> CoLlmCache:
        return CoLlmCache(self.config.member_config("base"), self.config.member_config("assistant"))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        self.deferrals, self.gate_values = [], []
        if model_kwargs.get(CACHE_KW) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_KW] = self.new_cache()

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs["switch"] = True
        return inputs

    # -- the pieces ---------------------------------------------------------------------------
    def _base(self, input_ids, attention_mask, position_ids, cache, logits_to_keep=0):
        out = self.base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=cache is not None, **{CACHE_KW: cache})
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        v = self.config.vocab_size
        z = postprocess_logits(self.config.base, self.base.get_output_embeddings()(h))[..., :v]
        s = self.gate(h.to(self.gate.weight.dtype)).squeeze(-1).float()
        return z, s

    def _assistant(self, input_ids, attention_mask, position_ids, cache, logits_to_keep=0):
        with torch.no_grad():
            out = self.assistant(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=cache is not None, logits_to_keep=logits_to_keep, **{CACHE_KW: cache})
        return out.logits[..., :self.config.vocab_size]

    @staticmethod
    def marginal_log_probs(z_base: torch.Tensor, z_asst: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """log((1 − σ(s))·p_base + σ(s)·p_asst), per token of the vocabulary."""
        lb = torch.log_softmax(z_base.float(), dim=-1) + nn.functional.logsigmoid(-s)[..., None]
        la = torch.log_softmax(z_asst.float(), dim=-1) + nn.functional.logsigmoid(s)[..., None]
        return torch.logaddexp(lb, la)

    def lmexpand_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      labels: torch.Tensor) -> torch.Tensor:
        """Mean negative log marginal likelihood of ``labels`` (already shifted: labels[:, t]
        is the target after position t; -100 skipped). The training loop calls this instead
        of its fused head loss."""
        z_b, s = self._base(input_ids, attention_mask, None, None)
        z_a = self._assistant(input_ids, attention_mask, None, None)
        z_b, z_a, s = z_b[:, :-1], z_a[:, :-1], s[:, :-1]
        valid = labels != -100
        y = labels.clamp(min=0)[..., None]
        lp_b = torch.log_softmax(z_b.float(), dim=-1).gather(-1, y).squeeze(-1)
        lp_a = torch.log_softmax(z_a.float(), dim=-1).gather(-1, y).squeeze(-1)
        nll = -torch.logaddexp(nn.functional.logsigmoid(-s) + lp_b, nn.functional.logsigmoid(s) + lp_a)
        return (nll * valid).sum() / valid.sum().clamp(min=1)

    def lmexpand_init_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           labels: torch.Tensor, pos_weight: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Weak supervision of the gate (official code): pseudo-label 1 where the assistant's
        argmax is the target and the base's is not; BCE with positive weight 8 on the gate's
        logit, the backbones frozen. Returns (loss, share of positive labels)."""
        with torch.no_grad():
            h = self.base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            z_b = postprocess_logits(self.config.base, self.base.get_output_embeddings()(h))[..., :self.config.vocab_size]
            z_a = self._assistant(input_ids, attention_mask, None, None)
        s = self.gate(h[:, :-1].detach().to(self.gate.weight.dtype)).squeeze(-1).float()
        valid = labels != -100
        pseudo = (z_a[:, :-1].argmax(-1) == labels) & (z_b[:, :-1].argmax(-1) != labels)
        loss = nn.functional.binary_cross_entropy_with_logits(
            s[valid], pseudo[valid].float(), pos_weight=torch.tensor(pos_weight, device=s.device))
        return loss, pseudo[valid].float().mean()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, cache: Any = None, switch: bool = False,
                **kwargs) -> CausalLMOutputWithPast:
        use_cache = (self.config.use_cache if use_cache is None else use_cache) and not self.training
        cache = cache if cache is not None else past_key_values
        if not isinstance(cache, CoLlmCache):
            cache = self.new_cache() if use_cache else None
        if not switch:  # the marginal, over full sequences (evaluation, training with labels)
            z_b, s = self._base(input_ids, attention_mask, position_ids, cache, logits_to_keep)
            z_a = self._assistant(input_ids, attention_mask, position_ids, cache.assistant if cache else None,
                                  logits_to_keep)
            logits = self.marginal_log_probs(z_b, z_a, s)
        else:
            logits = self._switch(input_ids, attention_mask, position_ids, cache, logits_to_keep)
        loss = None
        if labels is not None:
            loss = nn.functional.nll_loss(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                          labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KW: cache})

    def threshold_logit(self) -> float:
        """The hard switch's rule in the gate's logit: defer where s > logit(threshold). σ(s)
        saturates to exactly 1.0 in float32 for a confident gate, where no probability
        threshold separates tokens; ``lmexpand eval`` decides by this same rule."""
        return _logit(self.threshold)

    def _switch(self, input_ids, attention_mask, position_ids, cache, logits_to_keep) -> torch.Tensor:
        """Hard switch at the last position: the assistant's logits where σ(s) > threshold."""
        z_b, s = self._base(input_ids, attention_mask, position_ids, cache, logits_to_keep or 1)
        z_b, s = z_b[:, -1:], s[:, -1:]
        defer = s > self.threshold_logit()  # [B, 1]
        self.deferrals.append(defer[:, 0].detach().cpu())
        self.gate_values.append(torch.sigmoid(s[:, 0]).detach().cpu())
        if cache is None:  # no cache: the assistant reads the whole sequence when needed
            if not bool(defer.any()):
                return z_b.float()
            z_a = self._assistant(input_ids, attention_mask, position_ids, None, 1)
        else:
            cache.pending.append(input_ids)
            cache.pending_positions.append(position_ids)
            if not bool(defer.any()):
                return z_b.float()
            ids = torch.cat(cache.pending, dim=1)
            pos = None if any(p is None for p in cache.pending_positions) else torch.cat(cache.pending_positions, 1)
            cache.pending, cache.pending_positions = [], []
            z_a = self._assistant(ids, attention_mask, pos, cache.assistant, 1)
        return torch.where(defer[..., None], z_a.float(), z_b.float())


AutoConfig.register("lmexpand_co_llm", CoLlmConfig, exist_ok=True)
AutoModelForCausalLM.register(CoLlmConfig, CoLlmForCausalLM, exist_ok=True)
