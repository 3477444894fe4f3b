"""Co-LLM: the marginal-likelihood loss by hand, the gate's gradients, exact thresholds,
caches and batches, training only the gate, export, and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmexpand.checkpoint import CheckpointReader
from lmexpand.cli import main
from lmexpand.compose.loading import load_model
from tests.fresh_process import max_delta_without_lmexpand
from tests.test_llama_pro import padded_batch
from tests.tiny import build_tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama base (width 64) and a wider, shallower Qwen2 assistant (96, 3 layers), one tokenizer."""
    root = tmp_path_factory.mktemp("co-llm")
    base = build_tiny_model("llama", root / "base")
    asst = build_tiny_model("qwen2", root / "assistant", seed=3, hidden_size=96, intermediate_size=160,
                            num_hidden_layers=3)
    return base, asst


def co_llm(capsys, *args) -> tuple[int, str]:
    code = main(["surgery", "co-llm", *[str(a) for a in args]])
    return code, capsys.readouterr().err


def with_random_gate(path: Path, std: float = 0.5):
    model = load_model(path).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.gate.weight, std=std)
    return model


def greedy(model, ids, mask, use_cache=True, n=10):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=None, use_cache=use_cache)


def test_loss_is_the_marginal_by_hand_and_gradients_reach_the_gate(pair, tmp_path, capsys):
    assert co_llm(capsys, *pair, tmp_path / "co")[0] == 0
    model = with_random_gate(tmp_path / "co")
    ids, mask = padded_batch(320)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    base = AutoModelForCausalLM.from_pretrained(pair[0], dtype=torch.float32).eval()
    asst = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32).eval()
    with torch.no_grad():
        lp_b = torch.log_softmax(base(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
        lp_a = torch.log_softmax(asst(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
        h = base.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        g = torch.sigmoid(h @ model.gate.weight[0])
    total, n = 0.0, 0
    for b in range(ids.shape[0]):  # the marginal, token by token, in float64
        for t in range(ids.shape[1] - 1):
            y = int(labels[b, t])
            if y == -100:
                continue
            p = (1 - g[b, t].double()) * lp_b[b, t, y].double().exp() + g[b, t].double() * lp_a[b, t, y].double().exp()
            total -= float(torch.log(p))
            n += 1
    for p in model.base.parameters():  # the paper's setting: the base trains too
        p.requires_grad_(True)
    loss = model.lmexpand_loss(ids, mask, labels)
    print(f"Co-LLM loss {loss.item():.6f} vs by hand {total / n:.6f}")
    assert abs(loss.item() - total / n) < 1e-5
    loss.backward()
    assert model.gate.weight.grad is not None and model.gate.weight.grad.abs().sum() > 0
    assert model.base.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.assistant.parameters())
    with torch.no_grad():  # forward's logits are the marginal's log-probabilities
        logp = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, 16), atol=1e-5)
    got = -(logp[:, :-1].gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)).sum() / n
    assert abs(got.item() - total / n) < 1e-5


def test_thresholds_caches_and_batches(pair, tmp_path, capsys):
    """threshold 1 generates the base's greedy output exactly, 0 the assistant's; cached
    equals uncached; a left-padded batch equals its rows one by one."""
    assert co_llm(capsys, *pair, tmp_path / "co")[0] == 0
    model = with_random_gate(tmp_path / "co")
    ids, mask = padded_batch(320)
    base = AutoModelForCausalLM.from_pretrained(pair[0], dtype=torch.float32).eval()
    asst = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32).eval()
    model.threshold = 1.0
    assert torch.equal(greedy(model, ids, mask), greedy(base, ids, mask))
    assert not torch.stack(model.deferrals).any()
    model.threshold = 0.0
    assert torch.equal(greedy(model, ids, mask), greedy(asst, ids, mask))
    assert torch.stack(model.deferrals).all()
    model.threshold = 0.5
    batched = greedy(model, ids, mask)
    rate = torch.stack(model.deferrals).float().mean().item()
    print(f"threshold 0.5 with a random gate: {rate:.0%} of tokens deferred")
    assert 0.1 < rate < 0.9  # both models take part, the assistant's cache lags and catches up
    assert torch.equal(batched, greedy(model, ids, mask, use_cache=False))
    for row in range(ids.shape[0]):
        keep = mask[row].bool()
        alone = greedy(model, ids[row:row + 1, keep], mask[row:row + 1, keep])
        assert torch.equal(alone[0, -10:], batched[row, -10:]), row


