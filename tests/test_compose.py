"""Logit compositions (logit sum, proxy-tuning, contrastive decoding) and `lmexpand generate`:
the formula on members' own logits, exact special cases, caches and batches, training only
the head copies, export without lmexpand, and bad inputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmexpand.checkpoint import CheckpointReader
from lmexpand.cli import main
from lmexpand.compose.loading import load_model
from tests.conftest import GENERAL_TEXT
from tests.fresh_process import max_delta_without_lmexpand
from tests.test_llama_pro import padded_batch
from tests.tiny import build_tiny_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, Path]:
    """Three members of different families and sizes with one tokenizer: a Llama (width 64,
    4 layers), a tied Qwen2 (96, 3 layers) and a tied Llama whose vocabulary has 64 padding
    rows (384 for the same 320-token tokenizer)."""
    root = tmp_path_factory.mktemp("compose")
    a = build_tiny_model("llama", root / "llama")
    b = build_tiny_model("qwen2", root / "qwen2", seed=3, hidden_size=96, intermediate_size=160, num_hidden_layers=3)
    c = build_tiny_model("llama-tied", root / "padded", seed=4, vocab_size=384)
    for f in TOKENIZER_FILES:  # the 320-token tokenizer of the others (a 384-row model, 64 rows of padding)
        if (a / f).is_file():
            shutil.copy(a / f, c / f)
    return {"llama": a, "qwen2": b, "padded": c}


def surgery(capsys, method: str, *args) -> tuple[int, str]:
    code = main(["surgery", method, *[str(a) for a in args]])
    return code, capsys.readouterr().err


def own_logits(paths, ids, mask) -> list[torch.Tensor]:
    out = []
    for p in paths:
        m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
        with torch.no_grad():
            out.append(m(input_ids=ids, attention_mask=mask).logits[..., :320].float())
    return out


def composed_logits(path, ids, mask) -> torch.Tensor:
    m = load_model(path).eval()
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask).logits


def greedy(model, ids, mask, use_cache=True, n=10):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=None, use_cache=use_cache)


def max_delta(a, b, mask) -> float:
    return (a - b).abs()[mask.bool()].max().item()


# -- the formula, on members' own logits --------------------------------------------------------
def test_logit_sum_is_the_weighted_sum_of_members(members, tmp_path, capsys):
    ids, mask = padded_batch(320)
    z = own_logits([members["llama"], members["qwen2"], members["padded"]], ids, mask)
    code, err = surgery(capsys, "logit-sum", members["llama"], members["qwen2"], tmp_path / "two")
    assert code == 0, err
    d2 = max_delta(composed_logits(tmp_path / "two", ids, mask), z[0] + z[1], mask)
    code, err = surgery(capsys, "logit-sum", members["llama"], members["qwen2"], members["padded"], tmp_path / "three",
                        "--weights", "1,0.5,2")
    assert code == 0, err
    assert "common first 320 rows" in err and "ties its head" in err
    out = composed_logits(tmp_path / "three", ids, mask)
    d3 = max_delta(out, z[0] + 0.5 * z[1] + 2 * z[2], mask)
    print(f"logit sum vs formula: 2 members max |d| = {d2:.3g}, 3 members (weights 1,0.5,2) = {d3:.3g}")
    assert out.shape == (3, 16, 320) and d2 <= 1e-6 and d3 <= 1e-6
    heads = {t.name: t.shape for t in CheckpointReader(tmp_path / "three", need_family=False)}
    assert heads == {"members.0.lm_head.weight": (320, 64), "members.1.lm_head.weight": (320, 96),
                     "members.2.lm_head.weight": (384, 64)}
    lineage = json.loads((tmp_path / "three" / "lmexpand.json").read_text())
    assert sorted(lineage["new_parameters"]) == sorted(heads) and len(lineage["sources"]) == 3


def test_proxy_tuning_and_contrastive_formulas(members, tmp_path, capsys):
    ids, mask = padded_batch(320)
    base, expert, anti = members["llama"], members["qwen2"], members["padded"]
    z = own_logits([base, expert, anti], ids, mask)
    assert surgery(capsys, "proxy-tune", base, expert, anti, tmp_path / "p", "--alpha", "0.7")[0] == 0
    d = max_delta(composed_logits(tmp_path / "p", ids, mask), z[0] + 0.7 * (z[1] - z[2]), mask)
    assert d <= 1e-6, d
    assert list(CheckpointReader(tmp_path / "p", need_family=False)) == []  # nothing to train, nothing stored
    # contrastive decoding with a tight plausibility mask (alpha 0.9: few candidates per row)
    assert surgery(capsys, "contrastive", expert, anti, tmp_path / "cd", "--beta", "0.5", "--alpha", "0.9")[0] == 0
    out = composed_logits(tmp_path / "cd", ids, mask)
    ze, za = z[1], z[2]
    implausible = ze < math.log(0.9) + ze.max(-1, keepdim=True).values
    want = (1.5 * ze - 0.5 * za).masked_fill(implausible, float("-inf"))
    valid = mask.bool()
    assert torch.equal(torch.isinf(out)[valid], implausible[valid]) and implausible[valid].any()
    finite = ~implausible & valid[..., None]
    d = (out - want).abs()[finite].max().item()
    print(f"proxy-tuning vs formula max |d| = {d:.3g}; contrastive masked {implausible[valid].float().mean():.1%}")
    assert d <= 1e-6


def test_exact_special_cases_cache_and_batch(members, tmp_path, capsys):
    """alpha = 0 is the base bitwise; beta = 0 generates the expert's greedy output; cached
    generation equals uncached; a left-padded batch equals its rows one by one."""
    ids, mask = padded_batch(320)
    base_path, expert, anti = members["llama"], members["qwen2"], members["padded"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    assert surgery(capsys, "proxy-tune", base_path, expert, anti, tmp_path / "p0", "--alpha", "0")[0] == 0
    p0 = load_model(tmp_path / "p0").eval()
    with torch.no_grad():
        assert torch.equal(p0(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(greedy(p0, ids, mask), greedy(base, ids, mask))

    assert surgery(capsys, "contrastive", expert, anti, tmp_path / "cd0", "--beta", "0")[0] == 0
    cd0 = load_model(tmp_path / "cd0").eval()
    expert_model = AutoModelForCausalLM.from_pretrained(expert, dtype=torch.float32).eval()
    assert torch.equal(greedy(cd0, ids, mask), greedy(expert_model, ids, mask))

    assert surgery(capsys, "contrastive", expert, anti, tmp_path / "cd", "--beta", "1", "--alpha", "0.05")[0] == 0
    assert surgery(capsys, "logit-sum", base_path, expert, anti, tmp_path / "sum")[0] == 0
    for name in ("cd", "sum"):
        model = load_model(tmp_path / name).eval()
        batched = greedy(model, ids, mask)
        assert torch.equal(batched, greedy(model, ids, mask, use_cache=False)), name
        for row in range(ids.shape[0]):  # each prompt alone, without its padding
            keep = mask[row].bool()
            alone = greedy(model, ids[row:row + 1, keep], mask[row:row + 1, keep])
            assert torch.equal(alone[0, -10:], batched[row, -10:]), (name, row)


def test_sampling_and_top_p_through_generate(members, tmp_path, capsys):
    assert surgery(capsys, "logit-sum", members["llama"], members["qwen2"], tmp_path / "sum")[0] == 0
    model = load_model(tmp_path / "sum").eval()
    ids, mask = padded_batch(320)

    def sample(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_p=0.9,
                                  temperature=0.8, pad_token_id=0, eos_token_id=None)

    a, b, c = sample(1), sample(1), sample(2)
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- training only the head copies, export ----------------------------------------------------------
def test_training_changes_only_the_head_copies_and_export_loads_without_lmexpand(members, gsm8k_small, tmp_path,
                                                                                    capsys):
    paths = [members["llama"], members["padded"]]  # the second ties its head to its embedding
    before = {p: {t.name: CheckpointReader(p).get_tensor(t.name).clone() for t in CheckpointReader(p)} for p in paths}
    assert surgery(capsys, "logit-sum", *paths, tmp_path / "sum")[0] == 0
    run = tmp_path / "run"
    code = main(["train", "--model", str(tmp_path / "sum"), "--data", str(gsm8k_small), "--template",
                 "Question: {question}\nAnswer: {answer}", "--seq-len", "48", "--batch-size", "4",
                 "--max-steps", "12", "--warmup-steps", "0", "--lr", "3e-3", "--out", str(run), "--val-every", "12"])
    assert code == 0, capsys.readouterr().err
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rec if "loss" in r]
    val = [r["val_loss"] for r in rec if "val_loss" in r]
    assert losses[-1] < losses[0] and val[-1] < val[0]
    for p, tensors in before.items():  # every member's weights bitwise unchanged (the tied embedding too)
        reader = CheckpointReader(p)
        for name, value in tensors.items():
            assert torch.equal(reader.get_tensor(name), value), (p, name)
    old, new = CheckpointReader(tmp_path / "sum", need_family=False), CheckpointReader(run / "model", need_family=False)
    assert [t.name for t in old] == [t.name for t in new]
    for t in old:
        assert not torch.equal(old.get_tensor(t.name), new.get_tensor(t.name)), t.name
    trained = load_model(run / "model").eval()
    emb = CheckpointReader(paths[1]).get_tensor("model.embed_tokens.weight")
    assert torch.equal(trained.members[1].get_input_embeddings().weight, emb)  # untied: the embedding never moved
    ids, mask = padded_batch(320)
    with torch.no_grad():
        expected = trained(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(greedy(trained, ids, mask), greedy(trained, ids, mask, use_cache=False))

    assert main(["export", str(run), str(tmp_path / "x")]) == 0, capsys.readouterr().err
    assert max_delta_without_lmexpand(tmp_path / "x", ids, mask, expected, tmp_path) == 0.0
    assert "trust_remote_code=True" in (tmp_path / "x" / "README.md").read_text()


def test_export_of_proxy_composition_is_self_contained(members, tmp_path, capsys):
    assert surgery(capsys, "proxy-tune", members["llama"], members["qwen2"], members["padded"], tmp_path / "p")[0] == 0
    assert main(["export", str(tmp_path / "p"), str(tmp_path / "x")]) == 0, capsys.readouterr().err
    ids, mask = padded_batch(320)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "x", trust_remote_code=True).eval()
    with torch.no_grad():
        got = exported(input_ids=ids, attention_mask=mask).logits
    assert max_delta(got, composed_logits(tmp_path / "p", ids, mask), mask) == 0.0
    assert json.loads((tmp_path / "x" / "config.json").read_text())["member_paths"] == [None, None, None]


def test_eval_and_verify_accept_compositions(members, tmp_path, capsys):
    assert surgery(capsys, "logit-sum", members["llama"], members["qwen2"], tmp_path / "sum")[0] == 0
    assert main(["verify", str(tmp_path / "sum")]) == 0, capsys.readouterr().err
    code = main(["eval", str(tmp_path / "sum"), "--base", str(members["llama"]), "--data", f"g={GENERAL_TEXT}",
                 "--max-tokens", "256", "--seq-len", "64", "--no-samples", "--out", str(tmp_path / "e")])
    assert code == 0, capsys.readouterr().err
    ppl = json.loads((tmp_path / "e" / "results.json").read_text())["perplexity"]
    assert all(math.isfinite(row["g"]["ppl"]) for row in ppl.values())


def test_eval_refuses_perplexity_of_contrastive_decoding(members, tmp_path, capsys):
    assert surgery(capsys, "contrastive", members["llama"], members["padded"], tmp_path / "cd")[0] == 0
    code = main(["eval", str(tmp_path / "cd"), "--data", f"g={GENERAL_TEXT}", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "contrastive-decoding composition" in err and "Traceback" not in err, err
    assert not (tmp_path / "e").exists()


def test_recipe_with_three_sources(members, gsm8k_small, tmp_path, capsys):
    recipe = tmp_path / "sum.yaml"
    recipe.write_text(
        f"workdir: out\nsurgery:\n  method: logit-sum\n  source: [{members['llama']}, {members['qwen2']}, "
        f"{members['padded']}]\n  args: {{weights: [1, 1, 0.5]}}\n"
        f"train:\n  data: [{{path: {gsm8k_small}, template: 'Q: {{question}} A: {{answer}}'}}]\n"
        "  seq_len: 32\n  batch_size: 2\n  max_steps: 3\n  warmup_steps: 0\n  val_every: 0\n")
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    cfg = json.loads((tmp_path / "out" / "train" / "model" / "config.json").read_text())
    assert cfg["model_type"] == "lmexpand_logits" and cfg["weights"] == [1.0, 1.0, 0.5]
    one = tmp_path / "one.yaml"
    one.write_text(f"surgery:\n  method: logit-sum\n  source: [{members['llama']}]\n")
    assert main(["run", str(one)]) == 2
    assert "logit-sum takes at least 2 models; got 1" in capsys.readouterr().err


# -- generate ------------------------------------------------------------------------------------------
def test_generate_streams_any_model(members, tiny_pro, tmp_path, capsys):
    assert surgery(capsys, "contrastive", members["llama"], members["padded"], tmp_path / "cd")[0] == 0
    for model in (members["llama"], tiny_pro, tmp_path / "cd"):
        code = main(["generate", str(model), "--prompt", "The cell", "--max-new-tokens", "5", "--ignore-eos"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert out.strip() and "5 new tokens" in err and "tokens/s" in err
    code = main(["generate", str(tmp_path / "cd"), "--prompt", "The cell", "--prompt", "Energy is", "--json",
                 "--max-new-tokens", "4", "--sample", "--top-p", "0.9", "--ignore-eos"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert len(res["texts"]) == 2 and res["tokens"] == 8


@pytest.mark.parametrize("args, needle", [
    (["--prompt", "x", "--chat"], "no chat template"),
    (["--prompt", "x", "--top-p", "1.5", "--sample"], "--top-p 1.5"),
    (["--prompt", "x", "--temperature", "0.5"], "add --sample"),
    (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--prompt", "x", "--max-new-tokens", "300"], "exceeds the model's 256 positions"),
    (["--prompt", " "], "--prompt is empty"),
    ([], "give a prompt"),
])
def test_generate_bad_inputs(members, capsys, args, needle):
    code = main(["generate", str(members["llama"]), *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err


# -- bad inputs: exit 2, one paragraph, nothing written ---------------------------------------------------
def test_bad_compositions(members, tmp_path, capsys):
    a, b, c = members["llama"], members["qwen2"], members["padded"]
    other_tok = tmp_path / "other-tokenizer"  # the same tokens, two of them with swapped ids
    shutil.copytree(a, other_tok)
    tok = json.loads((other_tok / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    x, y = list(vocab)[10:12]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    (other_tok / "tokenizer.json").write_text(json.dumps(tok))
    beyond = build_tiny_model("llama", tmp_path / "beyond", vocab_size=384)  # its own 384-token tokenizer
    small = tmp_path / "small-vocab"  # 320 tokenizer ids but only 300 rows
    build_tiny_model("llama", small, vocab_size=300)
    for f in TOKENIZER_FILES:
        if (a / f).is_file():
            shutil.copy(a / f, small / f)
    capsys.readouterr()  # the models' own save messages
    cases = [
        (["logit-sum", a, tmp_path / "o"], "needs at least 2 models"),
        (["logit-sum", a, other_tok, tmp_path / "o"], "different tokenizers"),
        (["logit-sum", a, beyond, tmp_path / "o"], "differ beyond padding"),
        (["proxy-tune", a, b, small, tmp_path / "o"], "no embedding row"),
        (["logit-sum", a, b, tmp_path / "o", "--weights", "1,2,3"], "3 weights for 2 models"),
        (["proxy-tune", a, b, c, tmp_path / "o", "--alpha", "-1"], "--alpha"),
        (["contrastive", a, c, tmp_path / "o", "--beta", "-0.5"], "--beta"),
        (["contrastive", a, c, tmp_path / "o", "--alpha", "0"], "--alpha"),
        (["contrastive", a, c, tmp_path / "o", "--alpha", "1.5"], "--alpha"),
        (["contrastive", a, tmp_path / "missing", tmp_path / "o"], "missing"),
        (["proxy-tune", a, b, tmp_path / "o"], "missing argument OUT"),
    ]
    for args, needle in cases:
        code, err = surgery(capsys, *args)
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
        lines = [x for x in err.strip().splitlines() if x and not x.startswith(("Usage:", "Try "))]
        assert len(lines) == 1, err  # one paragraph (click's usage errors add the usage lines)
        assert not (tmp_path / "o").exists(), args


def test_missing_or_changed_member_is_refused(members, tmp_path, capsys):
    b = tmp_path / "b"
    shutil.copytree(members["qwen2"], b)
    assert surgery(capsys, "logit-sum", members["llama"], b, tmp_path / "sum")[0] == 0
    build_tiny_model("qwen2", tmp_path / "other", seed=9, hidden_size=96, intermediate_size=160, num_hidden_layers=3)
    shutil.copy(tmp_path / "other" / "model.safetensors", b / "model.safetensors")
    data = f"g={GENERAL_TEXT}"
    for cmd in (["eval", str(tmp_path / "sum"), "--data", data, "--out", str(tmp_path / "e")],
                ["generate", str(tmp_path / "sum"), "--prompt", "x"],
                ["export", str(tmp_path / "sum"), str(tmp_path / "x")]):
        code = main(cmd)
        err = capsys.readouterr().err
        assert code == 2 and "changed since the surgery" in err, (cmd, err)
    shutil.rmtree(b)
    code = main(["generate", str(tmp_path / "sum"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "is gone" in err, err
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()


def test_nothing_to_train_in_proxy_composition(members, gsm8k_small, tmp_path, capsys):
    assert surgery(capsys, "proxy-tune", members["llama"], members["qwen2"], members["padded"], tmp_path / "p")[0] == 0
    code = main(["train", "--model", str(tmp_path / "p"), "--data", str(gsm8k_small), "--template",
                 "Q: {question} A: {answer}", "--seq-len", "32", "--max-steps", "2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "nothing to train" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
