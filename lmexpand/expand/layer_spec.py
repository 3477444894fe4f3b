"""The one parser of layer specs, the value of a surgery's ``--layers``.

A layer spec is ``all``, ``every:N`` (layers N-1, 2N-1, ...: every N-th layer, counted from
1) or 0-based layer indices ``I,J,...`` (spaces ignored, duplicates and order too).
:func:`parse_layer_spec` checks the text where a method's config is validated (a pydantic
validator: it raises ``ValueError``); :func:`select_layers` turns a checked spec into the
layer indices of a model with ``n`` layers, and raises :class:`ConfigError` for what only
the model can refuse. The callers pass the wording of their messages, so each method's
help and errors read as before this parser was shared.
"""

from __future__ import annotations

import re

from lmexpand.errors import ConfigError

_SPEC = re.compile(r"^(all|every:\d+|\d+(,\d+)*)$")


def parse_layer_spec(text: str, usage: str, *, every_zero: str | None = None) -> str:
    """``text`` without spaces, when it is a layer spec; else ``ValueError("'TEXT': usage")``.
    ``every_zero``: the message refusing ``every:0`` already here (without it,
    :func:`select_layers` refuses it with ``every_within_model``)."""
    v = text.replace(" ", "")
    if not _SPEC.match(v):
        raise ValueError(f"{v!r}: {usage}")
    if every_zero is not None and v.startswith("every:") and int(v[6:]) < 1:
        raise ValueError(every_zero)
    return v


def select_layers(spec: str, n: int, *, name: str, every_within_model: bool = False) -> list[int]:
    """The sorted layer indices ``spec`` (checked by :func:`parse_layer_spec`) selects in a
    model of ``n`` layers. An index past the last layer is refused, and so, with
    ``every_within_model``, is ``every:N`` with N outside 1..n (without it, N > n selects no
    layer). ``name`` starts the messages (e.g. ``--layers``)."""
    if spec == "all":
        return list(range(n))
    if spec.startswith("every:"):
        k = int(spec[6:])
        if every_within_model and not 1 <= k <= n:
            raise ConfigError(f"{name}: N must be 1..{n} (the model has {n} layers).")
        return list(range(k - 1, n, k))
    layers = sorted({int(x) for x in spec.split(",")})
    bad = [i for i in layers if i >= n]
    if bad:
        raise ConfigError(f"{name}: layer {bad[0]} is out of range; the model has {n} layers (0..{n - 1}).")
    return layers
