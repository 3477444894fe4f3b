"""Chat data: conversations rendered with the model's chat template, the loss on the
assistant turns only.

Three record layouts are read (the ones LLaMA-Factory's and TRL's users bring):

* ``messages``: ``[{"role": "system"|"user"|"assistant", "content": ...}, ...]`` (OpenAI);
* ``alpaca``: ``instruction``, optional ``input`` (appended to the instruction after a blank
  line), ``output``, optional ``system``;
* ``sharegpt``: ``conversations``: ``[{"from": "system"|"human"|"gpt", "value": ...}, ...]``.

Each becomes one conversation, checked (an optional system turn first, then user and
assistant turns alternating, ending with an assistant turn, none empty) and rendered with
``tokenizer.apply_chat_template`` (the model's own template, or ``chatml``, or a Jinja file).

Where the assistant turns are in the rendered text: for assistant turn i, the rendering of
the turns before it with the generation prompt is a prefix of the rendering up to and
including it; the difference (right-stripped of whitespace) is the answer and its
end-of-turn marker (``Hello!<|im_end|>`` in ChatML), which is what the model must learn to
produce. Templates whose earlier turns change when later ones are added (some drop past
reasoning) fall back to finding each answer's text after the previous one. Tokens whose
first character lies in such a span are targets; all others are context.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmexpand.errors import ConfigError

# ChatML, as SmolLM2 and Qwen write it, without a default system prompt
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

STYLE_FIELDS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output")}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def detect_style(columns: list[str]) -> str | None:
    """The chat layout of records with these fields (None: none of them)."""
    for style, needed in STYLE_FIELDS.items():
        if all(c in columns for c in needed):
            return style
    return None


def resolve_chat_template(tokenizer: Any, chat_template: str | None, model: str) -> str:
    """The Jinja template conversations are rendered with."""
    if chat_template == "chatml":
        return CHATML
    if chat_template:
        path = Path(chat_template)
        if not path.is_file():
            raise ConfigError(f"--chat-template {chat_template}: no such file. Give 'chatml' or a Jinja template "
                              "file (the chat_template of a tokenizer_config.json, as a file).")
        text = path.read_text(encoding="utf-8", errors="replace")
        if "{{" not in text and "{%" not in text:
            raise ConfigError(f"--chat-template {chat_template}: not a Jinja template (no {{{{ }}}} or {{% %}}). Give "
                              "'chatml' or a template file.")
        from lmexpand.checkpoint.tokenizer import check_chat_template

        check_chat_template(text, f"--chat-template {chat_template}")
        return text
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if not own:
        raise ConfigError(f"chat data: the tokenizer of {model} has no chat template, so conversations cannot be "
                          "rendered the way the model will see them. Give --chat-template chatml (recipe key "
                          "chat_template: chatml) or --chat-template FILE with a Jinja template.")
    from lmexpand.checkpoint.tokenizer import check_chat_template

    check_chat_template(own, f"the tokenizer of {model}")
    return own


def conversation(record: dict, style: str, where: str) -> list[dict[str, str]]:
    """One record as checked ``[{role, content}]`` turns; ``where`` names the file and record."""
    fix = "Fix or remove that record."
    if style == "alpaca":
        instruction, output = record.get("instruction"), record.get("output")
        extra = record.get("input")
        for key, value in (("instruction", instruction), ("output", output)):
            if not isinstance(value, str):
                raise ConfigError(f"{where}: alpaca records need a text field {key!r} (got "
                                  f"{type(value).__name__ if value is not None else 'none'}). {fix}")
        if extra is not None and not isinstance(extra, str):
            raise ConfigError(f"{where}: the alpaca field 'input' must be text (got {type(extra).__name__}). {fix}")
        prompt = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        system = record.get("system")
        if isinstance(system, str) and system.strip():
            turns.insert(0, {"role": "system", "content": system})
    else:
        key, role_key, text_key = ("messages", "role", "content") if style == "messages" else \
            ("conversations", "from", "value")
        raw = record.get(key)
        if not isinstance(raw, list) or not raw:
            present = ", ".join(k for k in record) or "none"
            raise ConfigError(f"{where}: no {key!r} list of turns (fields present: {present}). Each {style} record "
                              f"needs {key}: [{{{role_key}: ..., {text_key}: ...}}, ...]. {fix}")
        turns = []
        for i, turn in enumerate(raw, 1):
            if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str) or turn.get(role_key) is None:
                raise ConfigError(f"{where}: turn {i} is not {{{role_key}: ..., {text_key}: TEXT}} (got "
                                  f"{str(turn)[:80]}). {fix}")
            role = str(turn[role_key])
            if style == "sharegpt":
                if role not in _SHAREGPT_ROLES:
                    raise ConfigError(f"{where}: turn {i} is from {role!r}; sharegpt turns are from system, human "
                                      f"or gpt. {fix}")
                role = _SHAREGPT_ROLES[role]
            elif role not in ("system", "user", "assistant"):
                raise ConfigError(f"{where}: turn {i} has role {role!r}; roles are system, user and assistant. {fix}")
            turns.append({"role": role, "content": turn[text_key]})
    _check_order(turns, where)
    return turns


def _check_order(turns: list[dict[str, str]], where: str) -> None:
    body = turns[1:] if turns and turns[0]["role"] == "system" else turns
    for i, turn in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        n = i + 1 + (len(turns) - len(body))
        if turn["role"] != want:
            raise ConfigError(f"{where}: turn {n} is {turn['role']!r} where {want!r} was expected: a conversation is "
                              "an optional system turn, then user and assistant turns alternating, starting with "
                              "user. Fix the order of that record's turns, or remove it.")
        if want == "assistant" and not turn["content"].strip():
            raise ConfigError(f"{where}: turn {n} is an empty assistant turn: there is nothing to learn from it. "
                              "Fill in the answer, or remove the record.")
    if not body or body[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the conversation does not end with an assistant turn (nothing to learn after "
                          "the last user turn). End it with the answer, or drop the unanswered turn.")


def _render(tokenizer: Any, template: str, turns: list, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, template: str, turns: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant answers (each
    with its end-of-turn marker)."""
    full = _render(tokenizer, template, turns)
    spans = []
    cursor = 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, template, turns[:i], generation_prompt=True)
        upto = _render(tokenizer, template, turns[:i + 1])
        if upto.startswith(before) and full.startswith(upto) and len(before) >= cursor:
            start, end = len(before), len(before) + len(upto[len(before):].rstrip())
        else:  # the template rewrites earlier turns: find the answer's text itself
            start = full.find(turn["content"], cursor)
            if start < 0:
                continue
            end = start + len(turn["content"])
            eos = getattr(tokenizer, "eos_token", None)
            if eos and full.startswith(eos, end):
                end += len(eos)
        if end > start:
            spans.append((start, end))
            cursor = end
    return full, spans


def encode_conversation(tokenizer: Any, template: str, turns: list[dict[str, str]], where: str) -> list[int]:
    """Token ids of the rendered conversation, context tokens stored as ``-(id + 1)``."""
    full, spans = assistant_spans(tokenizer, template, turns)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = enc["input_ids"], [a for a, _ in enc["offset_mapping"]]
    else:  # slow tokenizers have no offsets: tokenize the pieces between span edges
        ids, starts, edges = [], [], sorted({0, len(full), *(x for s in spans for x in s)})
        for a, b in zip(edges, edges[1:]):
            piece = tokenizer(full[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            starts += [a] * len(piece)
    out, learned = [], 0
    j = 0
    for token, start in zip(ids, starts):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        if j < len(spans) and spans[j][0] <= start < spans[j][1]:
            out.append(token)
            learned += 1
        else:
            out.append(-(token + 1))
    if not learned:
        raise ConfigError(f"{where}: the chat template renders nothing to learn for this conversation (no token of "
                          "an assistant answer in its output). Check the template (--chat-template): it must print "
                          "every message's content, assistant turns included.")
    return out
