"""SOLAR depth up-scaling: bitwise layer copies, config, multi-model slices, trainable sets,
seam scaling, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmexpand.checkpoint import CheckpointReader
from lmexpand.cli import main
from lmexpand.expand import get_method, parse_config
from lmexpand.expand.executor import apply_to_model, execute
from tests.test_llama_pro import padded_batch
from tests.tiny import build_tiny_model


def upscale(capsys, *args) -> tuple[int, str, str]:
    code = main(["surgery", "upscale", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    return code, out, err


def assert_layers_follow_map(out: Path, models: dict[str, Path], scaled: set[int] = frozenset(), factor: float = 1.0,
                             base: str = "source") -> None:
    """Every output tensor equals, bitwise, the source tensor the lineage's map names."""
    lineage = json.loads((out / "lmexpand.json").read_text())
    readers = {name: CheckpointReader(p) for name, p in models.items()}
    dst = CheckpointReader(out)
    family = dst.family
    checked = 0
    for t in dst:
        split = family.split_layer_name(t.name)
        value = dst.get_tensor(t.name)
        if split is None:
            assert torch.equal(value, readers[base].get_tensor(t.name)), t.name
            continue
        layer, rel = split
        entry = lineage["layer_map"][layer]
        name, k = (entry.split(":")[0], int(entry.split(":")[1])) if isinstance(entry, str) else ("source", entry)
        expected = readers[name].get_tensor(family.layer_name(k, rel))
        if layer in scaled and rel.startswith(("self_attn.o_proj.", "mlp.down_proj.")):
            expected = (expected.float() * factor).to(expected.dtype)
        assert torch.equal(value, expected), t.name
        checked += 1
    assert checked == len(lineage["layer_map"]) * len(CheckpointReader(models[base]).layer_tensors(0))


