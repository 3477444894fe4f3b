"""Deep-fusion experts (CogVLM, Wang et al. 2023, arXiv 2311.03079, §2.2 "visual expert"),
for text: in chosen layers, an expert copy of the attention projections and/or the MLP
projections, used by the tokens inside marked spans; every other token goes through the
original weights, and attention stays joint over all tokens.

Token types come from ``input_ids`` (markers are single tokens of the tokenizer):
- with one marker (``open_ids`` only, e.g. Markdown fences) each marker toggles the state;
- with two (``open_ids`` and ``close_ids``) the last marker seen decides.
A token is *inside* when the state after it is "open" and it is not itself a marker: the
markers are ordinary text for the original weights, so text without any marker never
touches an expert. The state is carried between generation steps in the cache.

Routing per projection (its ``forward`` is replaced): no inside token in the batch -> the
original only (the source's exact computation); all inside -> the expert only; both
present -> both projections on the whole input, combined with ``torch.where`` by type (exact at init, where the experts are
copies; a gather/scatter of the inside rows would change the matrix shapes, and with them
the floating-point result).

This file imports only torch and transformers (``lmexpand export`` ships it, ``auto_map``).
"""

from __future__ import annotations

import inspect as _inspect
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

CACHE_KW = "cache" if "cache" in _inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"


class DeepFusionConfig(PretrainedConfig):
    model_type = "lmexpand_deep_fusion"

    def __init__(self, source: dict | None = None, source_path: str | None = None, open_ids: list | None = None,
                 close_ids: list | None = None, layers: list | None = None, projections: list | None = None,
                 use_cache: bool = True, **kwargs):
        self.source = dict(source or {})
        self.source_path = source_path
        self.open_ids = [int(i) for i in (open_ids or [])]
        self.close_ids = [int(i) for i in close_ids] if close_ids else None
        self.layers = [int(i) for i in (layers or [])]
        self.projections = list(projections or [])  # relative module names, e.g. "self_attn.q_proj"
        self.use_cache = use_cache
        # (with the source's logit post-processing keys, which the training loss reads here)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "logit_scale",
                    "logits_scaling", "final_logit_softcapping"):
            if key in self.source:
                kwargs.setdefault(key, self.source[key])
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    def source_config(self) -> PretrainedConfig:
        d = dict(self.source)
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
        if not self.source_path:
            cfg.tie_word_embeddings = False  # self-contained export: the head is written out
        return cfg


class DeepFusionCache(DynamicCache):
    """The source's cache, and each row's span state after the last token it has seen."""

    def __init__(self, config: PretrainedConfig):
        super().__init__(config=config)
        self.state: torch.Tensor | None = None  # [B] bool: inside a span


