"""The one tokenizer loader of every command (train, eval, run, surgery's checks).

A model directory without a tokenizer, with a tokenizer that cannot be read, or whose
tokenizer makes ids the model has no embedding row for, is a user's problem with a clear
fix, not a traceback from deep inside transformers (or, worse, an index error mid-training).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmexpand.errors import SourceError

# files that hold a tokenizer transformers can load (any one is enough to try)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES)


def _vocab_size(model_dir: Path) -> int | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size") or \
        (cfg.get("anchor") or {}).get("vocab_size")
    return size if isinstance(size, int) else None


def load_tokenizer(model_dir: str | Path, *, what: str = "model", fix_from: str | None = None) -> Any:
    """``AutoTokenizer.from_pretrained(model_dir)``, checked: it exists, it loads, and its
    largest id fits the model's vocabulary. ``fix_from`` names where a matching tokenizer
    can be copied from (the base model), for the message."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    source = f"the base model ({fix_from})" if fix_from else "the model it was made from"
    if not has_tokenizer(model_dir):
        raise SourceError(
            f"{what} {model_dir}: has no tokenizer (none of {', '.join(TOKENIZER_FILES)}). Copy the tokenizer files "
            f"from {source} into it (e.g. `cp BASE/tokenizer* BASE/special_tokens_map.json {model_dir}/`).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types for a damaged tokenizer
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise SourceError(
            f"{what} {model_dir}: its tokenizer cannot be loaded ({type(e).__name__}: {first}). Replace the "
            f"tokenizer files with intact ones from {source}.") from None
    vocab = _vocab_size(model_dir)
    n = len(tokenizer)
    if vocab is not None and n > vocab:
        raise SourceError(
            f"{what} {model_dir}: its tokenizer has {n:,} tokens but the model's vocab_size is {vocab:,}: ids from "
            f"{vocab:,} on have no embedding row. Use the tokenizer the model was trained with (from {source}).")
    return tokenizer


def shared_token_ids(members: list[tuple[str, Path]]) -> int:
    """Every member's tokenizer maps the same text pieces to the same ids (a model composed
    from them feeds one id sequence to all); returns the number of ids the tokenizer uses
    (largest id + 1). ``members``: (role, directory) pairs; the first is the reference."""
    (role0, path0), rest = members[0], members[1:]
    vocab0 = load_tokenizer(path0, what=role0).get_vocab()
    for role, path in rest:
        vocab = load_tokenizer(path, what=role).get_vocab()
        if vocab != vocab0:
            small, large = sorted(((vocab0, role0, path0), (vocab, role, path)), key=lambda x: len(x[0]))
            if set(small[0].items()) < set(large[0].items()):
                extra = sorted(set(large[0].values()) - set(small[0].values()))
                raise SourceError(
                    f"the members' vocabularies differ beyond padding: {large[1]} {large[2]} has {len(extra):,} "
                    f"tokens that {small[1]} {small[2]} lacks (ids {extra[0]:,}..{extra[-1]:,}), so their logits "
                    "do not describe the same tokens. Compose models with the same tokenizer (only padding rows "
                    "beyond the tokenizer may differ).")
            only0 = sorted(set(vocab0.items()) - set(vocab.items()), key=lambda kv: kv[1])
            only = sorted(set(vocab.items()) - set(vocab0.items()), key=lambda kv: kv[1])
            example = (f"{only0[0][0]!r} is id {only0[0][1]} in {role0}" if only0 else "") + \
                (" but " if only0 and only else "") + (f"{only[0][0]!r} is id {only[0][1]} in {role}" if only else "")
            raise SourceError(
                f"{role} {path} and {role0} {path0} have different tokenizers ({len(vocab):,} vs {len(vocab0):,} "
                f"tokens; {example}): a composed model feeds the same token ids to every member, so they must "
                "share one tokenizer. Compose models fine-tuned from the same base, or give them that base's "
                "tokenizer if they were trained with it.")
    return max(vocab0.values()) + 1 if vocab0 else 0


def check_chat_template(template: Any, where: str) -> None:
    """A Jinja chat template compiles (as transformers compiles it: sandboxed), or a
    :class:`SourceError` naming where it came from and the line; checked when a template is
    chosen (training writes it into its output) and before generate uses one."""
    templates = template.values() if isinstance(template, dict) else [template]
    for text in templates:
        if not isinstance(text, str):
            continue
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(text)
        except TemplateError as e:
            line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise SourceError(f"{where}: its chat template is not valid Jinja{line}: {e}. Fix the template "
                              "(tokenizer_config.json `chat_template`, or chat_template.jinja) or use another one.") \
                from None
