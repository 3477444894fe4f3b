"""The fused chunked lm_head + cross-entropy equals the plain computation."""

import pytest
import torch

from lmexpand.train.loss import IGNORE_INDEX, fused_linear_cross_entropy, reference_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("weight_trains", [False, True])
# plain; Granite's 1 / logits_scaling; Gemma's final soft-capping (tight, so tanh saturates); both
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.125, None), (1.0, 2.0), (0.5, 3.0)])
def test_matches_reference_loss_and_gradients(chunk, weight_trains, scale, softcap):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g).requires_grad_(weight_trains)
    y = torch.randint(0, 40, (50,), generator=g)
    y[[3, 17, 49]] = IGNORE_INDEX
    fused = fused_linear_cross_entropy(h, w, y, chunk, scale, softcap)
    (fused * 2.5).backward()  # a non-unit upstream gradient
    gh, gw = h.grad.clone(), (w.grad.clone() if weight_trains else None)
    h.grad = None
    if weight_trains:
        w.grad = None
    ref = reference_cross_entropy(h, w, y, scale, softcap)
    (ref * 2.5).backward()
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-7)
    if weight_trains:
        torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-7)


def test_all_ignored_gives_zero_not_nan():
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8)
    y = torch.full((4,), IGNORE_INDEX)
    loss = fused_linear_cross_entropy(h, w, y, 2)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_lean_swiglu_matches_autograd():
    from lmexpand.train.lean import SiluMul

    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (g, u))


def test_lean_mlps_keep_loss_and_gradients(tiny_llama):
    from transformers import AutoModelForCausalLM

    from lmexpand.train.lean import use_lean_mlps

    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for lean in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        if lean:
            assert use_lean_mlps(model) == model.config.num_hidden_layers
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])  # same forward values
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_loss_from_masks_the_prompt(tiny_llama):
    """--loss-from: prompt tokens are context (stored negative), never targets."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmexpand.train.data import _tokenize, split_targets
    from lmexpand.train.loss import CausalLMLoss

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    texts = ["Question: what is two and two? Answer: four", "no marker here at all"]
    rows = _tokenize(tok, texts, "Answer:")
    plain = tok(texts, add_special_tokens=False)["input_ids"]
    n_prompt = len(tok("Question: what is two and two? Answer:", add_special_tokens=False)["input_ids"])
    assert [-(t + 1) for t in plain[0][:n_prompt]] == rows[0][:n_prompt] and rows[0][n_prompt:] == plain[0][n_prompt:]
    assert rows[1] == plain[1]  # no marker: every token is a target
    block = torch.tensor([rows[0]])
    ids, targets = split_targets(block)
    assert torch.equal(ids, torch.tensor([plain[0]])) and targets.sum() == len(plain[0]) - n_prompt > 0
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    loss, _ = CausalLMLoss(model)(block)
    logits = model(input_ids=ids).logits[0, :-1]
    labels = ids[0, 1:].masked_fill(~targets[0, 1:], -100)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels, ignore_index=-100).item(), rel=1e-5)


def test_no_pack_blocks_pad_without_targets():
    import torch

    from lmexpand.train.data import _one_per_block, split_targets

    blocks = list(_one_per_block(iter([[5, 6, 7], list(range(10, 30))]), 8, eos=2, pad=0))
    assert blocks[0] == [5, 6, 7, 2, -1, -1, -1, -1] and blocks[1] == list(range(10, 18))
    ids, targets = split_targets(torch.tensor(blocks))
    assert ids[0].tolist() == [5, 6, 7, 2, 0, 0, 0, 0]
    assert targets[0].tolist() == [True] * 4 + [False] * 4 and bool(targets[1].all())
