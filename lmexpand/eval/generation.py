"""`lmexpand generate`: text from any model directory lmexpand can load (stock, expanded,
MoE, CALM, logit compositions), through transformers' ``generate``.

One prompt streams its continuation as it is produced; several prompts run as one
left-padded batch. Everything that can be wrong with the inputs (model, tokenizer, chat
template, lengths, sampling settings) is checked before the model is loaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lmexpand.errors import ConfigError, NonFiniteError


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    chat: bool = False
    system: str | None = None
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_at_eos: bool = True
    threshold: float | None = None  # Co-LLM: deferral threshold for this run
    show_deferrals: bool = False  # Co-LLM: mark the tokens the assistant produced

    def check(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens {self.max_new_tokens}: give 1 or more")
        if not (self.temperature > 0) or self.temperature == float("inf"):
            problems.append(f"--temperature {self.temperature}: give a finite number > 0")
        if not (0 < self.top_p <= 1):
            problems.append(f"--top-p {self.top_p}: give a number in (0, 1]")
        if self.top_k < 0:
            problems.append(f"--top-k {self.top_k}: give 0 (off) or more")
        if not self.sample and (self.temperature != 1.0 or self.top_p != 1.0 or self.top_k):
            problems.append("--temperature/--top-p/--top-k shape sampling: add --sample (greedy decoding ignores them)")
        if self.threshold is not None and not (0 <= self.threshold <= 1):
            problems.append(f"--threshold {self.threshold}: give a number in [0, 1]")
        if self.system is not None and not self.chat:
            problems.append("--system is the chat's system message: add --chat")
        if problems:
            raise ConfigError("; ".join(problems) + ".")


@dataclass
class GenerationResult:
    texts: list[str]
    new_tokens: int
    seconds: float
    prompt_tokens: list[int] = field(default_factory=list)
    deferred: list[list[bool]] | None = None  # Co-LLM: per row, per new token
    marked: list[str] | None = None  # Co-LLM with show_deferrals: texts with «deferred» tokens

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def prepare_prompts(tokenizer: Any, prompts: list[str], settings: GenerationSettings, model_dir: Path) -> list[str]:
    if not prompts:
        raise ConfigError("give a prompt: --prompt TEXT (repeat it for a batch).")
    for p in prompts + ([settings.system] if settings.system else []):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the terminal could not decode arrive as surrogates
            raise ConfigError(f"--prompt/--system {p[:40]!r}: not valid UTF-8 text (an undecodable byte at character "
                              f"{e.start}). Give the text in UTF-8 (check the terminal's or the file's encoding).") \
                from None
        if not p.strip():
            raise ConfigError("--prompt is empty: give some text to continue.")
    if not settings.chat:
        return prompts
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{model_dir}: its tokenizer has no chat template, so --chat cannot format the prompt. Drop "
                          "--chat (plain continuation), or add the template of the model it was made from "
                          "(tokenizer_config.json `chat_template`, or chat_template.jinja).")
    from lmexpand.checkpoint.tokenizer import check_chat_template

    check_chat_template(tokenizer.chat_template, f"{model_dir}")
    out = []
    for p in prompts:
        messages = ([{"role": "system", "content": settings.system}] if settings.system else []) + \
            [{"role": "user", "content": p}]
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def finite_logits_guard(what: str) -> Any:
    """A logits processor that stops generation at the first step whose scores hold NaN or
    +Inf, or give no token a finite score (greedy decoding would silently pick token 0 and
    print nothing): a :class:`NonFiniteError` naming the step. −Inf for some tokens is a
    mask (contrastive decoding's plausibility), not an error."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class _FiniteLogits(LogitsProcessor):
        def __init__(self) -> None:
            self.step = 0

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.step += 1
            if bool(torch.isnan(scores).any()) or bool(torch.isposinf(scores).any()) or \
                    bool(torch.isneginf(scores).all(dim=-1).any()):
                raise NonFiniteError(
                    f"{what}: the model's next-token logits hold NaN/Inf at new token {self.step}, so no token can "
                    "be chosen (this would print empty text). Its weights hold NaN/Inf (`lmexpand verify MODEL "
                    "--values all` names them), or its logits overflow: a composition's alpha, beta or --weights "
                    "too large.")
            return scores

    return LogitsProcessorList([_FiniteLogits()])


def _max_positions(config: dict) -> int | None:
    for c in (config, config.get("anchor") or {}, config.get("text_config") or {}):
        v = c.get("max_position_embeddings")
        if isinstance(v, int):
            return v
    return None


def generate(model_dir: Path, prompts: list[str], settings: GenerationSettings, *, allow_pickle: bool = False,
             on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Continuations of ``prompts``; with one prompt and ``on_text``, pieces of text are
    passed to ``on_text`` as they are produced."""
    import torch

    from lmexpand.checkpoint.reader import CheckpointReader
    from lmexpand.checkpoint.tokenizer import load_tokenizer
    from lmexpand.compose.loading import is_composed, load_model, register_if_composed

    settings.check()
    reader = CheckpointReader(model_dir, need_family=False, allow_pickle=allow_pickle)
    if not is_composed(model_dir):
        from lmexpand.checkpoint.verify import require_structure

        require_structure(reader)
    kind, max_pos = reader.config.get("model_type"), _max_positions(reader.config)
    reader.close()
    from lmexpand.compose.kinds import KINDS

    declared = KINDS.get(kind)
    deferral_gate = bool(declared and declared.deferral_gate)
    if (settings.threshold is not None or settings.show_deferrals) and not deferral_gate:
        gated = " or ".join(f"{k.title} models (`lmexpand surgery {k.surgeries[0]}`)" for k in KINDS.values()
                            if k.deferral_gate)
        raise ConfigError(f"--threshold and --show-deferrals are only for {gated}; {model_dir} is a {kind} model. "
                          "Drop them.")
    register_if_composed(model_dir)
    tokenizer = load_tokenizer(model_dir, what="MODEL")
    texts = prepare_prompts(tokenizer, prompts, settings, model_dir)
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not settings.chat)
    n_prompt = enc["input_ids"].shape[1]
    if max_pos and n_prompt + settings.max_new_tokens > max_pos:
        raise ConfigError(f"the prompt ({n_prompt} tokens) plus --max-new-tokens {settings.max_new_tokens} exceeds the "
                          f"model's {max_pos} positions; shorten the prompt or lower --max-new-tokens to "
                          f"{max(max_pos - n_prompt, 0)}.")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(model_dir, dtype=dtype).to(device).eval()
    if settings.threshold is not None:
        model.threshold = settings.threshold
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=pad,
                                  do_sample=settings.sample, logits_processor=finite_logits_guard(str(model_dir)))
    if settings.sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or None)
        torch.manual_seed(settings.seed)
    else:  # greedy: no sampling settings from the model's generation_config leak in
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if not settings.stop_at_eos:
        kwargs["eos_token_id"] = None
    streamer = None
    if on_text is not None and len(texts) == 1 and not settings.show_deferrals:
        from transformers import TextStreamer

        class _Callback(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                on_text(text)

        streamer = _Callback(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, streamer=streamer, **kwargs)
    seconds = time.perf_counter() - start
    new = out[:, n_prompt:]
    eos = tokenizer.eos_token_id
    counted = 0
    for row in new.tolist():  # tokens produced before each row stopped (padding after an EOS not counted)
        n = len(row)
        if eos is not None and settings.stop_at_eos and eos in row:
            n = row.index(eos) + 1
        counted += n
    texts_out = [tokenizer.decode(r, skip_special_tokens=True) for r in new]
    result = GenerationResult(texts_out, counted, seconds, [int(m.sum()) for m in enc["attention_mask"].cpu()])
    if deferral_gate and model.deferrals:
        steps = torch.stack(model.deferrals[:new.shape[1]], dim=1).tolist()  # [B, new tokens]
        result.deferred = steps
        if settings.show_deferrals:
            result.marked = []
            for row, flags in zip(new.tolist(), steps):
                pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in row]
                result.marked.append("".join(f"«{p}»" if d and p else p for p, d in zip(pieces, flags)))
    return result
