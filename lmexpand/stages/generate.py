"""Text generation from any model lmexpand can load (``lmexpand generate``)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from lmexpand.errors import ConfigError


def run_generation(model: str, prompts: Sequence[str], settings: Any, *, allow_pickle: bool = False,
                   on_text: Callable[[str], Any] | None = None):
    """The continuations of ``prompts`` (``settings``: a checked
    :class:`~lmexpand.eval.generation.GenerationSettings`; ``on_text`` receives one prompt's
    text as it is generated)."""
    from lmexpand.eval.generation import generate
    from lmexpand.export import resolve_export_source

    settings.check()
    if not prompts:
        raise ConfigError("give a prompt: --prompt TEXT (repeat it for a batch).")
    return generate(resolve_export_source(model), list(prompts), settings, allow_pickle=allow_pickle, on_text=on_text)


def generation_record(prompts: Sequence[str], result) -> dict[str, Any]:
    """What ``--json`` prints."""
    return {"prompts": list(prompts), "texts": result.texts, "tokens": result.new_tokens,
            **({"deferred": result.deferred} if result.deferred is not None else {}),
            "seconds": round(result.seconds, 3), "tokens_per_second": round(result.tokens_per_second, 2)}


def deferral_line(result) -> str:
    """Co-LLM: how many tokens the assistant wrote."""
    n = sum(len(r) for r in result.deferred)
    deferred = sum(map(sum, result.deferred))
    return "deferred %d of %d tokens to the assistant (%.0f %%)" % (deferred, n, 100 * deferred / max(n, 1))
