"""Exports and surgery outputs read the same by transformers 4.57 and 5.x, and llama.cpp's
converter turns the dense and Mixtral-style ones into GGUF files that hold the same tensors.

transformers 4.57 runs in its own venv (bench/peers/install_transformers4.sh, as CI does);
the tests skip cleanly without it. llama.cpp's convert_hf_to_gguf.py comes from the
llama-cpp-python 0.3.36 source distribution (bench/peers/install_llama_cpp_convert.sh) and
runs in that venv, as its requirements pin. The models use RoPE theta 100,000 (SmolLM2's), which 4.x
would silently replace by its default 10,000 if the config carried only transformers 5's
``rope_parameters``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lmexpand.cli import main
from tests.test_train import TEMPLATE
from tests.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
T4 = ROOT / "bench" / ".peers" / "transformers4" / "bin" / "python"
NEEDS_T4 = pytest.mark.skipif(not T4.exists(), reason="transformers 4.57 not installed (bash bench/peers/install_transformers4.sh)")
TEXT = "Question: Natalia sold clips to 48 of her friends.\nAnswer: 48 / 2 = 24"
THETA = 100000.0


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, gsm8k_small) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clients")
    base = build_tiny_model("llama", root / "base", rope_parameters={"rope_type": "default", "rope_theta": THETA})
    out: dict[str, Path] = {}
    for name, args in {
        "llama-pro": ["llama-pro", "--add", "2"],
        "upscale": ["upscale", "--slices", "0-3,1-4"],
        "moe-mixtral": ["moe", "--experts", "4", "--top-k", "2"],
        "moe-fine": ["moe", "--segments", "4", "--shared", "1", "--replicas", "2"],
    }.items():
        assert main(["-q", "surgery", args[0], str(base), str(root / name), *args[1:]]) == 0
        out[name] = root / name
    run = root / "trained"
    assert main(["-q", "train", "--model", str(out["llama-pro"]), "--data", str(gsm8k_small), "--template", TEMPLATE,
                 "--out", str(run), "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--val-every", "0",
                 "--no-tensorboard"]) == 0
    out["trained"] = run / "model"
    assert main(["-q", "export", str(run / "model"), str(root / "exported")]) == 0
    out["exported"] = root / "exported"
    return out


def test_configs_carry_both_layouts(outputs):
    for name, path in outputs.items():
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == THETA, name
        tok = json.loads((path / "tokenizer_config.json").read_text())
        assert tok["tokenizer_class"] != "TokenizersBackend", name


@NEEDS_T4
def test_transformers4_reads_every_output_as_5_does(outputs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = list(outputs)
    r = subprocess.run([str(T4), str(ROOT / "tests" / "peers" / "transformers4_logits.py"), str(tmp_path),
                        *[str(outputs[n]) for n in names]], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for i, name in enumerate(names):
        model = AutoModelForCausalLM.from_pretrained(outputs[name], dtype=torch.float32).eval()
        ids = torch.arange(3, 3 + 24).remainder(model.config.vocab_size).unsqueeze(0)
        with torch.no_grad():
            ours = model(ids).logits
        theirs = torch.load(tmp_path / f"{i}.pt")
        info = json.loads((tmp_path / f"{i}.json").read_text())
        assert info["rope_theta"] == THETA, (name, info)
        assert info["class"] == type(model).__name__, (name, info)
        delta = (ours - theirs).abs().max().item()
        print(f"{name}: {info['class']} max |d| {delta:.2e}")
        assert delta <= 1e-5, (name, delta)
        assert AutoTokenizer.from_pretrained(outputs[name])(TEXT)["input_ids"] == info["ids"], name


def test_legacy_keys_are_the_same_settings():
    """What transformers 5 builds from a config is unchanged by the legacy keys added beside
    ``rope_parameters`` (scaled RoPE included); files that need nothing keep their bytes."""
    from transformers import LlamaConfig

    from lmexpand.checkpoint.compat import for_every_client

    for rope in ({"rope_type": "default", "rope_theta": THETA},
                 {"rope_type": "linear", "factor": 4.0, "rope_theta": THETA},
                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_theta": 500000.0}):
        cfg = {"model_type": "llama", "rope_parameters": rope, "max_position_embeddings": 65536}
        raw = json.dumps(cfg).encode()
        both = json.loads(for_every_client("config.json", raw))
        assert both["rope_theta"] == rope["rope_theta"]
        if rope["rope_type"] != "default":  # 4.x's layout: scaling without theta
            assert both["rope_scaling"]["rope_type"] == rope["rope_type"] and "rope_theta" not in both["rope_scaling"]
        # (from_dict edits the dict it is given: compare before)
        assert LlamaConfig.from_dict(both).rope_parameters == LlamaConfig.from_dict(json.loads(raw)).rope_parameters
    plain = b'{"model_type": "llama", "rope_theta": 10000.0}'
    assert for_every_client("config.json", plain) is plain
    tok = json.loads(for_every_client("tokenizer_config.json", b'{"tokenizer_class": "TokenizersBackend"}'))
    assert tok["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert for_every_client("tokenizer_config.json", b'{"tokenizer_class": "LlamaTokenizer"}') == \
        b'{"tokenizer_class": "LlamaTokenizer"}'


# -- llama.cpp's converter -------------------------------------------------------------------
LC = ROOT / "bench" / ".peers" / "llama-cpp"
NEEDS_CONVERTER = pytest.mark.skipif(
    not (T4.exists() and (LC / "convert_hf_to_gguf.py").exists()),
    reason="llama.cpp's converter not installed (bash bench/peers/install_llama_cpp_convert.sh)")


@pytest.fixture(scope="module")
def smol_outputs(tmp_path_factory, smollm2) -> dict[str, Path]:
    """Tiny models with SmolLM2's real tokenizer: the converter recognizes a tokenizer by the
    hash of its pre-tokenization, which a tiny test BPE does not have."""
    import shutil

    root = tmp_path_factory.mktemp("gguf")
    base = build_tiny_model("llama", root / "base", vocab_size=49152, pad_token_id=2,
                            rope_parameters={"rope_type": "default", "rope_theta": THETA})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / f, base / f)
    out = {}
    for name, args in {"llama-pro": ["llama-pro", "--add", "2"], "upscale": ["upscale", "--slices", "0-3,1-4"],
                       "moe-mixtral": ["moe", "--experts", "4", "--top-k", "2"],
                       "moe-fine": ["moe", "--segments", "4", "--shared", "1", "--replicas", "2"]}.items():
        assert main(["-q", "surgery", args[0], str(base), str(root / name), *args[1:]]) == 0
        out[name] = root / name
    return out


def _convert(model: Path, gguf: Path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([str(T4), str(LC / "convert_hf_to_gguf.py"), str(model), "--outfile", str(gguf),
                           "--outtype", "f32"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(LC / "gguf-py")})


@NEEDS_CONVERTER
def test_llama_cpp_converts_dense_outputs_exactly(smol_outputs, tmp_path):
    """LLaMA-Pro and SOLAR outputs through llama.cpp's convert_hf_to_gguf.py (f32), read back
    by transformers' GGUF loader: the same logits to the last bit, the same token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("llama-pro", "upscale"):
        gguf = tmp_path / f"{name}.gguf"
        r = _convert(smol_outputs[name], gguf)
        assert r.returncode == 0, r.stderr[-3000:]
        ours = AutoModelForCausalLM.from_pretrained(smol_outputs[name], dtype=torch.float32).eval()
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
        assert back.config.num_hidden_layers == ours.config.num_hidden_layers, name
        ids = (torch.arange(40) * 1237 + 11).remainder(49152).unsqueeze(0)
        with torch.no_grad():
            delta = (ours(ids).logits - back(ids).logits).abs().max().item()
        print(f"{name}: GGUF round trip max |d| {delta:.2e}")
        assert delta == 0.0, (name, delta)
        text = TEXT + " <|im_start|>user\nhi<|im_end|>"
        assert AutoTokenizer.from_pretrained(smol_outputs[name])(text)["input_ids"] == \
            AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)(text)["input_ids"], name


