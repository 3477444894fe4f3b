"""MoE upcycling: exact at init in stock classes, trainable set, errors."""

from __future__ import annotations

import json
import pytest
import torch
from transformers import AutoModelForCausalLM

from lmexpand.checkpoint import CheckpointReader
from lmexpand.cli import main
from tests.test_llama_pro import max_abs_diff

TOL = 1e-5  # fp32 rounding: the dense model's own fp32-vs-fp64 error is of this order


def moe(capsys, *args) -> tuple[int, str, str]:
    code = main(["surgery", "moe", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    return code, out, err


# exactness of copies and fine-grained experts in every family's stock target, and the
# refusals of families without one: tests/test_families.py


def test_fine_grained_layout(tiny_llama, tmp_path, capsys):
    out = tmp_path / "fg"
    code, _, err = moe(capsys, tiny_llama, out, "--segments", 4, "--shared", 1, "--replicas", 3)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Glm4MoeForCausalLM"]
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (9, 3, 32)
    delta, ga, gb = max_abs_diff(tiny_llama, out)
    print(f"llama -> Glm4Moe M=4 S=1 R=3: max |dlogit| fp32 = {delta:.3g}")
    assert delta <= TOL and torch.equal(ga, gb)
    lineage = json.loads((out / "lmexpand.json").read_text())
    assert lineage["function_preserving"] is True
    names = {t.name for t in CheckpointReader(out, need_family=False)}
    new = set(lineage["new_parameters"])
    assert new == {n for n in names if ".mlp." in n and not n.endswith("e_score_correction_bias")}


def test_tensors_are_the_dense_ffn(tiny_llama, tmp_path, capsys):
    """Experts are bitwise copies (copies style) or bitwise slices (fine-grained) of the FFN."""
    src = CheckpointReader(tiny_llama)
    mix, fg = tmp_path / "mix", tmp_path / "fg"
    assert moe(capsys, tiny_llama, mix, "--experts", 3)[0] == 0
    assert moe(capsys, tiny_llama, fg, "--segments", 4, "--shared", 2, "--replicas", 2)[0] == 0
    m, f = CheckpointReader(mix, need_family=False), CheckpointReader(fg, need_family=False)
    for layer in range(4):
        w = {n: src.get_tensor(f"model.layers.{layer}.mlp.{n}_proj.weight") for n in ("gate", "up", "down")}
        p = f"model.layers.{layer}.block_sparse_moe."
        for e in range(3):
            for mix_name, dense in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                assert torch.equal(m.get_tensor(f"{p}experts.{e}.{mix_name}.weight"), w[dense])
        assert torch.count_nonzero(m.get_tensor(p + "gate.weight")) == 0
        p = f"model.layers.{layer}.mlp."
        assert torch.equal(f.get_tensor(p + "shared_experts.gate_proj.weight"), w["gate"][:64])
        assert torch.equal(f.get_tensor(p + "shared_experts.down_proj.weight"), w["down"][:, :64])
        for e in range(4):  # segment 2 + e // 2, replica e % 2
            j = 2 + e // 2
            assert torch.equal(f.get_tensor(f"{p}experts.{e}.up_proj.weight"), w["up"][32 * j:32 * (j + 1)])
            assert torch.equal(f.get_tensor(f"{p}experts.{e}.down_proj.weight"), w["down"][:, 32 * j:32 * (j + 1)])
        bias = f.get_tensor(p + "gate.e_score_correction_bias")
        assert bias.dtype == torch.float32 and bias.tolist() == pytest.approx([1e-3, 0, 1e-3, 0])


@pytest.mark.parametrize("args", [
    ["--experts", "4", "--layers", "every:2"],              # -> Qwen2MoE with dense layers 0, 2
    ["--experts", "3", "--top-k", "3", "--layers", "1,2"],
    ["--experts", "4", "--router-init", "random"],
    ["--experts", "4", "--router-init", "hidden"],
    ["--segments", "2", "--shared", "1", "--replicas", "4", "--layers", "2,3"],  # first_k_dense_replace=2
    ["--segments", "8", "--shared", "3", "--replicas", "1", "--layers", "every:1"],
])
def test_variants_exact(tiny_llama, tmp_path, capsys, args):
    out = tmp_path / "o"
    code, _, err = moe(capsys, tiny_llama, out, *args)
    assert code == 0, err
    delta, ga, gb = max_abs_diff(tiny_llama, out)
    cfg = json.loads((out / "config.json").read_text())
    print(f"{' '.join(args)} -> {cfg['architectures'][0]}: max |dlogit| = {delta:.3g}")
    assert delta <= TOL and torch.equal(ga, gb)
    if "every:2" in args:
        assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["mlp_only_layers"] == [0, 2]
    if "2,3" in args:
        assert cfg["first_k_dense_replace"] == 2
    if "random" in args or "hidden" in args:
        router = CheckpointReader(out, need_family=False).get_tensor("model.layers.0.block_sparse_moe.gate.weight")
        assert torch.count_nonzero(router) == router.numel()


def test_inexact_options_print_the_delta(tiny_llama, tmp_path, capsys):
    code, _, err = moe(capsys, tiny_llama, tmp_path / "n", "--experts", 4, "--noise", "0.01")
    assert code == 0, err
    assert "not exact at init: max |dlogit| vs the source = " in err
    delta = float(err.split("vs the source = ")[1].split()[0])
    assert delta > TOL and delta == pytest.approx(max_abs_diff(tiny_llama, tmp_path / "n")[0], rel=0.5)
    code, _, err = moe(capsys, tiny_llama, tmp_path / "k", "--segments", 4, "--replicas", 2, "--top-k", 2)
    assert code == 0 and "not exact at init" in err
    assert json.loads((tmp_path / "k" / "lmexpand.json").read_text())["function_preserving"] is False


def test_bf16_source(tmp_path, capsys):
    from tests.tiny import build_tiny_model

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(build_tiny_model("llama", tmp_path / "l"), dtype=torch.bfloat16).save_pretrained(src)
    assert moe(capsys, src, tmp_path / "fg", "--segments", 4)[0] == 0
    dtypes = {t.name: t.dtype for t in CheckpointReader(tmp_path / "fg", need_family=False)}
    assert dtypes["model.layers.0.mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["model.layers.0.mlp.experts.0.up_proj.weight"] == "BF16"


# -- errors: exit 2, the message names the problem, nothing written ---------------------------
@pytest.mark.parametrize(
    "args, needles",
    [
        ([], ["exactly one of --experts E", "--segments M"]),
        (["--experts", "4", "--segments", "4"], ["exactly one of"]),
        (["--experts", "2", "--top-k", "3"], ["--experts 2 is below --top-k 3"]),
        (["--experts", "1"], ["--experts", "greater than or equal to 2"]),
        (["--segments", "5"], ["--segments 5 does not divide the intermediate size 128", "2, 4, 8, 16, 32, 64, 128"]),
        (["--segments", "4", "--shared", "4"], ["--shared 4 must be below --segments 4"]),
        (["--segments", "4", "--shared", "5"], ["--shared 5 must be below"]),
        (["--segments", "4", "--top-k", "9"], ["--top-k 9 is above the 6 routed experts"]),
        (["--segments", "2", "--replicas", "1"], ["= 1 routed expert", "needs at least 2", "--replicas"]),
        (["--experts", "4", "--layers", "1,7"], ["--layers: layer 7 is out of range", "0..3"]),
        (["--experts", "4", "--layers", "one"], ["--layers", "'all', 'every:N'"]),
        (["--segments", "4", "--layers", "0,1"], ["Glm4MoeForCausalLM keeps only the first layers dense", "suffix"]),
        (["--segments", "4", "--router-init", "random"], ["fine-grained routers start at zero"]),
        (["--experts", "4", "--trainable", "nothing*"], ["'nothing*' matches no output tensor"]),
    ],
)
def test_bad_arguments(tiny_llama, tmp_path, capsys, args, needles):
    out = tmp_path / "o"
    code, _, err = moe(capsys, tiny_llama, out, *args)
    assert code == 2 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert list(tmp_path.iterdir()) == []


def test_source_already_moe(tiny_llama, tmp_path, capsys):
    assert moe(capsys, tiny_llama, tmp_path / "mix", "--experts", 4)[0] == 0
    code, _, err = moe(capsys, tmp_path / "mix", tmp_path / "again", "--experts", 2)
    assert code == 2 and "already a mixture-of-experts model" in err
    assert not (tmp_path / "again").exists()


def _logits_and_greedy(model_dir, dtype, ids, mask, **load):
    """One load of ``model_dir`` in ``dtype``: its logits on (ids, mask) and its greedy
    continuation (32 tokens, cached), as max_abs_diff computes them."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **load).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                                use_cache=True, pad_token_id=0, eos_token_id=None)
    return logits, greedy


@pytest.fixture(scope="module")
def smollm2_dense(smollm2):
    """The dense SmolLM2's side of test_smollm2_exact, the same for every upcycling: fp32
    logits and greedy continuation, and fp64 logits (the reference), each model loaded once."""
    from tests.test_llama_pro import padded_batch

    ids, mask = padded_batch(49152)
    logits32, greedy = _logits_and_greedy(smollm2, torch.float32, ids, mask)
    with torch.no_grad():
        d64 = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float64).eval()
        logits64 = d64(input_ids=ids, attention_mask=mask).logits
    return ids, mask, logits32, greedy, logits64


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--experts", "4", "--top-k", "2"], ["--segments", "8", "--shared", "2", "--replicas", "2"]])
def test_smollm2_exact(smollm2, smollm2_dense, tmp_path, capsys, args):
    """SmolLM2 (30 layers, logits up to ~35): in fp64 the upcycled model equals the dense one
    exactly; in fp32 the difference is rounding: the upcycled model's own fp32 error against
    the fp64 reference is of the size of the dense model's (at most twice it). The
    fine-grained split sums segments in another order, so its fp32 logits differ from the
    dense fp32 ones by 4.2e-5 on one machine and 6.9e-5 on another, where the dense model's
    own fp32 error was 6.8e-5 and 5.5e-5: the same rounding, compared directly below.
    (The dense side is computed once for both upcyclings: smollm2_dense.)"""
    out = tmp_path / "moe"
    code, _, err = moe(capsys, smollm2, out, *args)
    assert code == 0, err
    ids, mask, dense32, dense_greedy, ref = smollm2_dense
    moe32, moe_greedy = _logits_and_greedy(out, torch.float32, ids, mask)
    delta = (dense32 - moe32).abs().max().item()
    assert torch.equal(dense_greedy, moe_greedy)
    with torch.no_grad():
        m64 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64, experts_implementation="eager").eval()
        delta64 = (m64(input_ids=ids, attention_mask=mask).logits - ref).abs().max().item()
        del m64
        dense_rounding = (dense32.double() - ref).abs().max().item()
        m32 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, experts_implementation="eager").eval()
        moe_rounding = (m32(input_ids=ids, attention_mask=mask).logits.double() - ref).abs().max().item()
    print(f"SmolLM2 {' '.join(args)}: max |dlogit| fp32 = {delta:.3g}, fp64 = {delta64:.3g}; fp32-vs-fp64 error: "
          f"dense {dense_rounding:.3g}, upcycled {moe_rounding:.3g}")
    assert delta64 <= 1e-10
    assert moe_rounding <= 2 * dense_rounding


# -- training: balancing, gradients, written back per expert ---------------------------------
def test_balance_and_z_loss_match_hand_computation():
    from lmexpand.train.moe import balance_loss, z_loss

    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 1.0], [-1.0, 0.0, 3.0]])
    idx = torch.tensor([[0, 1], [0, 1], [1, 2], [2, 1]])
    # by hand: f = choices per expert / (T*k) = [2, 4, 2] / 8; P = mean softmax rows
    import math

    def softmax(row):
        e = [math.exp(x) for x in row]
        return [x / sum(e) for x in e]

    rows = [softmax(r) for r in logits.tolist()]
    P = [sum(r[e] for r in rows) / 4 for e in range(3)]
    f = [2 / 8, 4 / 8, 2 / 8]
    expected = 3 * sum(fe * pe for fe, pe in zip(f, P))
    assert balance_loss(logits, idx, sigmoid=False).item() == pytest.approx(expected, rel=1e-6)
    sig = [[1 / (1 + math.exp(-x)) for x in r] for r in logits.tolist()]
    Ps = [sum(r[e] / sum(r) for r in sig) / 4 for e in range(3)]
    assert balance_loss(logits, idx, sigmoid=True).item() == pytest.approx(3 * sum(a * b for a, b in zip(f, Ps)), rel=1e-6)
    z = sum(math.log(sum(math.exp(x) for x in r)) ** 2 for r in logits.tolist()) / 4
    assert z_loss(logits).item() == pytest.approx(z, rel=1e-6)
    # balanced choices and uniform probabilities give exactly 1
    assert balance_loss(torch.zeros(6, 3), torch.tensor([[0], [1], [2], [0], [1], [2]]), sigmoid=False).item() == pytest.approx(1.0)


@pytest.mark.parametrize("args", [["--experts", "4"], ["--segments", "4", "--shared", "1", "--replicas", "2"]])
def test_gradients_reach_routers(tiny_llama, tmp_path, capsys, args):
    from lmexpand.train.moe import RouterMonitor

    assert moe(capsys, tiny_llama, tmp_path / "m", *args)[0] == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m").train()
    monitor = RouterMonitor(model, balance_coef=0.01, z_coef=0.001, bias_rate=0.0)
    assert len(monitor.routers) == 4
    ids = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    aux = monitor.aux_loss()
    assert aux.item() > 0
    (out.loss + aux).backward()
    for name, router in monitor.routers:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0, name


def _train(model_dir, data, run, steps=8, *extra) -> int:
    return main(["train", "--model", str(model_dir), "--data", str(data), "--template",
                 "Question: {question}\nAnswer: {answer}", "--seq-len", "48", "--batch-size", "4",
                 "--max-steps", str(steps), "--warmup-steps", "0", "--lr", "3e-3", "--out", str(run),
                 "--val-every", "0", *map(str, extra)])


@pytest.mark.parametrize("args", [["--experts", "4"], ["--segments", "4", "--shared", "1", "--replicas", "2"]])
def test_training_an_upcycled_model(tiny_llama, gsm8k_small, tmp_path, capsys, args):
    expanded = tmp_path / "m"
    assert moe(capsys, tiny_llama, expanded, *args)[0] == 0
    run = tmp_path / "run"
    assert _train(expanded, gsm8k_small, run, 8, "--moe-bias-rate", "0.01") == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert all("moe_max_mean_load" in r and r["aux_loss"] > 0 for r in records if "loss" in r)
    before, after = CheckpointReader(expanded, need_family=False), CheckpointReader(run / "model", need_family=False)
    new = set(json.loads((expanded / "lmexpand.json").read_text())["new_parameters"])
    changed = {t.name for t in before if not torch.equal(before.get_tensor(t.name), after.get_tensor(t.name))}
    assert changed - new <= {n for n in before.tensors if n.endswith("e_score_correction_bias")}  # frozen: bitwise same
    assert {n for n in new if n.endswith("gate.weight")} <= changed  # every router trained
    assert any(".experts.0." in n for n in changed)  # fused expert parameters written back per expert
    if "--segments" in args:
        # bias balancing moved load onto replicas that started unselected
        assert records[-1]["moe_other_replica_share"] > 0
        assert any(n.endswith("e_score_correction_bias") for n in changed)
    # the written model is the trained one: stock class loads it, per-expert tensors included
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert model.config.architectures == json.loads((expanded / "config.json").read_text())["architectures"]


@pytest.mark.slow
def test_smollm2_fine_grained_training_balances(smollm2, gsm8k_small, tmp_path, capsys):
    """Upcycle SmolLM2 (M=8, S=2, R=2: 12 experts, top-6), train experts + routers briefly,
    routers at the full learning rate (the default 0.01x keeps the function better but the
    load then alternates between replicas step by step; docs/moe.md has both runs).
    At init all load sits on replica 0 of each segment: max/mean load = 2.0. Bias balancing
    must move load onto the other replicas; the bound below was measured (see docs/moe.md)."""
    expanded = tmp_path / "fg"
    assert moe(capsys, smollm2, expanded, "--segments", 8, "--shared", 2, "--replicas", 2)[0] == 0
    run = tmp_path / "run"
    code = main(["train", "--model", str(expanded), "--data", str(gsm8k_small), "--template",
                 "Question: {question}\nAnswer: {answer}", "--seq-len", "128", "--batch-size", "4",
                 "--max-steps", "16", "--warmup-steps", "2", "--lr", "1e-3", "--out", str(run),
                 "--val-every", "16", "--moe-bias-rate", "0.001", "--moe-router-lr-scale", "1.0",
                 "--no-tensorboard"])
    assert code == 0, capsys.readouterr().err
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rec if "val_loss" in r]
    steps = [r for r in rec if "loss" in r]
    print("SmolLM2 fine-grained: val loss", val,
          "| max/mean load, mean over layers", [round(r["moe_layer_mean_max_mean_load"], 3) for r in steps],
          "| worst layer", [round(r["moe_max_mean_load"], 3) for r in steps],
          "| other-replica share", [round(r["moe_other_replica_share"], 3) for r in steps])
    # full-lr routers over top-6 routing are chaotic: the same run gave 2.356, 2.368 and 2.518
    # (from 2.466) on this machine (CPU thread-order float sums flip routing choices); what
    # this test pins is the balancing, with the loss kept from blowing up
    assert val[-1] < val[0] + 0.1
    assert steps[0]["moe_max_mean_load"] == pytest.approx(2.0)  # replica 0 of 6 segments, of 12 experts
    assert steps[-1]["moe_other_replica_share"] > 0.05
    # measured 1.44 after 16 steps (worst single layer: 2.0, the last one); bound with margin
    assert steps[-1]["moe_layer_mean_max_mean_load"] < 1.6
