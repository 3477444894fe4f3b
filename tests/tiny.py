"""Tiny random models of every supported family, for fast exact tests.

Norm weights and biases are randomized (not left at 1/0) so that identity tricks cannot
pass by accident.
"""

from __future__ import annotations

from pathlib import Path

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

TINY_FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=16)),
    # sliding windows shorter than the test sequences, so sliding and global layers differ
    "gemma2": ("Gemma2Config", dict(tie_word_embeddings=True, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                    attention_bias=True)),
    "gemma3_text": ("Gemma3TextConfig", dict(tie_word_embeddings=False, head_dim=16, query_pre_attn_scalar=16,
                                             sliding_window=8, final_logit_softcapping=20.0,
                                             layer_types=["sliding_attention", "full_attention"] * 2)),
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False)),
    "olmo2": ("Olmo2Config", dict(tie_word_embeddings=False, attention_bias=True)),
    "olmo3": ("Olmo3Config", dict(tie_word_embeddings=True, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"] * 2)),
    "granite": ("GraniteConfig", dict(tie_word_embeddings=True, attention_bias=True, embedding_multiplier=12.0,
                                      residual_multiplier=0.22, attention_multiplier=0.25, logits_scaling=8.0)),
    "starcoder2": ("Starcoder2Config", dict(tie_word_embeddings=True)),
    "smollm3": ("SmolLM3Config", dict(tie_word_embeddings=False, no_rope_layers=[1, 1, 0, 1])),
}


def tiny_config(variant: str, **overrides):
    import transformers

    cls_name, extra = TINY_FAMILIES[variant]
    return getattr(transformers, cls_name)(**{**COMMON, **extra, **overrides})


def build_tiny_model(variant: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Build, randomize and save a tiny model (idempotent: reuses an existing dir)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(variant, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    save_tiny_tokenizer(path, model.config.vocab_size)
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(path))
    assert n <= model.config.vocab_size, f"tiny tokenizer of {n} tokens for vocab_size {model.config.vocab_size}"
    return path


def save_tiny_tokenizer(path: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer of ``vocab_size`` ids trained on a little real text, with
    <pad>=0, <s>=1, </s>=2 to match the tiny configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample = (Path(__file__).resolve().parents[1] / "recipes" / "data" / "openstax-sample" / "valid.txt").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([sample], trainer)
    # unk named explicitly: loaded in a Qwen2 directory, the tokenizer class would otherwise add
    # its own "<|endoftext|>" unk token, one id beyond the vocabulary
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>")
    fast.save_pretrained(path)
