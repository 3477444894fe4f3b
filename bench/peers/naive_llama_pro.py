"""Baseline (b): LLaMA-Pro the naive way, as the official block_expansion.py and
LLaMA-Factory's scripts/llama_pro.py do it: load the whole model with transformers, insert
zero-initialized copies, save_pretrained.

    python bench/peers/naive_llama_pro.py SOURCE OUT 3,7,11,...
"""

import copy
import sys

import torch
from transformers import AutoModelForCausalLM

src, out, positions = sys.argv[1], sys.argv[2], [int(p) for p in sys.argv[3].split(",")]
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
layers = list(model.model.layers)
new_layers = []
for i, layer in enumerate(layers):
    new_layers.append(layer)
    if i in positions:
        block = copy.deepcopy(layer)
        torch.nn.init.zeros_(block.self_attn.o_proj.weight)
        torch.nn.init.zeros_(block.mlp.down_proj.weight)
        new_layers.append(block)
for idx, layer in enumerate(new_layers):
    layer.self_attn.layer_idx = idx
model.model.layers = torch.nn.ModuleList(new_layers)
model.config.num_hidden_layers = len(new_layers)
model.save_pretrained(out, max_shard_size="5GB")
