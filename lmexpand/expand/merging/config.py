"""mergekit's configuration schema, read unchanged, and its parameter resolution.

A mergekit file names the inputs either as ``models:`` (every layer of every model) or as
``slices:`` (``sources`` with a ``layer_range`` each, concatenated along depth), a
``merge_method``, an optional ``base_model`` and ``parameters`` at three levels: top, slice
and model (slice source). A parameter's value is a scalar, a list (a *gradient* over the
layers of its slice), or a list of ``{filter, value}`` entries whose first match wins (a
filter matches when it is a substring of the tensor name; no filter or ``*`` matches all).

Resolution follows mergekit 0.1.5 exactly (``mergekit/config.py``, ``parameter_resolver.py``,
``plan.py``): per-model parameters look at the slice source, then the slice, then the top
level; shared parameters at the slice then the top level; the first scope whose setting
resolves wins. Layer ``i`` of a slice of ``n`` layers has ``t = i/(n-1)`` (``t = 1`` when
``n = 1``); tensors outside the layers use ``t = 0`` and the first (embeddings) or last
(final norm, head) slice's settings. Per-model filters are matched against the *input*
tensor's name, shared ones against the output's.

Unlike mergekit, unknown keys and parameter names are errors (mergekit ignores them, so a
typo such as ``densty`` silently merges with the default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmexpand.errors import ConfigError

# Like STRICT, but mergekit files are plain YAML: finite numbers are checked per parameter.
_SCHEMA = ConfigDict(frozen=True, extra="forbid")

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class ConditionalParameter(BaseModel):
    model_config = _SCHEMA
    value: ScalarOrGradient
    filter: Optional[str] = None


Setting = Union[ConditionalParameter, list[ConditionalParameter], ScalarOrGradient]
Parameters = Optional[dict[str, Setting]]


def _model_ref(value: Any) -> Any:
    """mergekit accepts ``model: path`` and ``model: {model: {path: ...}}`` forms."""
    if isinstance(value, dict):
        inner = value.get("model", value)
        if isinstance(inner, dict):
            if inner.get("revision"):
                raise ValueError("a model revision needs the Hugging Face Hub; lmexpand reads local directories. "
                                 "Download that revision once and give its directory")
            inner = inner.get("path")
        if value.get("lora"):
            raise ValueError("LoRA-adapted references (model+lora) are not supported: merge the adapter into "
                             "its model first (`lmexpand export`) and give that directory")
        value = inner
    if not isinstance(value, str) or not value:
        raise ValueError("a model reference is a local model directory (or an embedded model name)")
    if "+" in value and not Path(value).exists():
        raise ValueError(f"{value!r}: LoRA-adapted references (model+lora) are not supported: merge the adapter "
                         "into its model first (`lmexpand export`) and give that directory")
    return value


class InputModel(BaseModel):
    model_config = _SCHEMA
    model: str
    parameters: Parameters = None

    _ref = field_validator("model", mode="before")(classmethod(lambda cls, v: _model_ref(v)))


class InputSlice(BaseModel):
    model_config = _SCHEMA
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = None

    _ref = field_validator("model", mode="before")(classmethod(lambda cls, v: _model_ref(v)))

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range [{v[0]}, {v[1]}] must be [start, end) with 0 <= start < end")
        return v


class OutputSlice(BaseModel):
    model_config = _SCHEMA
    sources: list[InputSlice] = Field(min_length=1)
    base_model: Optional[str] = None
    parameters: Parameters = None
    residual_weight: Optional[float] = None

    _ref = field_validator("base_model", mode="before")(classmethod(lambda cls, v: v if v is None else _model_ref(v)))

    @field_validator("residual_weight")
    @classmethod
    def _residual(cls, v: Optional[float]) -> Optional[float]:
        if v is not None:
            raise ValueError("residual_weight is not used by any mergekit 0.1.5 method; remove it")
        return v


class TokenSource(BaseModel):
    """``{kind: model_token, model, token_id | token}`` (a given row of a model) or
    ``{kind: zero}`` (mergekit's ``ModelTokenEmbedding`` / ``ZeroEmbedding``)."""

    model_config = _SCHEMA
    kind: Literal["model_token", "zero"]
    model: Optional[str] = None
    token_id: Optional[int] = None
    token: Optional[str] = None

    @model_validator(mode="after")
    def _one(self) -> "TokenSource":
        if self.kind == "zero":
            if self.model is not None or self.token_id is not None or self.token is not None:
                raise ValueError("{kind: zero} takes no model, token or token_id")
            return self
        if self.model is None:
            raise ValueError("{kind: model_token} needs model: (whose row to take)")
        object.__setattr__(self, "model", _model_ref(self.model))
        if (self.token_id is None) == (self.token is None):
            raise ValueError("{kind: model_token} takes exactly one of token_id: or token:")
        return self


class TokenEmbedding(BaseModel):
    """One entry of ``tokenizer.tokens``: where the token's embedding row comes from, and
    whether it replaces the row every model already has (``force``)."""

    model_config = _SCHEMA
    source: Union[TokenSource, str, None] = None
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _src(cls, v: Any) -> Any:
        if isinstance(v, dict) and "kind" not in v:
            return _model_ref(v)
        return _model_ref(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _forced(self) -> "TokenEmbedding":
        if self.force and self.source is None:
            raise ValueError("force: true replaces every model's row by the one source: names; give source:")
        return self


class TokenizerSection(BaseModel):
    """mergekit's ``tokenizer:`` section: the output vocabulary's source, per-token embedding
    sources (their tokens are added when missing), and padding of the vocabulary rows."""

    model_config = _SCHEMA
    source: str = "union"
    tokens: Optional[dict[str, TokenEmbedding]] = None
    pad_to_multiple_of: Optional[int] = Field(None, ge=1)

    @field_validator("source", mode="before")
    @classmethod
    def _src(cls, v: Any) -> Any:
        return v if v in ("union", "base") else _model_ref(v)


class MergeFile(BaseModel):
    """A mergekit YAML file (``mergekit-yaml`` schema)."""

    model_config = _SCHEMA
    merge_method: str
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    modules: Optional[dict[str, Any]] = None
    base_model: Optional[str] = None
    parameters: Parameters = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSection] = None
    chat_template: Optional[str] = None

    _ref = field_validator("base_model", mode="before")(classmethod(lambda cls, v: v if v is None else _model_ref(v)))

    @model_validator(mode="after")
    def _one_layout(self) -> "MergeFile":
        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of models: (whole models) or slices: (layer ranges); got "
                             + (", ".join(given) if given else "neither"))
        if self.modules:
            raise ValueError("modules: (multi-module architectures) is not supported; lmexpand merges decoder-only "
                             "language models: use models: or slices:")
        if self.tokenizer is not None and self.tokenizer_source is not None \
                and self.tokenizer_source != self.tokenizer.source:
            raise ValueError(f"tokenizer_source: {self.tokenizer_source} and tokenizer.source: "
                             f"{self.tokenizer.source} disagree (mergekit would silently use the second); give one")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{key}: {value!r} is not a dtype; use one of {', '.join(sorted(DTYPES))}")
        return self


