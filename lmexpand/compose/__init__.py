"""Models that run several models at run time, and the one registry of their kinds
(:mod:`lmexpand.compose.kinds`): CALM (cross-attention bridges), logit compositions (logit
sum, proxy-tuning, contrastive decoding), Co-LLM (a learned deferral gate), deep fusion
(experts inside marked spans).

Each model is a ``PreTrainedModel`` in a modeling file that imports only torch and
transformers (``lmexpand export`` ships it with ``auto_map``). A surgery directory references
its members by path and fingerprint; :func:`lmexpand.compose.loading.load_model` is the one
loader train, eval and generate use. Importing this package imports nothing (the names below
load on first use): every layer imports :mod:`lmexpand.compose.kinds`, the checkpoint layer
included, and that must not pull the loader in.
"""

from typing import Any

__all__ = ["is_composed", "load_model", "member_inputs", "register_if_composed"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lmexpand.compose import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
