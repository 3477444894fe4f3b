"""Merge methods, one file per family as in mergekit's ``merge_methods/``, registered by name
in :mod:`.registry` (which refuses a name registered twice). Adding a method = adding one
file here, importing it below, and a configuration in ``tests/test_merge.py``'s comparison
with mergekit."""

from lmexpand.expand.merging.methods.registry import METHODS, Inputs, MergeMethod, Param, method_names, register

# the families; importing a module registers its methods
from lmexpand.expand.merging.methods import (  # noqa: E402,F401  isort: skip
    linear,
    slerp,
    nuslerp,
    multislerp,
    karcher,
    generalized_task_arithmetic,
    sce,
    ram,
    nearswap,
    arcee_fusion,
    model_stock,
    passthrough,
)

__all__ = ["METHODS", "Inputs", "MergeMethod", "Param", "method_names", "register"]