DTYPES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "half": "F16",
          "bfloat16": "BF16", "bf16": "BF16", "float64": "F64", "float": "F32"}


def parse_merge_file(doc: Any, where: str) -> MergeFile:
    from lmexpand.validation import validate

    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: a merge configuration is a YAML mapping with merge_method and models: or "
                          "slices: (mergekit's schema).")
    return validate(MergeFile, doc, what=where, style="key")


# -- parameter resolution ---------------------------------------------------------------------
def evaluate_setting(tensor_name: str, setting: Any, t: float, cast) -> Any:
    """One setting's value for a tensor (mergekit's ``evaluate_setting``): a scalar as is, a
    list of numbers interpolated at ``t``, a list of non-numbers indexed at ``t``, a list of
    conditionals: the first whose filter matches; None when no filter matches."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return cast(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [cast(e) for e in setting]
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return cast((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if not isinstance(cond, ConditionalParameter):
                raise ConfigError(f"a parameter list mixes plain values and {{filter, value}} entries: {setting!r}")
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t, cast)
        return None
    raise ConfigError(f"unexpected parameter setting {setting!r}")


def resolve(name: str, scopes: list[Parameters], tensor_name: str, t: float, cast) -> Any:
    """The first scope (highest precedence first) whose setting for ``name`` resolves."""
    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate_setting(tensor_name, scope[name], t, cast)
            if value is not None:
                return value
    return None