def test_training_changes_only_the_gate_and_export_loads_without_lmexpand(pair, gsm8k_small, tmp_path, capsys):
    before = {p: {t.name: CheckpointReader(p).get_tensor(t.name).clone() for t in CheckpointReader(p)} for p in pair}
    assert co_llm(capsys, *pair, tmp_path / "co")[0] == 0
    run = tmp_path / "run"
    code = main(["train", "--model", str(tmp_path / "co"), "--data", str(gsm8k_small), "--template",
                 "Question: {question}\nAnswer: {answer}", "--loss-from", "Answer:", "--seq-len", "64",
                 "--batch-size", "4", "--max-steps", "12", "--warmup-steps", "0", "--lr", "3e-2", "--out", str(run),
                 "--val-every", "12"])
    assert code == 0, capsys.readouterr().err
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rec if "val_loss" in r]
    assert val[-1] < val[0]
    for p, tensors in before.items():  # base and assistant bitwise unchanged
        reader = CheckpointReader(p)
        for name, value in tensors.items():
            assert torch.equal(reader.get_tensor(name), value), (p, name)
    gate = CheckpointReader(run / "model", need_family=False).get_tensor("gate.weight")
    assert gate.shape == (1, 64) and gate.abs().sum() > 0
    trained = load_model(run / "model").eval()
    ids, mask = padded_batch(320)
    with torch.no_grad():
        expected = trained(input_ids=ids, attention_mask=mask).logits
    assert main(["export", str(run), str(tmp_path / "x")]) == 0, capsys.readouterr().err
    assert max_delta_without_lmexpand(tmp_path / "x", ids, mask, expected, tmp_path) == 0.0


