"""CALM composed model (Bansal et al., 2024, arXiv 2401.02412): an anchor LLM reads an
augmenting LLM's layer representations through trainable cross-attention bridges.

This file imports only torch and transformers: `lmexpand export` ships it beside a
self-contained checkpoint (``auto_map``), so the composed model loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` without lmexpand.

For each pair (anchor layer a, augmenting layer g) a bridge

    x_a <- x_a + o(MHA(q(norm(x_a)), k(p), v(p))),   p = proj(norm(h_g))

is added to the output of anchor layer a: queries from the anchor stream, keys and values
from the augmenting model's layer-g output projected to the anchor's width. ``o`` starts
at zero, so the composed model computes exactly the anchor at init. Causal: anchor
position t attends to augmenting positions <= t (both models read the same tokens: the
tokenizer is shared). Padded keys are masked; padded queries get a zero bridge output.

With a cache, the augmenting model keeps its own KV cache and every bridge keeps its
projected keys/values, so generation costs one new token through both models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, GenerationMixin
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

import inspect as _inspect

# transformers 5.24 renamed the cache argument of forward / generate / model outputs from
# ``past_key_values`` to ``cache`` (utils/generic.py `_rename_kwargs_for_bc`; generate now
# keeps ``model_kwargs["cache"]`` and passes ``cache=`` to the model). A composed model
# that read only ``past_key_values`` silently got no cache during generation. The name the
# installed version uses, for everything we pass to or get from transformers:
CACHE_KW = "cache" if "cache" in _inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"


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


# the anchor's logit post-processing keys, kept at the top level of the composed config too:
# the training loss reads them there (lmexpand.checkpoint.families.logit_postprocessing)
LOGIT_KEYS = ("logit_scale", "logits_scaling", "final_logit_softcapping")

class CalmConfig(PretrainedConfig):
    model_type = "lmexpand_calm"

    def __init__(self, anchor: dict | None = None, augment: dict | None = None, pairs: list | None = None,
                 num_heads: int = 4, anchor_path: str | None = None, augment_path: str | None = None,
                 use_cache: bool = True, bridge_rope_theta: float | None = 10000.0, **kwargs):
        self.use_cache = use_cache
        self.bridge_rope_theta = bridge_rope_theta
        self.anchor = anchor or {}
        self.augment = augment or {}
        self.pairs = [list(p) for p in (pairs or [])]
        self.num_heads = num_heads
        self.anchor_path = anchor_path
        self.augment_path = augment_path
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings") + LOGIT_KEYS:
            if key in self.anchor:
                kwargs.setdefault(key, self.anchor[key])
        kwargs["tie_word_embeddings"] = False  # the anchor ties its own head, inside
        super().__init__(**kwargs)

    def sub_config(self, which: str) -> PretrainedConfig:
        d = dict(self.anchor if which == "anchor" else self.augment)
        return AutoConfig.for_model(d.pop("model_type"), **d)


class CalmCache(DynamicCache):
    """The anchor's cache (this object), the augmenting model's, and each bridge's K/V."""

    def __init__(self, anchor: PretrainedConfig, augment: PretrainedConfig):
        super().__init__(config=anchor)
        self.augment = DynamicCache(config=augment)
        self.bridge_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.bridge_mask: torch.Tensor | None = None  # [B, S] key validity so far


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float | None) -> torch.Tensor:
    """Rotary position embedding over the last dim of ``x`` [B, H, T, D] for ``positions``
    [B, T] (both streams read the same tokens, so their positions are the same numbers)."""
    if theta is None:
        return x
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions[:, None, :, None].float() * inv
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return (x.float() * cos + torch.cat([-x2, x1], -1).float() * sin).to(x.dtype)


