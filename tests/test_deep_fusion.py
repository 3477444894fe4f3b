"""Deep-fusion experts: exact at init with and without spans on every family, span state
across generation, training only the experts (no-marker inputs still exact), export, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmexpand.checkpoint import CheckpointReader
from lmexpand.cli import main
from lmexpand.compose.deep_fusion_modeling import span_types
from lmexpand.compose.loading import load_model
from tests.fresh_process import max_delta_without_lmexpand
from tests.test_llama_pro import padded_batch
from tests.tiny import build_tiny_model

OPEN, CLOSE = 10, 11  # "(" and ")" in the tiny tokenizer


def surgery(capsys, *args) -> tuple[int, str]:
    code = main(["surgery", "deep-fusion", *[str(a) for a in args]])
    return code, capsys.readouterr().err


def with_spans(vocab: int = 320, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded batch with markers: row 0 opens and closes a span, row 1 opens one that
    stays open, row 2 (mostly padding) has none."""
    ids, mask = padded_batch(vocab, seed)
    ids[(ids == OPEN) | (ids == CLOSE)] = 12
    ids[0, 3], ids[0, 9] = OPEN, CLOSE
    ids[1, 8] = OPEN
    return ids, mask


def no_markers(vocab: int = 320) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = padded_batch(vocab, 1)
    ids[(ids == OPEN) | (ids == CLOSE)] = 12
    return ids, mask


def greedy(model, ids, mask, use_cache=True, n=10):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=None, use_cache=use_cache)


def test_span_types_toggle_and_open_close():
    ids = torch.tensor([[5, 10, 6, 7, 11, 8, 10, 9]])
    inside, after = span_types(ids, [10], [11])
    assert inside.tolist() == [[False, False, True, True, False, False, False, True]] and after.tolist() == [True]
    inside, after = span_types(ids, [10], None)  # toggle: each "(" flips, ")" is ordinary text
    assert inside.tolist() == [[False, False, True, True, True, True, False, False]] and after.tolist() == [False]
    # carried state: the same sequence cut in two gives the same types
    a, state = span_types(ids[:, :3], [10], [11])
    b, _ = span_types(ids[:, 3:], [10], [11], state)
    assert torch.cat([a, b], 1).tolist() == span_types(ids, [10], [11])[0].tolist()


@pytest.mark.parametrize("family", ["qwen2"])  # (q/k/v biases; every family: tests/test_families.py)
def test_exact_at_init_with_biases(family, tmp_path, capsys):
    src = build_tiny_model(family, tmp_path / family)
    code, err = surgery(capsys, src, tmp_path / "df", "--open", "(", "--close", ")")
    assert code == 0, err
    model, base = load_model(tmp_path / "df").eval(), AutoModelForCausalLM.from_pretrained(src).eval()
    for ids, mask in (with_spans(), no_markers()):
        with torch.no_grad():
            d = (model(input_ids=ids, attention_mask=mask).logits - base(input_ids=ids, attention_mask=mask).logits)
        assert d.abs().max().item() == 0.0
        assert torch.equal(greedy(model, ids, mask), greedy(base, ids, mask))
    names = {t.name for t in CheckpointReader(tmp_path / "df", need_family=False)}
    assert "experts.0.self_attn.q_proj.weight" in names and "experts.3.mlp.down_proj.weight" in names
    if family == "qwen2":
        assert "experts.0.self_attn.q_proj.bias" in names


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gsm8k_small):
    """A tiny Llama with experts in layers 1 and 3 (attn + mlp), trained on GSM8K text whose
    parentheses are the spans."""
    root = tmp_path_factory.mktemp("df")
    src = build_tiny_model("llama", root / "src")
    reader = CheckpointReader(src)
    before = {t.name: reader.get_tensor(t.name).clone() for t in reader}
    assert main(["surgery", "deep-fusion", str(src), str(root / "df"), "--open", "(", "--close", ")",
                 "--layers", "1,3"]) == 0
    run = root / "run"
    assert main(["train", "--model", str(root / "df"), "--data", str(gsm8k_small), "--template",
                 "Question: {question}\nAnswer: ({answer})", "--seq-len", "48", "--batch-size", "4", "--max-steps",
                 "10", "--warmup-steps", "0", "--lr", "3e-3", "--out", str(run), "--val-every", "10"]) == 0
    return src, root / "df", run, before


