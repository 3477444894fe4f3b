"""LLaMA-Pro block expansion: exact function preservation, trainable set, plan paths, errors."""

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
from tests.tiny import build_tiny_model


def surgery(capsys, *args) -> tuple[int, str, str]:
    code = main(["surgery", "llama-pro", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    return code, out, err


def padded_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, :11] = 0
    ids[mask == 0] = 0
    return ids, mask


def max_abs_diff(a_dir: Path, b_dir: Path, dtype=torch.float32) -> tuple[float, torch.Tensor, torch.Tensor]:
    a = AutoModelForCausalLM.from_pretrained(a_dir, dtype=dtype).eval()
    b = AutoModelForCausalLM.from_pretrained(b_dir, dtype=dtype).eval()
    ids, mask = padded_batch(a.config.vocab_size)
    with torch.no_grad():
        la = a(input_ids=ids, attention_mask=mask).logits
        lb = b(input_ids=ids, attention_mask=mask).logits
        ga = a.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, use_cache=True,
                        pad_token_id=0, eos_token_id=None)
        gb = b.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, use_cache=True,
                        pad_token_id=0, eos_token_id=None)
    return (la - lb).abs().max().item(), ga, gb


# exactness for every family (cached generation, per-layer config lists): tests/test_families.py


def test_bf16_checkpoint_stays_exact(tmp_path, capsys):
    src = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model("qwen2", tmp_path / "q2"), dtype=torch.bfloat16)
    model.save_pretrained(src)
    out = tmp_path / "pro"
    assert surgery(capsys, src, out, "--add", 4)[0] == 0
    assert {t.dtype for t in CheckpointReader(out)} == {"BF16"}
    delta, ga, gb = max_abs_diff(src, out, dtype=torch.bfloat16)
    print(f"bf16: max |dlogit| = {delta}")
    # a zero residual branch adds exactly 0 in any precision, so even bf16 is exact
    assert delta == 0.0 and torch.equal(ga, gb)


def test_trainable_set_and_bitwise_copies(tiny_model, tmp_path, capsys):
    out = tmp_path / "pro"
    assert surgery(capsys, tiny_model, out, "--positions", "0,2", "--per-group", 2)[0] == 0
    lineage = json.loads((out / "lmexpand.json").read_text())
    layer_map = lineage["layer_map"]
    assert layer_map == [0, "new copy of 0", "new copy of 0", 1, 2, "new copy of 2", "new copy of 2", 3]
    new_layers = {i for i, e in enumerate(layer_map) if isinstance(e, str)}
    src, dst = CheckpointReader(tiny_model), CheckpointReader(out)
    family = dst.family
    expected_new = {t.name for t in dst if (s := family.split_layer_name(t.name)) and s[0] in new_layers}
    assert set(lineage["new_parameters"]) == expected_new
    assert lineage["function_preserving"] is True
    assert lineage["sources"][0]["sha256"] and lineage["method"] == "llama-pro"
    zeroed = 0
    for t in dst:
        split = family.split_layer_name(t.name)
        if split is None:
            assert torch.equal(dst.get_tensor(t.name), src.get_tensor(t.name)), t.name
            continue
        layer, rel = split
        entry = layer_map[layer]
        src_layer = entry if isinstance(entry, int) else int(entry.rsplit(" ", 1)[1])
        value = dst.get_tensor(t.name)
        offset = family.branch_end_offset(rel)  # what ends a residual branch, at its zero point
        if layer in new_layers and offset is not None:
            assert torch.equal(value, torch.full_like(value, -offset)), t.name
            zeroed += 1
        else:
            assert torch.equal(value, src.get_tensor(family.layer_name(src_layer, rel))), t.name
    assert zeroed >= 2 * len(new_layers)


def test_streamed_equals_in_memory_bitwise(tiny_model):
    method = get_method("llama-pro")
    reader = CheckpointReader(tiny_model)
    plan = method.plan([reader], parse_config(method, {"add": 2, "copy_from": "next"}))
    source = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    in_memory = apply_to_model(plan, [source]).state_dict()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = execute(plan, Path(d) / "pro")
        streamed = CheckpointReader(out)
        assert set(streamed.tensors) <= set(in_memory)
        for t in streamed:
            assert torch.equal(streamed.get_tensor(t.name), in_memory[t.name]), t.name


def test_copy_from_next_and_group_remainder(tiny_llama, tmp_path, capsys):
    out = tmp_path / "pro"
    code, _, err = surgery(capsys, tiny_llama, out, "--add", 3, "--copy-from", "next")
    assert code == 0, err
    lineage = json.loads((out / "lmexpand.json").read_text())
    # 4 blocks in 3 groups: sizes [2, 1, 1]; copies go before each group's first block
    assert lineage["layer_map"] == ["new copy of 0", 0, 1, "new copy of 2", 2, "new copy of 3", 3]
    assert max_abs_diff(tiny_llama, out)[0] == 0.0