@NEEDS_CONVERTER
def test_llama_cpp_converter_on_moe_outputs(smol_outputs, tmp_path):
    """Mixtral-style copies convert (llama.cpp's stacked expert tensors, checked with its own
    gguf-py reader against the export); the fine-grained (Glm4-MoE) export does not: the
    converter asks the tokenizer for GLM's own [gMASK] token (docs/moe.md says what to do)."""
    import torch
    from safetensors.torch import load_file

    gguf = tmp_path / "mixtral.gguf"
    r = _convert(smol_outputs["moe-mixtral"], gguf)
    assert r.returncode == 0, r.stderr[-3000:]
    from gguf import GGUFReader  # the project's own dependency (the embedded model is a GGUF)

    tensors = {t.name: t for t in GGUFReader(gguf).tensors}
    ours = load_file(smol_outputs["moe-mixtral"] / "model.safetensors")
    for ours_name, theirs in (("w2", "ffn_down_exps"), ("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps")):
        got = torch.from_numpy(tensors[f"blk.0.{theirs}.weight"].data.copy())
        expected = torch.stack([ours[f"model.layers.0.block_sparse_moe.experts.{e}.{ours_name}.weight"]
                                for e in range(4)])
        assert torch.equal(got.reshape(expected.shape), expected), theirs
    assert torch.equal(torch.from_numpy(tensors["blk.0.ffn_gate_inp.weight"].data.copy()).reshape(4, -1),
                       ours["model.layers.0.block_sparse_moe.gate.weight"])

    r = _convert(smol_outputs["moe-fine"], tmp_path / "fine.gguf")
    assert r.returncode != 0 and "[gMASK]" in r.stderr, r.stderr[-2000:]
