"""bench/reference_models.py: the reference-model builder, on a tiny base with tiny budgets.
(No test trains the real reference models: that is a benchmark.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bench import reference_models as rm
from lmexpand.cli import main
from tests.conftest import DATA, GENERAL_TEXT, GSM8K_TEST, GSM8K_TRAIN
from tests.tiny import build_tiny_model

TINY = dict(seq_len=32, batch_size=2, max_steps=2, warmup_steps=1, save_every=0)


def tiny_data_root(root: Path) -> Path:
    """Every file the reference recipes and the table read, as small real-text files at the
    paths they have under ../shared/data."""
    general = GENERAL_TEXT.read_text().split("\n\n")
    code = [json.dumps({"path": f"Lib/m{i}.py", "text": f"def f{i}(x):\n    return x + {i}\n"}) for i in range(40)]
    files = {
        "gsm8k/train.jsonl": "\n".join(GSM8K_TRAIN.read_text().splitlines()[:80]) + "\n",
        "gsm8k/test.jsonl": "\n".join(GSM8K_TEST.read_text().splitlines()[:40]) + "\n",
        "general-english/novels-1902-1927/train.txt": "\n\n".join(general[:40]),
        "general-english/novels-1902-1927/valid.txt": "\n\n".join(general[40:60]),
        "general-english/openstax-humanities/train.txt": "\n\n".join(general[60:100]),
        "general-english/openstax-humanities/valid.txt": "\n\n".join(general[100:125]),
        "code/train.jsonl": "\n".join(code[:30]) + "\n",
        "code/valid.jsonl": "\n".join(code[30:]) + "\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    # 30 blocks, as SmolLM2: small-cut keeps blocks 0-12 and 22-30
    return build_tiny_model("llama", tmp_path_factory.mktemp("refbase") / "llama30", num_hidden_layers=30)


def test_every_reference_recipe_validates(tiny_base, tmp_path):
    data = tiny_data_root(tmp_path / "data")
    paths = rm.check(str(tiny_base), data, tmp_path / "check", TINY)
    assert sorted(p.stem for p in paths) == sorted(s.name for s in rm.STAGES)
    # the shipped recipes, as written, with the real data when ../shared is beside the checkout
    if (rm.SHARED_DATA / "gsm8k" / "train.jsonl").is_file():
        rm.check(str(tiny_base), rm.SHARED_DATA, tmp_path / "check-shared")
    used = {s.recipe for s in rm.STAGES}
    assert used == {p.name for p in rm.RECIPES.glob("*.yaml")}, "a stage template in bench/reference_recipes is not built"


def test_cache_key_follows_recipe_and_data_content_only(tmp_path, monkeypatch):
    data = tiny_data_root(tmp_path / "data")
    stage = rm.BY_NAME["math"]
    key = rm.stage_key(stage, "parent-key", data, TINY)
    assert rm.stage_key(stage, "parent-key", data, TINY) == key
    # the same content elsewhere, with other mtimes: same key
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    os.utime(moved / "gsm8k" / "train.jsonl", (1, 1))
    assert rm.stage_key(stage, "parent-key", moved, TINY) == key
    # a data file's content, the parent, the overrides: other keys
    train = moved / "gsm8k" / "train.jsonl"
    train.write_text(train.read_text().replace("clips", "clip", 1))
    assert rm.stage_key(stage, "parent-key", moved, TINY) != key
    assert rm.stage_key(stage, "other-parent", data, TINY) != key
    assert rm.stage_key(stage, "parent-key", data, {**TINY, "max_steps": 3}) != key
    # data the stage does not read: same key
    (moved / "code" / "train.jsonl").write_text("{}\n")
    train.write_text((data / "gsm8k" / "train.jsonl").read_text())
    assert rm.stage_key(stage, "parent-key", moved, TINY) == key
    # the recipe's text
    recipes = tmp_path / "recipes"
    shutil.copytree(rm.RECIPES, recipes)
    monkeypatch.setattr(rm, "RECIPES", recipes)
    assert rm.stage_key(stage, "parent-key", data, TINY) == key
    (recipes / "math.yaml").write_text((recipes / "math.yaml").read_text().replace("lr: 3.0e-5", "lr: 4.0e-5"))
    assert rm.stage_key(stage, "parent-key", data, TINY) != key


def test_builder_makes_every_stage_with_lineage_and_reuses_them(tiny_base, tmp_path, capsys):
    data = tiny_data_root(tmp_path / "data")
    root = tmp_path / "cache"
    built = rm.build(base=str(tiny_base), data_root=data, root=root, overrides=TINY, eval_tokens=128, eval_seq=32,
                     max_segments=2)
    assert list(built) == [s.name for s in rm.STAGES]
    for stage in rm.STAGES:
        d = Path(built[stage.name]["dir"])
        meta = json.loads((d / "lmexpand.json").read_text())
        ref = meta["reference"]
        assert ref["name"] == stage.name and ref["key"] == built[stage.name]["key"]
        assert ref["parent"] == stage.parent and ref["recipe"] == f"bench/reference_recipes/{stage.recipe}"
        parent = str(tiny_base) if stage.parent == "@base" else built[stage.parent]["dir"]
        assert ref["parent_dir"] == parent
        if stage.name == "small-cut":
            assert json.loads((d / "config.json").read_text())["num_hidden_layers"] == 20
            assert ref["tokens"] == 0
        else:
            assert meta["training"][-1]["trainable"] == "all"
            assert meta["training"][-1]["steps"] == 2
            assert ref["tokens"] == len(ref["segments"]) * 2 * 2 * 32
        assert main(["verify", str(d)]) == 0  # the shard hashes survive the move into the cache
        if stage.max_segments > 1:
            assert 1 <= len(ref["segments"]) <= 2
            assert all(set(s["ppl"]) == set(rm.PLATEAU_SETS) for s in ref["segments"])
            assert (root / f"{stage.name}.png").is_file()
    assert json.loads((Path(built["small"]["dir"]) / "config.json").read_text())["num_hidden_layers"] == 20
    assert not (root / ".build").exists() or not any((root / ".build").iterdir())
    capsys.readouterr()
    again = rm.build(base=str(tiny_base), data_root=data, root=root, overrides=TINY, eval_tokens=128, eval_seq=32,
                     max_segments=2)
    assert again == built
    out = capsys.readouterr().out
    assert all(f"{s.name}: cached" in out for s in rm.STAGES), out
    # the table scores every model (base included) on the four sets
    md = rm.table(built, data, root, str(tiny_base), 128, 32)
    assert md.count("\n") == 1 + 1 + len(rm.STAGES) - 1  # header, rule, base, every stage but small-cut


def test_miniature_frontier_keeps_only_undominated_rows():
    from bench.miniature import frontier

    points = [(20.0, 5.0, "a"), (21.0, 4.0, "b"), (22.0, 4.5, "dominated by b"), (19.0, 8.0, "base"),
              (21.0, 4.0, "tie with b")]
    assert [p[2] for p in frontier(points)] == ["base", "a", "b", "tie with b"]