def test_dry_run_writes_nothing_and_reports_memory(tiny_llama, tmp_path, capsys):
    out = tmp_path / "pro"
    code, stdout, err = surgery(capsys, tiny_llama, out, "--add", 2, "--dry-run", "--json")
    assert code == 0, err
    assert not out.exists()
    plan = json.loads(stdout)
    assert plan["num_layers"] == 6 and plan["function_preserving"] is True
    per_layer = CheckpointReader(tiny_llama)
    layer_params = sum(t.numel for t in per_layer.layer_tensors(0))
    assert plan["parameters_new"] == 2 * layer_params
    assert plan["parameters_total"] == per_layer.total_params + 2 * layer_params
    assert plan["bytes_to_write"] == 4 * plan["parameters_total"]
    mem = plan["training_memory_bytes"]
    # fp32 weights + fp32 grads + two fp32 AdamW moments = 16 bytes per new parameter
    assert mem["new_weights"] + mem["gradients"] + mem["adamw_states"] == 16 * plan["parameters_new"]
    code, stdout, _ = surgery(capsys, tiny_llama, "--add", 2, "--dry-run")
    assert code == 0 and "layer map" in stdout and "new copy of 1" in stdout


# -- errors: exit 2, message names the problem, nothing written ------------------------------
@pytest.mark.parametrize(
    "args, needles",
    [
        (["--add", "0"], ["--add", "greater than 0"]),
        (["--add", "-2"], ["--add", "greater than 0"]),
        (["--add", "5"], ["--add 5", "at most 4 groups", "--add 1..4"]),
        (["--positions", "1,9"], ["--positions", "layer 9 is out of range", "0..3"]),
        (["--positions", "1,1"], ["--positions", "appears more than once"]),
        (["--positions", "-1"], ["--positions", "negative"]),
        (["--positions", "1,x"], ["--positions", "comma-separated integers"]),
        (["--add", "2", "--positions", "1"], ["exactly one of --add N", "--positions"]),
        ([], ["exactly one of --add N"]),
        (["--positions", "3", "--copy-from", "next"], ["block 3 is the last one", "--copy-from previous"]),
        (["--add", "2", "--per-group", "0"], ["--per-group", "greater than 0"]),
        (["--add", "2", "--copy-from", "middle"], ["--copy-from", "middle"]),
        (["--add", "2", "--max-shard-size", "lots"], ["--max-shard-size", "not a size"]),
    ],
)
def test_bad_arguments(tiny_llama, tmp_path, capsys, args, needles):
    out = tmp_path / "pro"
    code, _, err = surgery(capsys, tiny_llama, out, *args)
    assert code == 2 and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unsupported_family_and_broken_index(tiny_llama, tmp_path, capsys):
    gpt = tmp_path / "gpt"
    shutil.copytree(tiny_llama, gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    code, _, err = surgery(capsys, gpt, tmp_path / "o1", "--add", 2)
    assert code == 2 and "not supported" in err and "llama" in err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00009.safetensors"}}))
    code, _, err = surgery(capsys, broken, tmp_path / "o2", "--add", 2)
    assert code == 2 and "model-00009.safetensors" in err and "missing" in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_layer_missing_a_tensor_is_named(tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    state = load_file(broken / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    code, _, err = surgery(capsys, broken, tmp_path / "o", "--add", 2)
    assert code == 2 and "model.layers.1.mlp.up_proj.weight" in err and "incomplete" in err


def test_target_rules_through_the_cli(tiny_llama, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep")
    code, _, err = surgery(capsys, tiny_llama, existing, "--add", 2)
    assert code == 2 and "not empty" in err and "--force" in err
    assert (existing / "notes.txt").read_text() == "keep"
    code, _, err = surgery(capsys, tiny_llama, tiny_llama / "inside", "--add", 2)
    assert code == 2 and "inside the source" in err
    assert not (tiny_llama / "inside").exists()
    code, _, err = surgery(capsys, tiny_llama, existing, "--add", 2, "--force")
    assert code == 0, err
    assert not (existing / "notes.txt").exists() and (existing / "lmexpand.json").is_file()


def test_disk_full_through_the_cli(tiny_llama, tmp_path, capsys, monkeypatch):
    import errno

    from lmexpand.checkpoint import writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_copy_range", full)
    code, _, err = surgery(capsys, tiny_llama, tmp_path / "o", "--add", 2)
    assert code == 2 and "disk filled up" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_expanding_an_expanded_model_keeps_history(tiny_llama, tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert surgery(capsys, tiny_llama, first, "--add", 1)[0] == 0
    assert surgery(capsys, first, second, "--add", 1)[0] == 0
    lineage = json.loads((second / "lmexpand.json").read_text())
    assert lineage["history"][0]["method"] == "llama-pro"
    assert max_abs_diff(tiny_llama, second)[0] == 0.0


@pytest.mark.slow
def test_smollm2_plus_8_blocks_is_exact(smollm2, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "smol-pro"
    code, _, err = surgery(capsys, "smollm2-135m", out, "--add", 8)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 38
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        # byte for byte, but for the tokenizer class transformers 4.x can read too (checkpoint/compat.py)
        from lmexpand.checkpoint.compat import for_every_client

        assert (out / name).read_bytes() == for_every_client(name, (smollm2 / name).read_bytes()), name
    base = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    pro = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["The capital of France is", "def fibonacci(n):\n    "], return_tensors="pt", padding=True)
    with torch.no_grad():
        delta = (base(**batch).logits - pro(**batch).logits).abs().max().item()
        ga = base.generate(**batch, max_new_tokens=32, do_sample=False)
        gb = pro.generate(**batch, max_new_tokens=32, do_sample=False)
    print(f"SmolLM2 +8 blocks: max |dlogit| fp32 = {delta}")
    assert delta == 0.0
    assert torch.equal(ga, gb)
    assert "Paris" in tok.decode(gb[0])
