"""Exports and surgery outputs read the same by transformers 4.57 and 5.x, and llama.cpp's
converter turns the dense exports of every family and Mixtral-style copies into GGUF files that
hold the same tensors.

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
def smol_outputs(gguf_root, smollm2) -> dict[str, Path]:
    """Tiny MoE copies of a tiny Llama with SmolLM2's real tokenizer: the converter recognizes
    a tokenizer by the hash of its pre-tokenization, which a tiny test BPE does not have."""
    root = gguf_root
    base = _gguf_base(root, "llama", {"rope_parameters": ROPE}, smollm2, None)
    out = {}
    for name, args in {"moe-mixtral": ["moe", "--experts", "4", "--top-k", "2"],
                       "moe-fine": ["moe", "--segments", "4", "--shared", "1", "--replicas", "2"]}.items():
        assert main(["-q", "surgery", args[0], str(base), str(root / name), *args[1:]]) == 0
        out[name] = root / name
    return out


def _convert_many(jobs: list[tuple[Path, Path]], work: Path) -> list[dict]:
    """llama.cpp's convert_hf_to_gguf.py (f32) on each (model dir, GGUF path), all in one
    process of its venv (tests/peers/convert_many.py: one interpreter and one import of the
    converter instead of one per model); per job its exit code and stderr, as the command's."""
    import os

    (work / "jobs.json").write_text(json.dumps([[str(m), str(g), "f32"] for m, g in jobs]))
    r = subprocess.run([str(T4), str(ROOT / "tests" / "peers" / "convert_many.py"), str(work / "jobs.json"),
                        str(work / "results.json")], capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "PYTHONPATH": str(LC / "gguf-py")})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    assert len(results) == len(jobs)
    return results


@pytest.fixture
def gguf_parsed_once(monkeypatch):
    """transformers' GGUF loader parses the whole file (a 49,152-token vocabulary and its
    merges: seconds each time) for the config, again for the weights, again for the
    tokenizer, and this test once more for its own checks: here each file is parsed once and
    the reader (which only reads) shared, keyed by the file's path, size and mtime."""
    import os

    import gguf

    parse, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        st = os.stat(path)
        key = (os.path.realpath(path), mode, st.st_size, st.st_mtime_ns)
        if key not in readers:
            readers[key] = parse(path, mode)
        return readers[key]

    monkeypatch.setattr(gguf, "GGUFReader", reader)


ROPE = {"rope_type": "default", "rope_theta": THETA}
PRO = ["llama-pro", "--add", "2"]
# One row per family (adding a family adds a row): the tiny model's config overrides, the
# surgery, and how the GGUF comes back.
#   ("logits", KEYS): transformers' GGUF reader builds the architecture; KEYS are the config
#     facts the GGUF does not bring back to it (no GGUF key, or one the reader ignores). With
#     none, its own model must give our logits; with some, they must differ in its config, and
#     the GGUF's tensors under its config with just those keys restored must give our logits.
#   ("tensors", PERMUTED): transformers cannot read the architecture: every tensor, found with
#     gguf-py's own name map, must equal ours (q/k rows permuted as llama.cpp's LlamaModel
#     does where PERMUTED), with no tensor missing or added.
# Gemma-2 and Phi-3's converters read a SentencePiece tokenizer.model (Gemma2Model.set_vocab,
# Phi3MiniModel.set_vocab): those rows get one trained here (512 pieces); the others get
# SmolLM2's BPE, which the converter recognizes by its hash.
GGUF_ROWS = [
    pytest.param("llama", PRO, {"rope_parameters": ROPE}, ("logits", ()), id="llama-pro"),
    pytest.param("llama", ["upscale", "--slices", "0-3,1-4"], {"rope_parameters": ROPE}, ("logits", ()),
                 id="llama-upscale"),
    # real Gemma 2 has no attention biases (the converter writes them, no key says so); its
    # converter writes no RoPE theta (llama.cpp's default 10,000 is Gemma 2's): the family's
    # defaults stand for both (Gemma-3's per-layer-type thetas are written)
    pytest.param("gemma2", PRO, {"attention_bias": False}, ("logits", ("query_pre_attn_scalar", "layer_types")),
                 id="gemma2"),
    pytest.param("gemma3_text", PRO, {},
                 ("logits", ("query_pre_attn_scalar", "layer_types", "final_logit_softcapping")), id="gemma3_text"),
    pytest.param("phi3", PRO, {"rope_parameters": ROPE}, ("logits", ()), id="phi3"),
    # the GGUF holds starcoder2.rope.freq_base; transformers' reader does not read it
    pytest.param("starcoder2", PRO, {"rope_parameters": ROPE}, ("logits", ("rope_parameters",)), id="starcoder2"),
    pytest.param("olmo2", PRO, {"rope_parameters": ROPE}, ("tensors", False), id="olmo2"),
    pytest.param("olmo3", PRO, {}, ("tensors", False), id="olmo3"),
    pytest.param("granite", PRO, {"rope_parameters": ROPE}, ("tensors", True), id="granite"),
    pytest.param("smollm3", PRO, {"rope_parameters": ROPE}, ("tensors", True), id="smollm3"),
]
SENTENCEPIECE = {"gemma2", "phi3"}
# GGUF keys (after "ARCH.") that must hold the config value of the same fact, where written
GGUF_SCALARS = {"block_count": "num_hidden_layers", "attention.scale": "attention_multiplier",
                "embedding_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
                "logit_scale": "logits_scaling", "final_logit_softcapping": "final_logit_softcapping",
                "attention.sliding_window": "sliding_window"}


