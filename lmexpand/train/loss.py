"""Causal-LM loss without the full logits tensor.

A Hugging Face ``*ForCausalLM`` forward with labels materializes fp32 logits of shape
[batch, seq, vocab] -- for SmolLM2 (vocab 49,152) at 4 x 512 tokens that is 400 MB, and as
much again for its gradient. :class:`FusedLinearCrossEntropy` computes the lm_head
projection, the log-softmax and its gradient chunk by chunk inside the forward pass (the
approach of Liger-Kernel's fused linear cross-entropy), keeping only the gradient with
respect to the hidden states (and to the head weight, when that trains): peak memory is
one chunk of logits, and nothing is recomputed in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``z = h @ W.T``, times ``scale`` (Granite's ``1 / logits_scaling``), then soft-capped
    ``cap * tanh(z / cap)`` when ``softcap`` is set (Gemma's ``final_logit_softcapping``):
    the logits the model's own forward computes (``checkpoint.families.logit_postprocessing``)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
        n = hidden.shape[0]
        valid_all = labels != IGNORE_INDEX
        n_valid = valid_all.sum().clamp(min=1)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]
            y = labels[start:start + chunk]
            valid = valid_all[start:start + chunk]
            logits = (h @ weight.t()).float()
            if scale != 1.0:
                logits.mul_(scale)
            if softcap:
                capped = torch.tanh(logits / softcap)  # (kept for the chain rule below)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
            loss += ((lse - target) * valid).sum()
            if need_h or need_w:
                # d(mean CE)/d(logits) = (softmax - onehot) / n_valid on valid rows, built in
                # the logits buffer itself: one chunk of [chunk, vocab] floats is the peak
                grad = logits.sub_(lse.unsqueeze(1)).exp_()
                grad[torch.arange(len(y), device=y.device), y.clamp(min=0)] -= 1.0
                grad *= (valid.float() / n_valid).unsqueeze(1)
                if softcap:
                    grad *= 1.0 - capped.square()  # d(cap tanh(z / cap))/dz
                if scale != 1.0:
                    grad *= scale
                if need_h:
                    grad_h[start:start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += grad.t() @ h.float()
        ctx.save_for_backward(grad_h if need_h else torch.empty(0), grad_w if need_w else torch.empty(0))
        ctx.need = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.need
        return (
            grad_h * grad_out.to(grad_h.dtype) if need_h else None,
            (grad_w * grad_out).to(ctx.weight_dtype) if need_w else None,
            None,
            None,
            None,
            None,
        )


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk: int = 256, scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` (scaled and soft-capped as the
    model's own logits are) against ``labels`` (already shifted; IGNORE_INDEX rows skipped).
    ``hidden``: [N, H], ``labels``: [N]."""
    return FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk, scale, softcap)


def reference_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float = 1.0,
                            softcap: float | None = None) -> torch.Tensor:
    logits = (hidden @ weight.t()).float() * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


class CausalLMLoss(nn.Module):
    """Wraps a ``*ForCausalLM``: ``forward(input_ids) -> (loss, aux_loss)``.

    Calling through this module (not its submodules) keeps distributed wrappers' hooks
    (DDP, FSDP) in the path. ``aux_loss`` is the model's own auxiliary loss, if it reports
    one (MoE router balancing: ``outputs.aux_loss``), else 0.
    """

    def __init__(self, model: nn.Module, chunk: int = 256):
        from lmexpand.checkpoint.families import logit_postprocessing

        super().__init__()
        self.model = model
        self.chunk = chunk
        config = getattr(model, "config", None)
        self.logit_scale, self.logit_softcap = logit_postprocessing(config.to_dict() if config is not None else {})

    @staticmethod
    def inputs_and_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Token ids and the shifted targets (IGNORE_INDEX where padding or prompt)."""
        from lmexpand.train.data import split_targets

        input_ids, targets = split_targets(input_ids)  # prompt tokens (loss_from) are context only
        labels = input_ids[:, 1:]
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
        if targets is not None:
            labels = labels.masked_fill(~targets[:, 1:], IGNORE_INDEX)
        return input_ids, labels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        position_ids = None
        if input_ids.ndim == 3:  # blocks with position ids (document masking): [batch, 2, seq]
            input_ids, position_ids = input_ids[:, 0], input_ids[:, 1]
        input_ids, labels = self.inputs_and_labels(input_ids, attention_mask)
        own_loss = getattr(self.model, "lmexpand_loss", None)
        if own_loss is not None:  # a composed model whose loss is not one head's cross-entropy (Co-LLM)
            loss = own_loss(input_ids, attention_mask, labels)
            return loss, torch.zeros((), device=loss.device)
        decoder = self.model.get_decoder()
        # position ids that restart at each document, without a 2D mask: transformers builds the
        # block-diagonal causal mask from them (sdpa/eager), flash attention takes its varlen path
        extra = {"position_ids": position_ids} if position_ids is not None else {}
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
        hidden = out.last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        head = self.model.get_output_embeddings()
        loss = fused_linear_cross_entropy(h, head.weight, labels.reshape(-1), self.chunk, self.logit_scale,
                                          self.logit_softcap)
        aux = getattr(out, "aux_loss", None)
        return loss, (aux if aux is not None else torch.zeros((), device=loss.device))
