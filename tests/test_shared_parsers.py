"""The shared parsers: layer specs (``--layers`` of deep fusion and MoE upcycling) and
``read_json`` (a JSON file, or a user error naming it and the fix)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lmexpand.errors import CheckpointError, ConfigError, LmexpandError, SourceError
from lmexpand.expand.layer_spec import parse_layer_spec, select_layers
from lmexpand.jsonio import read_json

USAGE = "give all, every:N, or comma-separated layer indices"


# -- layer specs ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, spec, layers", [
    ("all", "all", [0, 1, 2, 3, 4, 5]),
    ("every:1", "every:1", [0, 1, 2, 3, 4, 5]),
    ("every:2", "every:2", [1, 3, 5]),
    ("every:4", "every:4", [3]),
    ("every:6", "every:6", [5]),
    ("3", "3", [3]),
    ("5,1,3", "5,1,3", [1, 3, 5]),      # sorted
    ("1,1,0", "1,1,0", [0, 1]),         # duplicates once
    (" 1, 2 ", "1,2", [1, 2]),          # spaces ignored
    ("every: 3", "every:3", [2, 5]),
])
def test_every_accepted_form(text, spec, layers):
    assert parse_layer_spec(text, USAGE) == spec
    assert select_layers(spec, 6, name="--layers") == layers
    assert select_layers(spec, 6, name="--layers", every_within_model=True) == layers


@pytest.mark.parametrize("text", ["", "none", "ALL", "every", "every:", "every:x", "every:-1", "every:2,3",
                                  "1,", ",1", "1;2", "-1", "1.5", "0x1", "all,1", "1-3"])
def test_malformed_specs_are_refused_naming_the_value_and_the_usage(text):
    with pytest.raises(ValueError) as e:
        parse_layer_spec(text, USAGE)
    assert str(e.value) == f"{text.replace(' ', '')!r}: {USAGE}"


def test_every_zero_is_refused_where_the_caller_says():
    assert parse_layer_spec("every:0", USAGE) == "every:0"  # left to select_layers
    with pytest.raises(ValueError, match=r"^every:N needs N >= 1$"):
        parse_layer_spec("every:0", USAGE, every_zero="every:N needs N >= 1")
    with pytest.raises(ConfigError, match=r"^--layers every:0: N must be 1\.\.4 \(the model has 4 layers\)\.$"):
        select_layers("every:0", 4, name="--layers every:0", every_within_model=True)


def test_every_beyond_the_model():
    with pytest.raises(ConfigError, match=r"^--layers every:9: N must be 1\.\.4 \(the model has 4 layers\)\.$"):
        select_layers("every:9", 4, name="--layers every:9", every_within_model=True)
    assert select_layers("every:9", 4, name="--layers") == []  # MoE: no layer selected (its plan says so)


def test_an_index_past_the_last_layer_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"^--layers: layer 7 is out of range; the model has 4 layers \(0\.\.3\)\.$"):
        select_layers("1,7,9", 4, name="--layers")
    with pytest.raises(ConfigError, match=r"^--layers 4: layer 4 is out of range"):
        select_layers("4", 4, name="--layers 4", every_within_model=True)


def test_each_method_keeps_its_wording():
    """Deep fusion and MoE upcycling share the parser, each with its own messages."""
    from lmexpand.expand.deep_fusion import DeepFusionMethodConfig
    from lmexpand.expand.moe_upcycle import MoeConfig

    assert DeepFusionMethodConfig(open="(", layers="1, 3").layers == "1,3"
    with pytest.raises(ValidationError, match="'one': give all, every:N, or comma-separated layer indices"):
        DeepFusionMethodConfig(open="(", layers="one")
    assert DeepFusionMethodConfig(open="(", layers="every:0").layers == "every:0"  # refused against the model

    assert MoeConfig(experts=4, layers="every: 2").layers == "every:2"
    with pytest.raises(ValidationError, match="'one': write 'all', 'every:N' or a list of 0-based layer indices"):
        MoeConfig(experts=4, layers="one")
    with pytest.raises(ValidationError, match="every:N needs N >= 1"):
        MoeConfig(experts=4, layers="every:0")


# -- read_json --------------------------------------------------------------------------------
def test_read_json_returns_the_value(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2], "y": "é"}', encoding="utf-8")
    (tmp_path / "b.json").write_text("[1, 2]")
    assert read_json(tmp_path / "a.json", what="a test file") == {"x": [1, 2], "y": "é"}
    assert read_json(str(tmp_path / "a.json"), what="a test file", expect=dict)["y"] == "é"
    assert read_json(tmp_path / "b.json", what="a list", expect=list) == [1, 2]
    assert read_json(tmp_path / "b.json", what="anything") == [1, 2]  # no expect: any JSON value


def test_a_missing_file_is_a_user_error_naming_it_and_the_fix(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(LmexpandError) as e:
        read_json(path, what="config.json")
    msg = str(e.value)
    assert msg.startswith(f"{path}: cannot read config.json (") and "No such file or directory" in msg
    assert msg.endswith("). Fix the file or replace it.") and "\n" not in msg
    assert e.value.exit_code == 2
    with pytest.raises(SourceError, match="cannot read the index"):
        read_json(tmp_path, what="the index", error=SourceError)  # a directory: unreadable too


def test_bad_json_raises_the_callers_error_with_its_fix(tmp_path):
    path = tmp_path / "lmexpand.json"
    path.write_text("{oops")
    with pytest.raises(CheckpointError) as e:
        read_json(path, what="the lineage file", error=CheckpointError, fix="Re-run the step that wrote it.")
    msg = str(e.value)
    assert msg.startswith(f"{path}: cannot read the lineage file (Expecting property name")
    assert msg.endswith("). Re-run the step that wrote it.")
    path.write_bytes(b'{"a": "\xff"}')  # not UTF-8
    with pytest.raises(CheckpointError, match="cannot read the lineage file"):
        read_json(path, what="the lineage file", error=CheckpointError)
    path.write_text("")
    with pytest.raises(CheckpointError, match="cannot read the lineage file"):
        read_json(path, what="the lineage file", error=CheckpointError)


@pytest.mark.parametrize("text, kind", [("[1, 2]", "array"), ('"s"', "string"), ("3", "number"), ("2.5", "number"),
                                        ("true", "boolean"), ("null", "null")])
def test_a_value_of_another_type_is_refused_when_an_object_is_expected(tmp_path, text, kind):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(text)
    with pytest.raises(SourceError) as e:
        read_json(path, what="the tokenizer config", expect=dict, error=SourceError, fix="Re-download it.")
    assert str(e.value) == f"{path}: cannot read the tokenizer config: it holds a JSON {kind}, not a JSON object. " \
                           "Re-download it."
