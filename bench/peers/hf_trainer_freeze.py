"""Baseline (c): the transformers Trainer, with requires_grad=False on every weight the
surgery did not add (what a user of HF tools would write).

    python bench/peers/hf_trainer_freeze.py MODEL_DIR DATA.jsonl OUT STEPS BATCH [SEQ]

SEQ defaults to 512. On a CUDA machine it trains there with the Trainer's bf16 mixed
precision (autocast over fp32 weights); elsewhere fp32 on CPU. bench/train.py and
bench/gpu.py both run it.

Writes OUT/metrics.jsonl with elapsed_s per step, like lmexpand's.
"""

import json
import sys
import time
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments,
                          default_data_collator)

model_dir, data, out, steps, batch = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
seq = int(sys.argv[6]) if len(sys.argv) > 6 else 512
cuda = torch.cuda.is_available()
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
new = set(json.loads((Path(model_dir) / "lmexpand.json").read_text())["new_parameters"])
for name, p in model.named_parameters():
    p.requires_grad_(name in new)

ids: list[int] = []
need = steps * batch * seq + seq
for line in open(data):
    r = json.loads(line)
    ids += tok(f"Question: {r['question']}\nAnswer: {r['answer']}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(ids) > need:
        break
blocks = [ids[i:i + seq] for i in range(0, len(ids) - seq, seq)]
dataset = [{"input_ids": torch.tensor(b), "labels": torch.tensor(b)} for b in blocks]

out.mkdir(parents=True, exist_ok=True)
metrics = open(out / "metrics.jsonl", "w")


class Timer(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if cuda:
            torch.cuda.synchronize()
        metrics.write(json.dumps({"step": state.global_step, "loss": 0.0, "elapsed_s": time.perf_counter() - self.t0}) + "\n")
        metrics.flush()


args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=batch, max_steps=steps,
                         learning_rate=1e-4, warmup_steps=1, lr_scheduler_type="cosine", logging_steps=1,
                         save_strategy="no", eval_strategy="no", report_to=[], use_cpu=not cuda, bf16=cuda,
                         dataloader_num_workers=0,
                         optim="adamw_torch", max_grad_norm=1.0, seed=0)
Trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
        callbacks=[Timer()]).train()
