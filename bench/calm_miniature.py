"""CALM's key-value composition experiment (arXiv 2401.02412, sec. 4.1) in miniature, on CPU.

    .venv/bin/python bench/calm_miniature.py [--bridge-steps 1000] [--out bench/.cache/calm-mini]

1. A shared character vocabulary (pad, <s>, newline, space, + = ;, digits, a-z).
2. 200 random 3-letter keys, each with a digit value; 100 keys for bridge training, 100
   held out.
3. The augmenting model (Llama, width 96, 4 layers) memorizes the table: lines ``abc7``.
4. The anchor (Llama, width 128, 4 layers) learns arithmetic only: right-aligned sums
   ``  3+  5=8`` (it never sees a key).
5. ``lmexpand surgery calm`` joins them with bridges at anchor layers 0..3 reading the
   augmenting model's last layer; ``lmexpand train`` trains only the bridges on
   ``abc+def=<v1+v2>`` for training keys, mixed 1:1 with the anchor's own sums (so the
   bridges learn to stay out of the way when there is no key), with the loss on the
   answers only (``--loss-from =``: the random key letters are context, not targets),
   one example per row (``--no-pack``).
6. Exact match of greedy answers on 1,000 sums of two *held-out* keys: anchor alone vs
   composed vs a control composed with an untrained augmenting model (same bridge
   training). Also: the anchor's own arithmetic before and after composition.

Steps 3-4 are plain PyTorch (pretraining the toy models is not lmexpand's job); steps
5-6 use lmexpand's surgery, trainer and composed model. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHARS = ["<pad>", "<s>", "\n", " ", "+", "=", ";"] + list("0123456789") + list("abcdefghijklmnopqrstuvwxyz")


def save_char_tokenizer(path: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="\n")
    fast.save_pretrained(path)


def llama(width: int, layers: int, heads: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(CHARS), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=128, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True))


def encode(text: str) -> list[int]:
    return [CHARS.index(c) for c in text]


def pretrain(model, lines: list[str], steps: int, seq: int = 64, batch: int = 64, lr: float = 3e-3, seed: int = 0):
    """Plain next-token training on packed lines (newline-separated)."""
    import torch

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        rows = []
        for _ in range(batch):
            ids: list[int] = []
            while len(ids) < seq + 1:
                ids += encode(rng.choice(lines) + "\n")
            rows.append(ids[:seq + 1])
        x = torch.tensor(rows)
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


def exact_match(model, prompts: list[str], answers: list[str], batch: int = 200) -> float:
    """Greedy answers after each prompt (which ends with '='), up to the newline."""
    import torch

    hits = 0
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            ctx = [encode("\n" + p) for p in chunk]  # a newline before, as in packed training text
            width = max(map(len, ctx))
            ids = torch.tensor([[0] * (width - len(c)) + c for c in ctx])
            mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(c) for c in ctx])[:, None]).long()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                 pad_token_id=0, eos_token_id=2)
            for row, ans in zip(out[:, width:].tolist(), answers[i:i + batch]):
                text = "".join(CHARS[t] for t in row).split("\n")[0]
                hits += text == ans
    return hits / len(prompts)


def sums(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append((f"{a:>3}+{b:>3}=", str(a + b)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / ".cache" / "calm-mini"))
    ap.add_argument("--bridge-steps", type=int, default=1000)
    ap.add_argument("--aug-steps", type=int, default=500)
    ap.add_argument("--anchor-steps", type=int, default=600)
    args = ap.parse_args()
    run(Path(args.out), args.aug_steps, args.anchor_steps, args.bridge_steps)


def run(out: Path, aug_steps: int, anchor_steps: int, bridge_steps: int, control: bool = True) -> list[tuple]:
    """The whole experiment; returns rows (label, held-out EM, training-key EM, arithmetic EM)."""
    import torch

    torch.set_num_threads(2)
    args = argparse.Namespace(aug_steps=aug_steps, anchor_steps=anchor_steps, bridge_steps=bridge_steps)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    keys: list[str] = []
    while len(keys) < 200:
        k = "".join(rng.choice(letters) for _ in range(3))
        if k not in keys:
            keys.append(k)
    value = {k: rng.randrange(10) for k in keys}
    train_keys, held_keys = keys[:100], keys[100:]
    t0 = time.perf_counter()

    torch.manual_seed(0)
    aug = llama(96, 4)
    aug_loss = pretrain(aug, [f"{k}{value[k]}" for k in keys], args.aug_steps, seed=1)
    aug_acc = _memorized(aug, keys, value)
    torch.manual_seed(1)
    anchor = llama(128, 4)
    anchor_loss = pretrain(anchor, [p + a for p, a in sums(random.Random(2), 5000)], args.anchor_steps, seed=3)
    arith = sums(random.Random(99), 500)
    anchor_arith = exact_match(anchor, [p for p, _ in arith], [a for _, a in arith])
    for name, model in (("augment", aug), ("anchor", anchor)):
        model.save_pretrained(out / name)
        save_char_tokenizer(out / name)
    untrained = llama(96, 4)  # control: same shape, never trained
    untrained.save_pretrained(out / "augment-untrained")
    save_char_tokenizer(out / "augment-untrained")
    print(f"pretraining: augmenting model loss {aug_loss:.3f}, memorized {aug_acc:.1%} of values; "
          f"anchor loss {anchor_loss:.3f}, arithmetic EM {anchor_arith:.1%} ({time.perf_counter() - t0:.0f} s)")

    # bridge training data: key sums on training keys, mixed 1:1 with plain sums
    drng = random.Random(4)
    with open(out / "bridges.jsonl", "w") as f:
        for i in range(20000):
            if i % 2:
                a, b = drng.choice(train_keys), drng.choice(train_keys)
                text = f"{a}+{b}={value[a] + value[b]}"
            else:
                p, ans = sums(drng, 1)[0]
                text = p + ans
            # a newline first, as every line the two models were pretrained on (packed) and the eval prompts
            f.write(json.dumps({"text": "\n" + text}) + "\n")
    erng = random.Random(5)
    held = [(erng.choice(held_keys), erng.choice(held_keys)) for _ in range(1000)]
    seen = [(erng.choice(train_keys), erng.choice(train_keys)) for _ in range(1000)]
    held_p, held_a = [f"{a}+{b}=" for a, b in held], [str(value[a] + value[b]) for a, b in held]
    seen_p, seen_a = [f"{a}+{b}=" for a, b in seen], [str(value[a] + value[b]) for a, b in seen]

    from lmexpand.cli import main as cli
    from lmexpand.compose.loading import load_model

    rows = [("anchor alone", exact_match(anchor, held_p, held_a), exact_match(anchor, seen_p, seen_a), anchor_arith)]
    runs = [("composed (CALM)", out / "augment")]
    if control:
        runs.append(("control: untrained augmenting model", out / "augment-untrained"))
    for label, aug_dir in runs:
        calm_dir, run = out / f"calm-{aug_dir.name}", out / f"run-{aug_dir.name}"
        assert cli(["-q", "surgery", "calm", str(out / "anchor"), str(aug_dir), str(calm_dir),
                    "--pairs", "0:3,1:3,2:3,3:3", "--heads", "4"]) == 0
        t1 = time.perf_counter()
        assert cli(["-q", "train", "--model", str(calm_dir), "--data", str(out / "bridges.jsonl"), "--seq-len", "16",
                    "--no-pack", "--batch-size", "128", "--max-steps", str(args.bridge_steps), "--lr", "1e-3", "--warmup-steps", str(min(100, args.bridge_steps // 10)),
                    "--loss-from", "=", "--val-every", "0", "--log-every", "100", "--no-tensorboard",
                    "--out", str(run)]) == 0
        model = load_model(run / "model").eval()
        rows.append((label, exact_match(model, held_p, held_a), exact_match(model, seen_p, seen_a),
                     exact_match(model, [p for p, _ in arith], [a for _, a in arith])))
        print(f"{label}: bridges trained in {time.perf_counter() - t1:.0f} s")
    print("\n| model | held-out keys EM | training keys EM | anchor's arithmetic EM |\n|---|---|---|---|")
    for label, h, s, a in rows:
        print(f"| {label} | {h:.1%} | {s:.1%} | {a:.1%} |")
    (out / "results.json").write_text(json.dumps({"rows": rows, "augment_memorized": aug_acc,
                                                  "bridge_steps": args.bridge_steps}, indent=2))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return rows


def _memorized(model, keys: list[str], value: dict[str, int]) -> float:
    import torch

    with torch.no_grad():
        ids = torch.tensor([encode("\n" + k) for k in keys])
        pred = model(input_ids=ids).logits[:, -1].argmax(-1).tolist()
    return sum(CHARS[p] == str(value[k]) for p, k in zip(pred, keys)) / len(keys)


if __name__ == "__main__":
    main()