def test_training_changes_only_experts_and_fence_free_text_stays_exact(trained):
    src, df, run, source_before = trained
    rec = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rec if "val_loss" in r]
    assert val[-1] < val[0]
    before, after = CheckpointReader(df, need_family=False), CheckpointReader(run / "model", need_family=False)
    assert sorted(t.name for t in before) == sorted(t.name for t in after)
    for t in before:
        assert not torch.equal(before.get_tensor(t.name), after.get_tensor(t.name)), t.name
    model = load_model(run / "model").eval()
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    reader = CheckpointReader(src)
    for name, value in source_before.items():  # every original tensor bitwise unchanged by training
        assert torch.equal(reader.get_tensor(name), value), name
    ids, mask = no_markers()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits)
        ids, mask = with_spans()
        d = model(input_ids=ids, attention_mask=mask).logits - base(input_ids=ids, attention_mask=mask).logits
    # before the first span token of each row nothing differs; inside a span it does
    assert d[0, :4].abs().max().item() == 0.0 and d[0, 4:9].abs().max().item() > 0


def test_span_state_across_generation_steps(trained):
    """A span opened in the prompt and closed in the generated text: cached generation
    switches weights at the right token (logits equal a forward over the whole sequence)."""
    _, _, run, _ = trained
    model = load_model(run / "model").eval()
    ids = torch.tensor([[5, 40, 41, OPEN, 50, 51]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True,
                             logits_processor=[_ForceCloseAt(3)])
        seq = out.sequences
        assert seq[0, ids.shape[1] + 2].item() == CLOSE  # the span closed in the generated text
        full = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, ids.shape[1] - 1:-1]
    steps = torch.stack([x[0] for x in out.logits])  # raw logits per step (before the processor)
    inside = span_types(seq, [OPEN], [CLOSE])[0][0, ids.shape[1]:]
    assert inside[:2].all() and not inside[2:].any()  # two expert tokens, the close marker, then text again
    assert (steps - full).abs().max().item() < 1e-5
    g1 = greedy(model, ids, mask)
    assert torch.equal(g1, greedy(model, ids, mask, use_cache=False))


class _ForceCloseAt:
    """A logits processor that forces the close marker as the k-th generated token (1-based)."""

    def __init__(self, k: int):
        self.k, self.seen = k, 0

    def __call__(self, input_ids, scores):
        self.seen += 1
        if self.seen == self.k:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, CLOSE] = 0.0
        return scores


def test_export_loads_without_lmexpand(trained, tmp_path, capsys):
    _, _, run, _ = trained
    model = load_model(run / "model").eval()
    ids, mask = with_spans()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    assert main(["export", str(run), str(tmp_path / "x")]) == 0, capsys.readouterr().err
    assert max_delta_without_lmexpand(tmp_path / "x", ids, mask, expected, tmp_path, generate=False) == 0.0


def test_bad_inputs(tiny_llama, tmp_path, capsys):
    assert main(["surgery", "logit-sum", str(tiny_llama), str(tiny_llama), str(tmp_path / "sum")]) == 0
    capsys.readouterr()
    cases = [
        (["--open", "```"], "not a single token"),
        (["--open", "(", "--parts", "ffn"], "--parts"),
        (["--open", "(", "--layers", "7"], "layer 7 is out of range"),
        (["--open", "(", "--layers", "every:9"], "N must be 1..4"),
        (["--open", "(", "--close", "("], "share token ids"),
        ([], "--open"),
    ]
    for args, needle in cases:
        code, err = surgery(capsys, tiny_llama, tmp_path / "o", *args)
        assert code == 2 and needle in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "o").exists()
    code, err = surgery(capsys, tmp_path / "sum", tmp_path / "o", "--open", "(")
    assert code == 2 and "composed" in err and not (tmp_path / "o").exists(), err
