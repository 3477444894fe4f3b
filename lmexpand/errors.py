"""Error types for users.

A :class:`LmexpandError` is a user's mistake or an environment problem the user can fix:
the CLI prints its message (what was wrong, where, and what to do) without a traceback and
exits with code 2. Anything else is a bug in lmexpand: exit code 1 with a traceback.
"""

from __future__ import annotations


class LmexpandError(Exception):
    """Base class of every error a user can fix. The message must name the path, field or
    tensor involved and say what to do."""

    exit_code = 2


class SourceError(LmexpandError):
    """A model source cannot be used: missing, not a model dir, pickle-only, hub id offline."""


class CheckpointError(LmexpandError):
    """A checkpoint's files are inconsistent: truncated shard, bad header, broken index."""


class UnsupportedArchitectureError(LmexpandError):
    """The config names an architecture no family describes."""


class TargetError(LmexpandError):
    """An output location cannot be used: exists, inside a source, not writable."""


class DiskFullError(TargetError):
    """The device ran out of space (or quota) while writing an output."""


class ConfigError(LmexpandError):
    """Bad arguments or recipe values: the message names the field, the value and what is allowed."""


class TrainingDivergedError(LmexpandError):
    """The loss or the gradients became NaN/Inf: training stopped, checkpoints kept."""


class NonFiniteError(LmexpandError):
    """A model's values or outputs hold NaN/Inf (a damaged or diverged checkpoint, or
    logits that overflow): refused wherever values are written or reported."""


class UsageError(ConfigError):
    """A command-line mistake found below the CLI (a missing argument, a flag that does not
    apply): the command shows it as click shows its own usage errors (``param_hint``: the
    flag whose value is wrong)."""

    def __init__(self, message: str, param_hint: str | None = None):
        super().__init__(message)
        self.param_hint = param_hint
