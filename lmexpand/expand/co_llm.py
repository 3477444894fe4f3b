"""Co-LLM (Shen et al. 2024, arXiv 2403.03870): a base model learns per token when to defer
to a frozen assistant; the model is :mod:`lmexpand.compose.co_llm_modeling`.

Recipe (paper §3, official code clinicalml/co-llm): one gate vector ``w`` reads the base's
last hidden state, ``g_t = σ(w·h_t)``; training maximises the marginal likelihood
``(1 − g_t)·p_base + g_t·p_asst`` of the target tokens with the assistant frozen; decoding
emits the assistant's token where ``g_t > η``. The gate starts at zero (``g = 0.5``: the
marginal is the models' average at init); ``lmexpand train`` trains it (the default
trainable set). The surgery writes only the gate and references both models by path and
fingerprint; they must share a tokenizer (padding rows beyond it may differ).
"""

from __future__ import annotations

from typing import Sequence

from pydantic import Field

from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.compose.kinds.co_llm import KIND
from lmexpand.expand.logit_compose import _check_members
from lmexpand.expand.plan import Plan, TensorPlan, Zeros
from lmexpand.expand.registry import MethodConfig, register_method


class CoLlmMethodConfig(MethodConfig):
    threshold: float = Field(0.5, ge=0, le=1, description="Deferral threshold eta: the assistant produces the token "
                             "where the gate g > eta (0: always the assistant, 1: never).")


@register_method(
    "co-llm",
    config=CoLlmMethodConfig,
    sources=("BASE", "ASSISTANT"),
    summary="Co-LLM: a base model learns per token when to defer to an assistant.",
    help="""Co-LLM (Shen et al. 2024): a gate on the base model's last hidden state decides,
token by token, whether the assistant (a larger model or a domain expert, frozen) produces
the next token. Training maximises the marginal likelihood; no labels of when to defer are
needed. OUT holds the gate (zero at init) and references to both models; both must share
a tokenizer. `lmexpand train` trains the gate; `lmexpand generate` decodes with the
threshold (the assistant runs only when some row defers).

\b
Example:
  lmexpand surgery co-llm ./healed ./math out/co-llm --threshold 0.5""",
)
def plan_co_llm(readers: Sequence[CheckpointReader], cfg: CoLlmMethodConfig) -> Plan:
    base, asst = readers
    common, notes = _check_members(readers, ["base", "assistant"])
    hidden = int(base.config["hidden_size"])
    config = {
        "model_type": KIND.model_type,
        "architectures": [KIND.model_class],
        "base": dict(base.config),
        "assistant": dict(asst.config),
        "base_path": str(base.path.resolve()),
        "assistant_path": str(asst.path.resolve()),
        "threshold": cfg.threshold,
        "vocab_size": common,
        "hidden_size": hidden,
        "num_hidden_layers": base.config.get("num_hidden_layers"),
        "max_position_embeddings": min(int(r.config.get("max_position_embeddings") or 10**9) for r in readers),
        "bos_token_id": base.config.get("bos_token_id"),
        "eos_token_id": base.config.get("eos_token_id"),
        "pad_token_id": base.config.get("pad_token_id"),
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    tensors = [TensorPlan("gate.weight", "F32", (1, hidden), Zeros())]
    notes.append(f"gate: one vector of {hidden} (zero: g = 0.5 at init); threshold {cfg.threshold:g}")
    return Plan(method="co-llm", arguments=cfg.model_dump(mode="json"), sources=[base.path, asst.path],
                config=config, tensors=tensors, new_parameters=["gate.weight"], function_preserving=False,
                notes=notes, extra_lineage={"trainable_default": "new_parameters"})