def test_generate_threshold_and_deferrals(pair, tmp_path, capsys):
    assert co_llm(capsys, *pair, tmp_path / "co")[0] == 0
    for threshold, marks in (("1", False), ("0", True)):
        code = main(["generate", str(tmp_path / "co"), "--prompt", "The cell", "--max-new-tokens", "4", "--ignore-eos",
                     "--threshold", threshold, "--show-deferrals"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert ("«" in out) == marks, out
        assert f"deferred {4 if marks else 0} of 4 tokens" in err, err
    code = main(["generate", str(pair[0]), "--prompt", "x", "--threshold", "0.5"])
    assert code == 2 and "only for Co-LLM" in capsys.readouterr().err


def test_bad_inputs(pair, tmp_path, capsys):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(pair[1], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    x, y = list(vocab)[10:12]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    capsys.readouterr()
    for args, needle in [((pair[0], other), "different tokenizers"), ((pair[0], tmp_path / "missing"), "missing"),
                         ((*pair, "--threshold", "1.5"), "--threshold"), ((*pair, "--threshold", "-0.1"), "--threshold")]:
        code, err = co_llm(capsys, *args[:2], tmp_path / "o", *args[2:])
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "o").exists()
    # a changed member is refused by fingerprint
    asst = tmp_path / "asst"
    shutil.copytree(pair[1], asst)
    assert co_llm(capsys, pair[0], asst, tmp_path / "co")[0] == 0
    build_tiny_model("qwen2", tmp_path / "q", seed=9, hidden_size=96, intermediate_size=160, num_hidden_layers=3)
    shutil.copy(tmp_path / "q" / "model.safetensors", asst / "model.safetensors")
    code = main(["generate", str(tmp_path / "co"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "changed since the surgery" in err, err


def test_gate_and_base_training_embeds_the_trained_base(pair, gsm8k_small, tmp_path, capsys):
    """--trainable gate+base (the paper's setting): the trained base goes into the output
    directory (its path cleared), the assistant stays referenced and bitwise unchanged."""
    before = {t.name: CheckpointReader(pair[1]).get_tensor(t.name).clone() for t in CheckpointReader(pair[1])}
    assert co_llm(capsys, *pair, tmp_path / "co")[0] == 0
    run = tmp_path / "run"
    code = main(["train", "--model", str(tmp_path / "co"), "--trainable", "gate+base", "--data", str(gsm8k_small),
                 "--template", "Question: {question}\nAnswer: {answer}", "--seq-len", "48", "--batch-size", "4",
                 "--max-steps", "6", "--warmup-steps", "0", "--lr", "3e-3", "--out", str(run), "--val-every", "6"])
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg["base_path"] is None and cfg["assistant_path"] == str(pair[1].resolve())
    names = {t.name for t in CheckpointReader(run / "model", need_family=False)}
    assert "gate.weight" in names and "base.model.layers.0.mlp.up_proj.weight" in names
    assert not any(n.startswith("assistant.") for n in names)
    reader = CheckpointReader(pair[1])
    assert all(torch.equal(reader.get_tensor(n), v) for n, v in before.items())
    trained = load_model(run / "model").eval()
    base = CheckpointReader(pair[0]).get_tensor("model.layers.0.mlp.up_proj.weight")
    assert not torch.equal(trained.base.model.layers[0].mlp.up_proj.weight, base)  # the base trained
    ids, mask = padded_batch(320)
    with torch.no_grad():
        assert torch.isfinite(trained(input_ids=ids, attention_mask=mask).logits).all()
    assert main(["export", str(run), str(tmp_path / "x")]) == 0, capsys.readouterr().err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "x", trust_remote_code=True).eval()
    with torch.no_grad():
        want = trained(input_ids=ids, attention_mask=mask).logits
        assert (exported(input_ids=ids, attention_mask=mask).logits - want)[mask.bool()].abs().max().item() == 0.0
    code = main(["train", "--model", str(tmp_path / "co"), "--trainable", "all", "--data", str(gsm8k_small),
                 "--template", "Q: {question} A: {answer}", "--seq-len", "32", "--max-steps", "1",
                 "--out", str(tmp_path / "run2")])
    err = capsys.readouterr().err
    assert code == 2 and "assistant." in err and "base.*" in err, err  # the assistant never trains


def test_weak_supervision_gate_init(pair, gsm8k_small, tmp_path, capsys):
    """--co-llm-init-steps: the gate alone learns the pseudo-labels first (weighted BCE
    goes down), then the marginal training runs; on another model the option is refused."""
    assert co_llm(capsys, *pair, tmp_path / "co")[0] == 0
    run = tmp_path / "run"
    code = main(["train", "--model", str(tmp_path / "co"), "--co-llm-init-steps", "8", "--data", str(gsm8k_small),
                 "--template", "Question: {question}\nAnswer: {answer}", "--seq-len", "48", "--batch-size", "4",
                 "--max-steps", "2", "--warmup-steps", "0", "--lr", "1e-2", "--out", str(run), "--val-every", "0"])
    assert code == 0, capsys.readouterr().err
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    bce = [r["gate_init_bce"] for r in rec if "gate_init_bce" in r]
    assert len(bce) == 8 and bce[-1] < bce[0] and 0 < rec[0]["gate_init_positive"] < 1
    assert [r["step"] for r in rec if "loss" in r] == [1, 2]
    code = main(["train", "--model", str(pair[0]), "--trainable", "all", "--co-llm-init-steps", "2", "--data",
                 str(gsm8k_small), "--template", "Q: {question} A: {answer}", "--max-steps", "1",
                 "--out", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert code == 2 and "initialises a Co-LLM gate" in err and not (tmp_path / "r2").exists()


def test_eval_reports_thresholds_and_deferral_by_class(pair, tmp_path, capsys):
    from tests.conftest import GSM8K_TEST

    assert co_llm(capsys, *pair, tmp_path / "co")[0] == 0
    model = with_random_gate(tmp_path / "co")
    from safetensors.torch import save_file

    save_file({"gate.weight": model.gate.weight.detach().contiguous()}, tmp_path / "co" / "model.safetensors")
    code = main(["eval", str(tmp_path / "co"), "--data", f"gsm8k={GSM8K_TEST}", "--template",
                 "Question: {question}\nAnswer: {answer}", "--max-tokens", "512", "--seq-len", "64", "--no-samples",
                 "--out", str(tmp_path / "e")])
    assert code == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    t = res["co_llm"]["gsm8k"]
    rates = [r["deferral_rate"] for r in t["thresholds"]]
    assert rates[0] == 0.0 and all(abs(r - x / 10) < 0.02 for r, x in zip(rates, range(10)))
    assert t["thresholds"][0]["switch_ppl"] == pytest.approx(t["base_ppl"], rel=1e-6)
    assert abs(res["perplexity"]["model"]["gsm8k"]["ppl"] - t["marginal_ppl"]) / t["marginal_ppl"] < 1e-3
    assert {"digits", "words"} <= set(t["by_class"]["best"])
    # the first set's chosen threshold is its best: the same split by class, and the classes'
    # rates weighted by their token counts give the overall rate
    assert t["at_chosen"]["by_class"] == t["by_class"]["best"]
    cls = t["at_chosen"]["by_class"]
    assert sum(v["tokens"] for v in cls.values()) == t["tokens"]
    assert sum(v["tokens"] * v["deferral_rate"] for v in cls.values()) / t["tokens"] == \
        pytest.approx(t["at_chosen"]["deferral_rate"], abs=1e-9)
    report = (tmp_path / "e" / "report.md").read_text()
    assert "Co-LLM: deferral and thresholds" in report and (tmp_path / "e" / "co_llm.png").is_file()


def test_eval_thresholds_hold_when_the_gate_saturates(pair, tmp_path, capsys):
    """A confident gate gives σ(s) == 1.0 exactly in float32 on most tokens (the miniature's
    gate-only row did: every quantile of σ(s) was 1.0 and every "target rate" deferred 0 %).
    Thresholds are taken on the logit s, so the rates still step by 10 %."""
    from safetensors.torch import save_file

    from lmexpand.eval.co_llm import gate_and_target_log_probs
    from tests.conftest import GSM8K_TEST

    assert co_llm(capsys, *pair, tmp_path / "co")[0] == 0
    model = with_random_gate(tmp_path / "co", std=200.0)
    save_file({"gate.weight": model.gate.weight.detach().contiguous()}, tmp_path / "co" / "model.safetensors")
    ids = list(range(3, 300))
    s = gate_and_target_log_probs(model, ids, 64)[0]
    saturated = ((torch.sigmoid(s.float()) == 1) | (torch.sigmoid(s.float()) == 0)).float().mean().item()
    print(f"saturated gate values: {100 * saturated:.0f} %")
    assert saturated > 0.5
    code = main(["eval", str(tmp_path / "co"), "--data", f"gsm8k={GSM8K_TEST}", "--template",
                 "Question: {question}\nAnswer: {answer}", "--max-tokens", "512", "--seq-len", "64", "--no-samples",
                 "--out", str(tmp_path / "e")])
    assert code == 0, capsys.readouterr().err
    t = json.loads((tmp_path / "e" / "results.json").read_text())["co_llm"]["gsm8k"]
    rates = [r["deferral_rate"] for r in t["thresholds"]]
    assert all(abs(r - x / 10) < 0.02 for r, x in zip(rates, range(10))), rates
    # the chosen threshold decides as the model's own hard switch does: s > logit(threshold)
    c = t["at_chosen"]
    assert c["threshold_logit"] is None or c["threshold"] == pytest.approx(torch.sigmoid(
        torch.tensor(c["threshold_logit"], dtype=torch.float64)).item(), rel=1e-12)