class CalmBridge(nn.Module):
    def __init__(self, d_anchor: int, d_aug: int, heads: int, eps: float = 1e-6, rope_theta: float | None = 10000.0):
        super().__init__()
        if d_anchor % heads:
            raise ValueError(f"anchor width {d_anchor} is not divisible by {heads} bridge heads")
        self.heads = heads
        self.rope_theta = rope_theta
        self.norm_q = nn.RMSNorm(d_anchor, eps=eps)
        self.norm_kv = nn.RMSNorm(d_aug, eps=eps)
        self.proj = nn.Linear(d_aug, d_anchor, bias=False)
        self.q_proj = nn.Linear(d_anchor, d_anchor, bias=False)
        self.k_proj = nn.Linear(d_anchor, d_anchor, bias=False)
        self.v_proj = nn.Linear(d_anchor, d_anchor, bias=False)
        self.o_proj = nn.Linear(d_anchor, d_anchor, bias=False)

    def keys_values(self, h_aug: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.proj(self.norm_kv(h_aug.to(self.proj.weight.dtype)))
        return rope(self._split(self.k_proj(p)), positions, self.rope_theta), self._split(self.v_proj(p))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                query_valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q = rope(self._split(self.q_proj(self.norm_q(x.to(self.q_proj.weight.dtype)))), positions, self.rope_theta)
        att = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, h, t, dh = att.shape
        out = self.o_proj(att.transpose(1, 2).reshape(b, t, h * dh))
        return x + (out * query_valid[..., None]).to(x.dtype)


def bridge_mask(key_valid: torch.Tensor, past: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean [B, 1, t, S] mask (True = attend) for queries at positions past..past+t-1
    over keys 0..S-1, and the [B, t] validity of the queries. A padded query may attend to
    every earlier key (so no row is empty); its output is zeroed."""
    s = key_valid.shape[1]
    causal = torch.arange(s, device=key_valid.device)[None, :] <= (past + torch.arange(t, device=key_valid.device))[:, None]
    query_valid = key_valid[:, past:past + t]
    allowed = causal[None] & (key_valid[:, None, :] | ~query_valid[:, :, None])
    return allowed[:, None], query_valid.to(torch.float32)


class CalmForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CalmConfig
    base_model_prefix = "calm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: CalmConfig):
        super().__init__(config)
        self.anchor = AutoModelForCausalLM.from_config(config.sub_config("anchor"))
        self.augment = AutoModel.from_config(config.sub_config("augment"))
        d_a, d_g = config.anchor["hidden_size"], config.augment["hidden_size"]
        eps = config.anchor.get("rms_norm_eps", 1e-6)
        self.bridges = nn.ModuleList(CalmBridge(d_a, d_g, config.num_heads, eps, config.bridge_rope_theta)
                                     for _ in config.pairs)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, CalmBridge):
            for lin in (module.proj, module.q_proj, module.k_proj, module.v_proj):
                nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(module.o_proj.weight)
            nn.init.ones_(module.norm_q.weight)
            nn.init.ones_(module.norm_kv.weight)

    def get_input_embeddings(self) -> nn.Module:
        return self.anchor.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.anchor.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return _ComposedDecoder(self)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        if model_kwargs.get(CACHE_KW) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_KW] = CalmCache(self.config.sub_config("anchor"), self.config.sub_config("augment"))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                      use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """The anchor's last hidden state with the bridges applied, and the cache."""
        b, t = input_ids.shape
        cache = past_key_values if isinstance(past_key_values, CalmCache) else None
        if cache is None and use_cache:
            cache = CalmCache(self.config.sub_config("anchor"), self.config.sub_config("augment"))
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=input_ids.device)
        key_valid = attention_mask[:, -(past + t):].bool()

        pairs = self.config.pairs
        wanted = sorted({g for _, g in pairs})
        captured: dict[int, torch.Tensor] = {}
        layers_g = self.augment.layers
        hooks = [layers_g[g].register_forward_hook(
            lambda m, i, o, g=g: captured.__setitem__(g, o[0] if isinstance(o, tuple) else o)) for g in wanted]
        try:
            self.augment(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=cache is not None, **{CACHE_KW: cache.augment if cache is not None else None})
        finally:
            for h in hooks:
                h.remove()

        # bridge positions: the token index in the sequence (same for both streams)
        positions = (past + torch.arange(t, device=input_ids.device))[None].expand(b, t)
        kv = []
        for i, (_, g) in enumerate(pairs):
            k, v = self.bridges[i].keys_values(captured[g], positions)
            if cache is not None:
                if i in cache.bridge_kv:
                    pk, pv = cache.bridge_kv[i]
                    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
                cache.bridge_kv[i] = (k, v)
            kv.append((k, v))
        mask, query_valid = bridge_mask(key_valid, past, t)

        by_layer: dict[int, list[int]] = {}
        for i, (a, _) in enumerate(pairs):
            by_layer.setdefault(a, []).append(i)

        def hook(a: int):
            def apply(module, inputs, output):
                x = output[0] if isinstance(output, tuple) else output
                for i in by_layer[a]:
                    x = self.bridges[i](x, kv[i][0], kv[i][1], mask, query_valid, positions)
                return (x, *output[1:]) if isinstance(output, tuple) else x
            return apply

        layers_a = self.anchor.model.layers
        hooks = [layers_a[a].register_forward_hook(hook(a)) for a in by_layer]
        try:
            out = self.anchor.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=cache is not None, **{CACHE_KW: cache})
        finally:
            for h in hooks:
                h.remove()
        return out.last_hidden_state, cache

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, cache: Any = None,
                **kwargs) -> CausalLMOutputWithPast:
        use_cache = self.config.use_cache if use_cache is None else use_cache
        past_key_values = cache if cache is not None else past_key_values  # either name (see CACHE_KW)
        hidden, cache = self.hidden_states(input_ids, attention_mask, position_ids, past_key_values,
                                           use_cache and not self.training)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = postprocess_logits(self.config.anchor, self.anchor.lm_head(hidden[:, keep]))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KW: cache})


class _ComposedDecoder(nn.Module):
    """``get_decoder()`` for lmexpand's fused loss: returns the bridged last hidden state."""

    def __init__(self, model: CalmForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        hidden, _ = self.model.hidden_states(input_ids, attention_mask, None, None, False)
        return BaseModelOutputWithPast(last_hidden_state=hidden)


AutoConfig.register("lmexpand_calm", CalmConfig, exist_ok=True)
AutoModelForCausalLM.register(CalmConfig, CalmForCausalLM, exist_ok=True)