def span_types(input_ids: torch.Tensor, open_ids: list[int], close_ids: list[int] | None,
               state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] inside-a-span mask, [B] state after the last token), from the marker tokens."""
    b, t = input_ids.shape
    start = torch.zeros(b, dtype=torch.bool, device=input_ids.device) if state is None else state.bool()
    opens = torch.isin(input_ids, torch.tensor(open_ids, device=input_ids.device))
    if close_ids is None:  # toggle: parity of the markers so far
        count = torch.cumsum(opens.long(), dim=1) + start.long()[:, None]
        after = count % 2 == 1
        is_marker = opens
    else:
        closes = torch.isin(input_ids, torch.tensor(close_ids, device=input_ids.device))
        is_marker = opens | closes
        pos = torch.arange(t, device=input_ids.device).expand(b, t)
        last = torch.where(is_marker, pos, torch.full_like(pos, -1)).cummax(dim=1).values
        last_is_open = opens.gather(1, last.clamp(min=0))
        after = torch.where(last >= 0, last_is_open, start[:, None].expand(b, t))
    return after & ~is_marker, after[:, -1]


def _linear_like(module: nn.Linear) -> nn.Linear:
    return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                     dtype=module.weight.dtype, device=module.weight.device)


class DeepFusionForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DeepFusionConfig
    base_model_prefix = "deep_fusion"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config: DeepFusionConfig):
        super().__init__(config)
        self.source = AutoModelForCausalLM.from_config(config.source_config())
        layers = self._layers()
        self.experts = nn.ModuleDict()
        for i in config.layers:
            per_layer = nn.ModuleDict()
            for name in config.projections:
                group, proj = name.split(".")
                if group not in per_layer:
                    per_layer[group] = nn.ModuleDict()
                per_layer[group][proj] = _linear_like(layers[i].get_submodule(name))
            self.experts[str(i)] = per_layer
        self._inside: torch.Tensor | None = None
        self._hooks: list[nn.Module] = []  # the projections whose forward is routed
        self.attach()
        self.post_init()

    def _layers(self) -> nn.ModuleList:
        return self.source.get_decoder().layers

    def _init_weights(self, module: nn.Module) -> None:
        pass  # experts are loaded from the directory (copies of the originals at surgery)

    def attach(self) -> None:
        """(Re)install the routing on the source's projections (after the source is replaced,
        e.g. by the loader): each projection's ``forward`` becomes the routed one."""
        for module in self._hooks:
            module.__dict__.pop("forward", None)
        self._hooks = []
        layers = self._layers()
        for i in self.config.layers:
            for name in self.config.projections:
                group, proj = name.split(".")
                module = layers[i].get_submodule(name)
                module.forward = self._route(module, self.experts[str(i)][group][proj])
                self._hooks.append(module)

    def _route(self, module: nn.Linear, expert: nn.Linear):
        original = type(module).forward.__get__(module)

        def forward(x: torch.Tensor) -> torch.Tensor:
            inside = self._inside
            if inside is None or not bool(inside.any()):
                out = original(x)
                if torch.is_grad_enabled() and expert.weight.requires_grad:
                    # a training batch without spans: the expert stays in the graph with a zero
                    # gradient (+0.0 leaves the values as they are), so backward and DDP work
                    return out + expert.weight.view(-1)[0] * 0.0
                return out
            if bool(inside.all()):
                return expert(x)
            return torch.where(inside[..., None], expert(x), original(x))
        return forward

    def get_input_embeddings(self) -> nn.Module:
        return self.source.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.source.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return _TypedDecoder(self)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        if model_kwargs.get(CACHE_KW) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_KW] = DeepFusionCache(self.config.source_config())

    def types(self, input_ids: torch.Tensor, cache: Any = None) -> torch.Tensor:
        state = cache.state if isinstance(cache, DeepFusionCache) else None
        inside, after = span_types(input_ids, self.config.open_ids, self.config.close_ids, state)
        if isinstance(cache, DeepFusionCache):
            cache.state = after
        return inside

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0, cache: Any = None, **kwargs):
        use_cache = (self.config.use_cache if use_cache is None else use_cache) and not self.training
        cache = cache if cache is not None else past_key_values
        if use_cache and not isinstance(cache, DeepFusionCache):
            cache = DeepFusionCache(self.config.source_config())
        self._inside = self.types(input_ids, cache)
        try:
            out = self.source(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache, labels=labels, logits_to_keep=logits_to_keep,
                              **{CACHE_KW: cache if use_cache else None})
        finally:
            self._inside = None
        return out


class _TypedDecoder(nn.Module):
    """``get_decoder()`` for lmexpand's fused loss: the source's decoder with the span types set."""

    def __init__(self, model: DeepFusionForCausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs) -> BaseModelOutputWithPast:
        # left set after the call: gradient checkpointing recomputes the layers in backward
        self.model._inside = self.model.types(input_ids)
        return self.model.source.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


AutoConfig.register("lmexpand_deep_fusion", DeepFusionConfig, exist_ok=True)
AutoModelForCausalLM.register(DeepFusionConfig, DeepFusionForCausalLM, exist_ok=True)
