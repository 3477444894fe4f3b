"""Loading an exported composed model where lmexpand cannot help: a fresh Python process that
never imports it, only transformers with trust_remote_code=True."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

_SCRIPT = """
import torch, sys
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({export!r}, trust_remote_code=True).eval()
assert 'lmexpand' not in sys.modules and type(m).__module__.startswith('transformers_modules'), type(m).__module__
io = torch.load({io!r})
with torch.no_grad():
    out = m(input_ids=io['ids'], attention_mask=io['mask']).logits
    if io['generate']:
        m.generate(input_ids=io['ids'], attention_mask=io['mask'], max_new_tokens=4, do_sample=False, pad_token_id=0)
print((out - io['expected'])[io['mask'].bool()].abs().max().item())
"""


def max_delta_without_lmexpand(export: Path, ids: torch.Tensor, mask: torch.Tensor, expected: torch.Tensor,
                               work: Path, generate: bool = True) -> float:
    """max |logits - expected| over unpadded positions, computed by the exported directory
    in a fresh process (also generating a few tokens when ``generate``)."""
    io = work / "io.pt"
    torch.save({"ids": ids, "mask": mask, "expected": expected, "generate": generate}, io)
    res = subprocess.run([sys.executable, "-c", _SCRIPT.format(export=str(export), io=str(io))], capture_output=True,
                         text=True, cwd=work, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(work)})
    assert res.returncode == 0, res.stderr[-2000:]
    return float(res.stdout.strip().splitlines()[-1])