def test_paper_recipe(tiny_llama, tmp_path, capsys):  # (every family: tests/test_families.py)
    out = tmp_path / "dus"
    code, _, err = upscale(capsys, tiny_llama, out, "--drop", 1)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    src_cfg = json.loads((tiny_llama / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6  # 2 * (4 - 1)
    if "layer_types" in src_cfg:
        assert cfg["layer_types"] == [src_cfg["layer_types"][k] for k in (0, 1, 2, 1, 2, 3)]
    lineage = json.loads((out / "lmexpand.json").read_text())
    assert lineage["layer_map"] == [0, 1, 2, 1, 2, 3]
    assert lineage["function_preserving"] is False and lineage["seams"] == [3]
    assert_layers_follow_map(out, {"source": tiny_llama})
    # stock transformers loads it and generates; the function changed (honestly reported)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        delta = (model(input_ids=ids, attention_mask=mask).logits - base(input_ids=ids, attention_mask=mask).logits)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    print(f"{tiny_llama.name}: DUS max |dlogit| vs base = {delta.abs().max().item():.3g} (not function-preserving)")
    assert delta.abs().max() > 0 and gen.shape == (3, 24)


def test_trainable_sets(tiny_llama, tmp_path, capsys):
    runs = {"all": None, "duplicated": None, "model.layers.[45].mlp.*": None}
    for choice in runs:
        out = tmp_path / choice.replace("*", "x").replace("[", "").replace("]", "")
        assert upscale(capsys, tiny_llama, out, "--drop", 1, "--trainable", choice)[0] == 0
        runs[choice] = json.loads((out / "lmexpand.json").read_text())
    every = {t.name for t in CheckpointReader(out)}
    assert set(runs["all"]["new_parameters"]) == every and runs["all"]["trainable"] == ["all"]
    dup = set(runs["duplicated"]["new_parameters"])
    # map [0, 1, 2, 1, 2, 3]: the second occurrences of 1 and 2 are output layers 3 and 4
    assert runs["duplicated"]["duplicated_layers"] == [3, 4]
    assert dup == {n for n in every if n.startswith(("model.layers.3.", "model.layers.4."))}
    assert set(runs["model.layers.[45].mlp.*"]["new_parameters"]) == {
        n for n in every if n.startswith(("model.layers.4.mlp.", "model.layers.5.mlp."))}


def test_train_duplicated_updates_only_them(tiny_llama, gsm8k_small, tmp_path, capsys):
    out = tmp_path / "dus"
    assert upscale(capsys, tiny_llama, out, "--drop", 1, "--trainable", "duplicated")[0] == 0
    run = tmp_path / "run"
    code = main(["train", "--model", str(out), "--data", str(gsm8k_small), "--template",
                 "Question: {question}\nAnswer: {answer}", "--seq-len", "32", "--batch-size", "2",
                 "--max-steps", "4", "--warmup-steps", "0", "--lr", "1e-2", "--out", str(run), "--val-every", "0"])
    assert code == 0, capsys.readouterr().err
    before, after = CheckpointReader(out), CheckpointReader(run / "model")
    for t in before:
        same = torch.equal(before.get_tensor(t.name), after.get_tensor(t.name))
        assert same != t.name.startswith(("model.layers.3.", "model.layers.4.")), t.name


def test_multi_model_slices_and_embed_from(tiny_llama, tmp_path, capsys):
    other = build_tiny_model("llama", tmp_path / "other", seed=7)
    out = tmp_path / "frank"
    code, _, err = upscale(capsys, tiny_llama, out, "--slices", "0-3,other:1-4", "--models", f"other={other}",
                           "--embed-from", "other")
    assert code == 0, err
    lineage = json.loads((out / "lmexpand.json").read_text())
    assert lineage["layer_map"] == ["source:0", "source:1", "source:2", "other:1", "other:2", "other:3"]
    assert lineage["duplicated_layers"] == []  # the same index from another model is not a duplicate
    assert len(lineage["sources"]) == 2 and lineage["sources"][0]["path"] == str(other.resolve())
    assert_layers_follow_map(out, {"source": tiny_llama, "other": other}, base="other")
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6


def test_seam_scale(tiny_llama, tmp_path, capsys):
    out = tmp_path / "dus"
    code, _, err = upscale(capsys, tiny_llama, out, "--drop", 1, "--seam-scale", "0.5", "--seam-layers", 1)
    assert code == 0, err
    # map [0, 1, 2 | 1, 2, 3]: the seam is before output layer 3; one layer each side: 2 and 3
    assert_layers_follow_map(out, {"source": tiny_llama}, scaled={2, 3}, factor=0.5)
    wide = tmp_path / "wide"
    assert upscale(capsys, tiny_llama, wide, "--drop", 1, "--seam-scale", "0", "--seam-layers", 5)[0] == 0
    assert_layers_follow_map(wide, {"source": tiny_llama}, scaled=set(range(6)), factor=0.0)


def test_streamed_equals_in_memory(tiny_model, tmp_path):
    method = get_method("upscale")
    reader = CheckpointReader(tiny_model)
    plan = method.plan([reader], parse_config(method, {"slices": "0-4,0-2,3-4", "seam_scale": 0.7}))
    in_memory = apply_to_model(plan, [AutoModelForCausalLM.from_pretrained(tiny_model)]).state_dict()
    streamed = CheckpointReader(execute(plan, tmp_path / "o"))
    assert streamed.num_layers == 7
    for t in streamed:
        assert torch.equal(streamed.get_tensor(t.name), in_memory[t.name]), t.name


def test_dry_run(tiny_llama, tmp_path, capsys):
    code, stdout, err = upscale(capsys, tiny_llama, tmp_path / "o", "--drop", 1, "--dry-run", "--json")
    assert code == 0, err
    assert not (tmp_path / "o").exists()
    plan = json.loads(stdout)
    reader = CheckpointReader(tiny_llama)
    layer = sum(t.numel for t in reader.layer_tensors(0))
    assert plan["num_layers"] == 6 and plan["function_preserving"] is False
    assert plan["parameters_total"] == reader.total_params + 2 * layer
    assert plan["bytes_to_write"] == 4 * plan["parameters_total"]
    code, stdout, _ = upscale(capsys, tiny_llama, "--drop", 1, "--dry-run")
    assert code == 0 and "0-2 <- 0-2" in stdout and "3-5 <- 1-3" in stdout and "seam" in stdout
    assert list(tmp_path.iterdir()) == []


def test_recipe_with_two_models(tiny_llama, tmp_path):
    other = build_tiny_model("llama", tmp_path / "models" / "other", seed=3)
    shutil.copytree(tiny_llama, tmp_path / "models" / "base")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "workdir: out\nsurgery:\n  method: upscale\n  source: models/base\n  args:\n"
        "    slices: [{layers: [0, 3]}, {model: other, layers: [1, 4]}, {layers: [2, 4]}]\n"
        "    models: {other: models/other}\n    trainable: [duplicated]\n"
    )
    assert main(["run", str(recipe)]) == 0
    lineage = json.loads((tmp_path / "out" / "expanded" / "lmexpand.json").read_text())
    assert lineage["layer_map"] == ["source:0", "source:1", "source:2", "other:1", "other:2", "other:3",
                                    "source:2", "source:3"]
    assert lineage["duplicated_layers"] == [6] and lineage["trainable"] == ["duplicated"]
    assert lineage["models"]["other"] == str((tmp_path / "models" / "other").resolve())


# -- errors: exit 2, a message that names the problem, nothing written ----------------------
@pytest.mark.parametrize(
    "args, needles",
    [
        ([], ["exactly one of --drop M", "--slices"]),
        (["--drop", "1", "--slices", "0-2"], ["exactly one of --drop M"]),
        (["--drop", "0"], ["--drop", "greater than 0"]),
        (["--drop", "2"], ["--drop 2", "2*(4-2) = 4 layers", "no more than the source's 4", "below 4/2"]),
        (["--drop", "3"], ["2*(4-3) = 2 layers", "fewer than the source's 4"]),
        (["--slices", ","], ["--slices", "at least one slice"]),
        (["--slices", "3-3"], ["--slices", "[3, 3) is empty"]),
        (["--slices", "3-1"], ["--slices", "[3, 1) is empty"]),
        (["--slices", "0-9"], ["slice 1", "has 4 layers", "at most 4"]),
        (["--slices", "0-2,2-5"], ["slice 2", "[2, 5)", "has 4 layers"]),
        (["--slices", "0-2,x:1-3"], ["'x' is not defined", "--models NAME=DIR"]),
        (["--slices", "0-2,abc"], ["--slices", "START-END"]),
        (["--slices", "0-2", "--models", "nopath"], ["--models", "NAME=DIR"]),
        (["--slices", "0-2", "--embed-from", "y"], ["'y' is not defined"]),
        (["--drop", "1", "--trainable", "all,duplicated"], ["cannot be combined"]),
        (["--drop", "1", "--trainable", "nothing.*"], ["'nothing.*' matches no output tensor"]),
        (["--slices", "0-4", "--trainable", "duplicated"], ["no layer appears twice"]),
        (["--drop", "1", "--seam-scale", "-1"], ["--seam-scale", "greater than or equal to 0"]),
    ],
)
def test_bad_arguments(tiny_llama, tmp_path, capsys, args, needles):
    out = tmp_path / "o"
    code, _, err = upscale(capsys, tiny_llama, out, *args)
    assert code == 2 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "variant, overrides, needles",
    [
        ("llama", {"hidden_size": 32, "intermediate_size": 64}, ["differ in hidden_size: 64 vs 32"]),
        ("llama", {"vocab_size": 300}, ["differ in vocab_size: 320 vs 300"]),
        ("llama", {"num_key_value_heads": 4}, ["differ in num_key_value_heads: 2 vs 4"]),
        ("qwen2", {"tie_word_embeddings": False}, ["different architectures: llama vs qwen2"]),
    ],
)
def test_mismatched_models_name_both(tiny_llama, tmp_path, capsys, variant, overrides, needles):
    other = build_tiny_model(variant, tmp_path / "m" / "other", **overrides)
    code, _, err = upscale(capsys, tiny_llama, tmp_path / "o", "--slices", "0-3,b:1-4", "--models", f"b={other}")
    assert code == 2 and "Traceback" not in err
    assert "'source'" in err and "'b'" in err and str(other) in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "o").exists()


def test_tokenizer_difference_warns(tiny_llama, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<blank>"
    (other / "tokenizer.json").write_text(json.dumps(tok))
    code, _, err = upscale(capsys, tiny_llama, tmp_path / "o", "--slices", "0-3,b:1-4", "--models", f"b={other}")
    assert code == 0, err
    assert "WARNING" in err and "different tokenizer files" in err


@pytest.mark.slow
def test_smollm2_solar_recipe(smollm2, tmp_path, capsys):
    out = tmp_path / "dus"
    code, _, err = upscale(capsys, smollm2, out, "--drop", 8)
    assert code == 0, err
    lineage = json.loads((out / "lmexpand.json").read_text())
    assert lineage["layer_map"] == list(range(22)) + list(range(8, 30))
    assert_layers_follow_map(out, {"source": smollm2})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 44
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    print("SmolLM2 DUS 44 layers, before training:", tok.decode(gen[0][ids["input_ids"].shape[1]:]))
    assert gen.shape[1] == ids["input_ids"].shape[1] + 8
