"""Models that run several models at run time: CALM (cross-attention bridges) and logit
compositions (logit sum, proxy-tuning, contrastive decoding).

Each is a ``PreTrainedModel`` in a modeling file that imports only torch and transformers
(``lmexpand export`` ships it with ``auto_map``). A surgery directory references its
members by path and fingerprint; :func:`lmexpand.compose.loading.load_model` is the one
loader train, eval and generate use. Importing this package is light (no torch).
"""

from lmexpand.compose.loading import is_composed, load_model, member_inputs, register_if_composed

__all__ = ["is_composed", "load_model", "member_inputs", "register_if_composed"]
