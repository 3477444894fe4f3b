"""No non-finite value is written or reported silently (issue 33, part 1).

One model with a NaN in one tensor goes through every command that writes or reports
values: each refuses it with exit 2, naming the tensor (or the model), and writes nothing.
The byte-level scan every check uses is compared with torch on random tensors of every
floating dtype.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lmexpand.checkpoint.finite import EXPONENT_MASKS, FiniteCheck, count_non_finite
from lmexpand.cli import main
from tests.tiny import build_tiny_model

BAD_TENSOR = "model.layers.1.mlp.down_proj.weight"  # a tensor every surgery copies as raw bytes

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn}


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(sorted(EXPONENT_MASKS)), n=st.integers(0, 300),
       specials=st.lists(st.tuples(st.integers(0, 299), st.sampled_from([float("nan"), float("inf"), -float("inf"),
                                                                         0.0, 1e30, -65504.0])), max_size=8),
       piece=st.integers(1, 64))
def test_byte_scan_counts_what_torch_counts(dtype, n, specials, piece):
    x = torch.randn(n, dtype=torch.float64) * 100
    for i, v in specials:
        if i < n:
            x[i] = v
    t = x.to(_DTYPES[dtype])
    want = int((~torch.isfinite(t.to(torch.float64))).sum())
    raw = memoryview(t.view(torch.uint8).numpy()) if n else memoryview(b"")
    assert count_non_finite(raw, dtype) == want
    fed = FiniteCheck(dtype)  # pieces that end inside an element
    for i in range(0, len(raw), piece):
        fed.feed(raw[i:i + piece])
    assert fed.bad == want


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nonfinite")
    good = build_tiny_model("llama", root / "good")
    bad = root / "bad"
    shutil.copytree(good, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors[BAD_TENSOR][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return {"good": good, "bad": bad}


def _merge_yaml(tmp: Path, method: str, a: Path, b: Path) -> Path:
    cfg = {
        "passthrough": {"merge_method": "passthrough", "dtype": "float32",
                        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 4]}]}]},
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                              {"model": str(b), "parameters": {"weight": 0.5}}]},
        "slerp": {"merge_method": "slerp", "dtype": "float32", "base_model": str(b),
                  "models": [{"model": str(a)}, {"model": str(b)}], "parameters": {"t": 0.5}},
        "task_arithmetic": {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": str(b),
                            "models": [{"model": str(a), "parameters": {"weight": 1.0}}]},
    }[method]
    path = tmp / f"{method}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _writers(models: dict[str, Path], tmp: Path) -> dict[str, list[str]]:
    """Every command that writes values, each fed the model with a NaN (out: tmp/out)."""
    bad, good, out = str(models["bad"]), str(models["good"]), str(tmp / "out")
    return {
        "llama-pro": ["surgery", "llama-pro", bad, out, "--add", "1"],
        "upscale": ["surgery", "upscale", bad, out, "--drop", "1"],
        "moe": ["surgery", "moe", bad, out, "--experts", "2", "--top-k", "1"],
        "calm-augment": ["surgery", "calm", good, bad, out, "--every", "2"],
        "logit-sum": ["surgery", "logit-sum", good, bad, out],
        "proxy-tune": ["surgery", "proxy-tune", good, bad, good, out],
        "contrastive": ["surgery", "contrastive", bad, good, out],
        "co-llm": ["surgery", "co-llm", good, bad, out],
        "deep-fusion": ["surgery", "deep-fusion", bad, out, "--open", "(", "--close", ")"],
        "merge-passthrough": ["merge", str(_merge_yaml(tmp, "passthrough", models["bad"], models["good"])), out],
        "merge-linear": ["merge", str(_merge_yaml(tmp, "linear", models["bad"], models["good"])), out],
        "merge-slerp": ["merge", str(_merge_yaml(tmp, "slerp", models["bad"], models["good"])), out],
        "merge-task-arithmetic": ["merge", str(_merge_yaml(tmp, "task_arithmetic", models["bad"], models["good"])),
                                  out],
        "export": ["export", bad, out],
    }


@pytest.mark.parametrize("case", ["llama-pro", "upscale", "moe", "calm-augment", "logit-sum", "proxy-tune",
                                  "contrastive", "co-llm", "deep-fusion", "merge-passthrough", "merge-linear",
                                  "merge-slerp", "merge-task-arithmetic", "export"])
def test_every_writer_refuses_a_nan_and_writes_nothing(models, tmp_path, capsys, case):
    argv = _writers(models, tmp_path)[case]
    before = {k: _digest(p) for k, p in models.items()}
    listing = sorted(p.name for p in tmp_path.iterdir())
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "NaN/Inf" in err and "Traceback" not in err
    assert BAD_TENSOR in err or str(models["bad"]) in err, err  # the tensor, or the member model
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no output, no partial dir
    assert {k: _digest(p) for k, p in models.items()} == before


def test_eval_and_generate_refuse_non_finite_logits(models, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("The cat sat on the mat. " * 40)
    code = main(["eval", str(models["bad"]), "--data", f"prose={data}", "--out", str(tmp_path / "ev"),
                 "--seq-len", "32", "--no-samples"])
    err = capsys.readouterr().err
    assert code == 2 and "not a number" in err and str(models["bad"]) in err and "prose" in err, err
    assert not (tmp_path / "ev" / "results.json").exists()
    code = main(["generate", str(models["bad"]), "--prompt", "The cat", "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "NaN/Inf" in err and "Traceback" not in err, err


def test_composition_weights_are_bounded(models, tmp_path, capsys):
    good, out = str(models["good"]), str(tmp_path / "out")
    for argv in (["proxy-tune", good, good, good, out, "--alpha", "1e36"],
                 ["contrastive", good, good, out, "--beta", "1e30"],
                 ["logit-sum", good, good, out, "--weights", "1,-1e20"]):
        code = main(["surgery", *argv])
        err = capsys.readouterr().err
        assert code == 2 and ("1000" in err or "1e+03" in err), err
        assert not (tmp_path / "out").exists()


def test_verify_checks_every_tensor_lmexpand_wrote_by_default(models, tmp_path, capsys):
    out = tmp_path / "copy"
    assert main(["merge", str(_merge_yaml(tmp_path, "passthrough", models["good"], models["good"])), str(out)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    report = capsys.readouterr().out
    assert "every tensor lmexpand wrote" in report and " 0 tensors" not in report
    # a NaN planted afterwards in a copied (not new) tensor, hash updated: only the value is left to find
    tensors = load_file(out / "model.safetensors")
    tensors[BAD_TENSOR][0, 0] = float("nan")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    lineage = json.loads((out / "lmexpand.json").read_text())
    lineage["shards"]["model.safetensors"] = {"sha256": hashlib.sha256((out / "model.safetensors").read_bytes())
                                              .hexdigest(), "bytes": (out / "model.safetensors").stat().st_size}
    (out / "lmexpand.json").write_text(json.dumps(lineage))
    assert main(["verify", str(out)]) == 2
    assert BAD_TENSOR in capsys.readouterr().err
