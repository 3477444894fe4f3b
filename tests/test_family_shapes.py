"""The families' own shape formula (the surgery's structure check, no torch import) equals
what transformers builds on the meta device, for every family and every config flag that
changes a shape; a config that leaves a size to the class's defaults takes the meta build."""

from __future__ import annotations

import json

import pytest

from lmexpand.checkpoint.families import FAMILIES
from lmexpand.checkpoint.verify import _expected_shapes, _meta_shapes
from tests.tiny import TINY_FAMILIES, tiny_config

VARIANTS = [{}, {"attention_bias": True}, {"mlp_bias": True}, {"attention_bias": True, "mlp_bias": True},
            {"head_dim": 32}, {"num_key_value_heads": 4}, {"num_key_value_heads": 1, "head_dim": 8},
            {"tie_word_embeddings": True}, {"tie_word_embeddings": False}]


@pytest.mark.parametrize("variant", list(TINY_FAMILIES))
def test_formula_equals_the_meta_build(variant, tmp_path):
    checked = 0
    for overrides in VARIANTS:
        cfg = tiny_config(variant, **overrides)
        d = tmp_path / f"v{checked}"
        cfg.save_pretrained(d)
        config = json.loads((d / "config.json").read_text())
        family = next(f for f in FAMILIES.values() if config["model_type"] in f.model_types)
        fast = family.expected_shapes(config)
        assert fast is not None, (variant, overrides)
        shapes, optional = _meta_shapes(d)
        # (the meta build's optional names also hold non-persistent buffers, never in a file)
        assert fast == (shapes, optional & set(shapes)), (variant, overrides)
        checked += 1
    assert checked == len(VARIANTS)


def test_sizes_left_to_defaults_take_the_meta_build(tmp_path):
    cfg = tiny_config("llama")
    cfg.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["num_key_value_heads"]
    assert FAMILIES["llama"].expected_shapes(config) is None
    for bad in ({"head_dim": "64"}, {"attention_bias": "yes"}, {"hidden_size": 64.0}):
        assert FAMILIES["llama"].expected_shapes({**config, "num_key_value_heads": 2, **bad}) is None, bad
    # and the check then still answers, from the meta build
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _expected_shapes(tmp_path, config) == _meta_shapes(tmp_path)
    assert {"model.rotary_emb.inv_freq"} <= _meta_shapes(tmp_path)[1]
