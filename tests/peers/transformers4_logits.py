"""Run in bench/.peers/transformers4 (transformers 4.57): load each model directory with the
stock Auto classes, write its logits on fixed ids and the ids of a fixed text.

    python transformers4_logits.py OUT_DIR MODEL_DIR...
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

assert transformers.__version__.startswith("4."), transformers.__version__
TEXT = "Question: Natalia sold clips to 48 of her friends.\nAnswer: 48 / 2 = 24"
out = Path(sys.argv[1])
for i, model_dir in enumerate(sys.argv[2:]):
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.arange(3, 3 + 24).remainder(model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits
    torch.save(logits, out / f"{i}.pt")
    (out / f"{i}.json").write_text(json.dumps({"ids": tok(TEXT)["input_ids"], "class": type(model).__name__,
                                               "tokenizer": type(tok).__name__,
                                               "rope_theta": getattr(model.config, "rope_theta", None)}))
