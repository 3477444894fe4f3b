"""What one composed kind declares: the type of every entry of :data:`lmexpand.compose.kinds.KINDS`.

Plain data and plain functions; this module imports nothing of lmexpand (see the package's
docstring for why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping


@dataclass(frozen=True, eq=False)
class ComposedKind:
    """Everything lmexpand knows about one kind of composed model, in one place.

    The fields the upper layers read are data (they decide what to do with it); the two
    hooks, ``load`` and ``self_contained``, are called by ``compose/`` only.
    """

    # -- what it is -------------------------------------------------------------------------------
    model_type: str
    """``model_type`` in the composed directory's config.json (and the modeling classes')."""
    title: str
    """How messages name it ("Co-LLM")."""
    surgeries: tuple[str, ...]
    """The surgery methods (``lmexpand/expand/``) that make it: its plan file."""

    # -- its run-time model ------------------------------------------------------------------------
    modeling: str
    """Module name under ``lmexpand/compose/``: imports only torch and transformers, registers
    its classes with the Auto classes on import, ships beside an export (``auto_map``)."""
    config_class: str
    model_class: str

    # -- its directory (the checkpoint layer reads these) -----------------------------------------
    tensor_prefixes: tuple[str, ...]
    """The tensor name prefixes its directory may hold (own tensors and embedded members)."""
    members: Callable[[Mapping[str, Any]], list[tuple[str, str]]]
    """config -> ``(role, path)`` of every member the config references (none once exported)."""

    # -- hooks, called by compose/ only ------------------------------------------------------------
    load: Callable[..., Any]
    """``load(model_dir: Path, dtype) -> model``: members from their recorded paths (checked
    against their fingerprints), or from the directory itself once self-contained."""
    self_contained: Callable[..., list]
    """``self_contained(config, own, readers) -> [OutputTensor]`` for ``lmexpand export``: the
    members' tensors to write into the directory (as the model names them; ``own``: the names
    the directory already holds), the config edited to match (member paths cleared, members
    untied); a member's reader opened here is appended to ``readers`` (closed by the caller)."""

    # -- training ------------------------------------------------------------------------------------
    trainable_members: tuple[str, ...] = ()
    """Member prefixes whose weights may train besides the directory's own tensors."""
    embeddable_members: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Member prefix -> (config key of its path, config key of its config): a member whose
    weights trained is written into the trained directory under its prefix, its path cleared."""
    gate_init: bool = False
    """The model has a gate with a weak-supervision initialisation (``gate``,
    ``lmexpand_init_loss``): ``--co-llm-init-steps`` / ``co_llm_init_steps`` are accepted."""
    span_markers: bool = False
    """Its new tensors run only on tokens inside spans marked by ``open_ids``/``close_ids`` of
    its config: data without a marker cannot train them (train and the recipe check)."""
    no_gradient: str | None = None
    """Why the data may reach no trainable tensor of this kind (a zero gradient after the first
    batch stops training with this reason; ``{markers}`` is replaced by the span markers)."""

    # -- evaluation and generation --------------------------------------------------------------------
    deferral_gate: bool = False
    """A per-token gate defers to a member (``threshold``, ``deferrals``): eval adds the
    deferral table, generate accepts ``--threshold`` and ``--show-deferrals``."""