@pytest.fixture(scope="module")
def gguf_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-families")


def _gguf_base(root: Path, family: str, overrides: dict, smollm2: Path, spm: Path | None) -> Path:
    import shutil

    base = root / f"{family}-base"
    if (base / "config.json").is_file():
        return base
    if spm is not None:
        build_tiny_model(family, base, vocab_size=512, **overrides)
        for f in [*base.glob("tokenizer*"), base / "special_tokens_map.json"]:
            f.unlink(missing_ok=True)
        shutil.copy(spm, base / "tokenizer.model")
    else:
        build_tiny_model(family, base, vocab_size=49152, pad_token_id=2, **overrides)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2 / f, base / f)
    return base


@pytest.fixture(scope="module")
def sentencepiece_model(gguf_root) -> Path:
    """A 512-piece SentencePiece BPE trained on the shipped OpenStax sample (the converter's
    venv has sentencepiece; the project's does not need it)."""
    prefix = gguf_root / "spm"
    code = ("import sys, sentencepiece as s; s.SentencePieceTrainer.train(input=sys.argv[1], model_prefix=sys.argv[2], "
            "vocab_size=512, model_type='bpe', byte_fallback=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3, "
            "character_coverage=1.0, num_threads=1, minloglevel=2)")
    r = subprocess.run([str(T4), "-c", code, str(ROOT / "recipes" / "data" / "openstax-sample" / "valid.txt"),
                        str(prefix)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return prefix.with_suffix(".model")


def _llama_permute(w, n: int):
    """llama.cpp's LlamaModel.permute (conversion/llama.py) over n heads: q/k rows reordered
    for its RoPE."""
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


ROW_TEST = "test_llama_cpp_converts_exports_of_every_family"
MOE_TEST = "test_llama_cpp_converter_on_moe_outputs"


@pytest.fixture(scope="module")
def conversions(request, gguf_root, smollm2) -> dict[str, tuple[Path, Path, dict] | BaseException]:
    """Every GGUF row this session runs (and the MoE outputs, when their test runs): the
    surgery output exported, then all of them through the converter in one process. Per row
    id (or MoE output name): (export dir, GGUF path, the converter's rc and stderr), or the
    exception its surgery or export raised (re-raised by its own test)."""
    mine = [item for item in request.session.items
            if getattr(item, "module", None) is not None and item.module.__name__ == __name__]
    rows = {p.id: p.values for p in GGUF_ROWS}
    wanted = [item.callspec.id for item in mine if item.originalname == ROW_TEST]
    out: dict = {}
    jobs: dict[str, tuple[Path, Path]] = {}
    for rid in wanted:
        family, surgery, overrides, _ = rows[rid]
        row = gguf_root / rid
        try:
            spm = request.getfixturevalue("sentencepiece_model") if family in SENTENCEPIECE else None
            base = _gguf_base(gguf_root, family, overrides, smollm2, spm)
            assert main(["-q", "surgery", surgery[0], str(base), str(row / "surgery"), *surgery[1:]]) == 0
            assert main(["-q", "export", str(row / "surgery"), str(row / "export")]) == 0
        except Exception as e:  # noqa: BLE001 - the row's own test fails with it
            out[rid] = e
            continue
        jobs[rid] = (row / "export", row / "model.gguf")
    if any(item.originalname == MOE_TEST for item in mine):
        smol = request.getfixturevalue("smol_outputs")
        for name in ("moe-mixtral", "moe-fine"):
            jobs[name] = (smol[name], gguf_root / f"{name}.gguf")
    if jobs:
        results = _convert_many(list(jobs.values()), gguf_root)
        out.update({k: (*jobs[k], r) for k, r in zip(jobs, results)})
    return out


@NEEDS_CONVERTER
@pytest.mark.parametrize("family,surgery,overrides,back", GGUF_ROWS)
def test_llama_cpp_converts_exports_of_every_family(family, surgery, overrides, back, conversions, gguf_parsed_once,
                                                    request):
    """A surgery output of each family, exported, through llama.cpp's convert_hf_to_gguf.py
    (f32): read back by transformers' GGUF loader with the same logits to the last bit where it
    reads the architecture, else the same tensors by gguf-py's reader."""
    import copy

    import torch
    from gguf import GGUFReader  # the project's own dependency (the embedded model is a GGUF)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    built = conversions[request.node.callspec.id]
    if isinstance(built, BaseException):
        raise built
    export, gguf, r = built
    row = gguf.parent
    assert r["rc"] == 0, r["stderr"][-3000:]
    ours = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    cfg = ours.config

    reader = GGUFReader(gguf)
    arch = reader.fields["general.architecture"].contents()
    for key, attr in GGUF_SCALARS.items():
        if f"{arch}.{key}" in reader.fields:
            got, want = reader.fields[f"{arch}.{key}"].contents(), getattr(cfg, attr)
            want = 0 if want is None else want  # Phi-3's converter writes a window of 0 for none
            assert torch.tensor(got, dtype=torch.float32) == torch.tensor(want, dtype=torch.float32), (key, got, want)
    if f"{arch}.attention.sliding_window_pattern" in reader.fields:
        assert reader.fields[f"{arch}.attention.sliding_window_pattern"].contents() == \
            [t == "sliding_attention" for t in cfg.layer_types]

    kind, detail = back
    if kind == "tensors":
        import gguf as gg
        from safetensors.torch import load_file

        names = gg.get_tensor_name_map(next(a for a, n in gg.MODEL_ARCH_NAMES.items() if n == arch),
                                       cfg.num_hidden_layers)
        theirs = {t.name: t for t in reader.tensors}
        mapped = set()
        for name, tensor in load_file(export / "model.safetensors").items():
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
            assert gname in theirs, (name, gname)
            mapped.add(gname)
            if detail and ".q_proj." in name:
                tensor = _llama_permute(tensor, cfg.num_attention_heads)
            elif detail and ".k_proj." in name:
                tensor = _llama_permute(tensor, cfg.num_key_value_heads)
            got = torch.from_numpy(theirs[gname].data.copy())
            assert got.shape == tensor.shape and torch.equal(got, tensor), (name, gname)
        assert mapped == set(theirs), sorted(set(theirs) ^ mapped)
        print(f"{request.node.callspec.id}: GGUF ({arch}) holds all {len(mapped)} tensors bitwise; "
              f"transformers does not read {arch} GGUF files")
        return

    back_model = AutoModelForCausalLM.from_pretrained(row, gguf_file=gguf.name, dtype=torch.float32).eval()
    assert back_model.config.num_hidden_layers == cfg.num_hidden_layers
    lost = [k for k in detail if getattr(back_model.config, k) != getattr(cfg, k)]
    assert lost == list(detail), f"the GGUF now brings back {set(detail) - set(lost)}: update the row and docs"
    if detail:  # the same GGUF tensors, under the reader's config with those facts restored
        restored = copy.deepcopy(back_model.config)
        del restored.quantization_config
        for k in detail:
            setattr(restored, k, getattr(cfg, k))
        back_model = AutoModelForCausalLM.from_pretrained(row, gguf_file=gguf.name, config=restored,
                                                          dtype=torch.float32).eval()
    ids = (torch.arange(40) * 1237 + 11).remainder(cfg.vocab_size).unsqueeze(0)
    with torch.no_grad():
        delta = (ours(ids).logits - back_model(ids).logits).abs().max().item()
    print(f"{request.node.callspec.id}: GGUF ({arch}) round trip max |d| {delta:.2e}"
          + (f" with {', '.join(detail)} restored" if detail else ""))
    assert delta == 0.0, delta
    if family == "llama":
        text = TEXT + " <|im_start|>user\nhi<|im_end|>"
        assert AutoTokenizer.from_pretrained(export)(text)["input_ids"] == \
            AutoTokenizer.from_pretrained(row, gguf_file=gguf.name)(text)["input_ids"]


@NEEDS_CONVERTER
def test_llama_cpp_converter_on_moe_outputs(smol_outputs, conversions):
    """Mixtral-style copies convert (llama.cpp's stacked expert tensors, checked with its own
    gguf-py reader against the export); the fine-grained (Glm4-MoE) export does not: the
    converter asks the tokenizer for GLM's own [gMASK] token (docs/moe.md says what to do)."""
    import torch
    from safetensors.torch import load_file

    _, gguf, r = conversions["moe-mixtral"]
    assert r["rc"] == 0, r["stderr"][-3000:]
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

    _, _, r = conversions["moe-fine"]
    assert r["rc"] != 0 and "[gMASK]" in r["stderr"], r["stderr"][-2000:]
