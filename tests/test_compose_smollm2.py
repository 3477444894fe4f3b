"""The composed models on the embedded SmolLM2 (slow): exactness where the math promises it,
max |Δ| printed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmexpand.cli import main
from lmexpand.compose.loading import load_model

pytestmark = pytest.mark.slow


def batch(fence: int | None = None):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 49152, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    if fence is not None:
        ids[0, 5], ids[0, 20], ids[1, 15] = fence, fence, fence  # a closed span and one left open
    return ids, mask


def test_compositions_exact_on_smollm2(smollm2, tmp_path, capsys):
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids, mask = batch()
    with torch.no_grad():
        z = base(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert main(["surgery", "logit-sum", str(smollm2), str(smollm2), str(tmp_path / "sum"), "--weights", "1,0.5"]) == 0
    assert main(["surgery", "proxy-tune", str(smollm2), str(smollm2), str(smollm2), str(tmp_path / "p0"),
                 "--alpha", "0"]) == 0
    assert main(["surgery", "co-llm", str(smollm2), str(smollm2), str(tmp_path / "co"), "--threshold", "1"]) == 0
    assert main(["surgery", "deep-fusion", str(smollm2), str(tmp_path / "df"), "--open", "```"]) == 0
    capsys.readouterr()
    with torch.no_grad():
        d_sum = (load_model(tmp_path / "sum")(input_ids=ids, attention_mask=mask).logits - 1.5 * z)[valid].abs().max()
        d_p0 = (load_model(tmp_path / "p0")(input_ids=ids, attention_mask=mask).logits - z)[valid].abs().max()
        df = load_model(tmp_path / "df").eval()
        fence_ids, fence_mask = batch(df.config.open_ids[0])
        d_df = (df(input_ids=fence_ids, attention_mask=fence_mask).logits
                - base(input_ids=fence_ids, attention_mask=fence_mask).logits)[fence_mask.bool()].abs().max()
        co = load_model(tmp_path / "co").eval()
        g_co = co.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                           eos_token_id=None, temperature=None, top_p=None, top_k=None)
        g_base = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                               eos_token_id=None, temperature=None, top_p=None, top_k=None)
    print(f"SmolLM2: logit sum (1, 0.5) vs 1.5 z max |d| = {d_sum.item():.3g}; proxy alpha=0 vs base "
          f"{d_p0.item()}; deep fusion at init with spans {d_df.item()}")
    assert d_sum.item() <= 1e-4  # 1.5·z vs z + 0.5·z: fp32 rounding of logits up to ~30
    assert d_p0.item() == 0.0 and d_df.item() == 0.0
    assert torch.equal(g_co, g_base)  # Co-LLM at threshold 1 is the base
