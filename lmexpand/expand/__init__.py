"""Surgery: plans (what to write), one executor (how), one file per method.

Importing this package is light (no torch): methods look at configs and tensor headers,
and only the executor touches values.
"""

from lmexpand.expand.plan import Plan, TensorPlan
from lmexpand.expand.registry import METHODS, get_method, load_methods, parse_config, register_method

__all__ = ["Plan", "TensorPlan", "METHODS", "get_method", "load_methods", "parse_config", "register_method"]
