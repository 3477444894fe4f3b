"""Every registered composed kind through the same checks (issue 32): what a kind declares in
``lmexpand/compose/kinds/`` is all the commands need.

The kinds come from the registry, never from a list here: a new kind is put through every
check below as soon as it is declared, and fails the first one until it has a tiny example
(:data:`EXAMPLES`: the surgery that makes it from tiny members). For each kind: the
declaration is consistent with its modeling file and its surgeries; a tiny example is
made by its surgery, verified, inspected, loaded by the one loader, evaluated (the deferral
table where the kind declares a deferral gate), generated from (``--threshold`` only where
it declares one), exported self-contained and read back in a fresh process that has only
transformers (``trust_remote_code=True``), with the same logits; and a member gone from disk
is refused by eval, generate and export with exit 2, a clear message and nothing written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmexpand.checkpoint import CheckpointReader
from lmexpand.cli import main
from lmexpand.compose.kinds import KINDS, composed_kind, member_references, read_config
from lmexpand.compose.loading import load_model, modeling_module
from tests.conftest import GENERAL_TEXT
from tests.fresh_process import max_delta_without_lmexpand
from tests.test_llama_pro import padded_batch
from tests.tiny import build_tiny_model

PKG = Path(__file__).resolve().parents[1] / "lmexpand"

# model_type -> the surgery arguments that make a tiny example of the kind from the members
# (a Llama of width 64 and 4 layers, a wider Llama of 96 and 3 layers: one tokenizer, where
# "(" and ")" are single tokens)
EXAMPLES = {
    "lmexpand_calm": lambda m, out: ["calm", m["llama"], m["wide"], out, "--pairs", "1:2,3:2"],
    "lmexpand_logits": lambda m, out: ["logit-sum", m["llama"], m["wide"], out],
    "lmexpand_co_llm": lambda m, out: ["co-llm", m["llama"], m["wide"], out],
    "lmexpand_deep_fusion": lambda m, out: ["deep-fusion", m["llama"], out, "--open", "(", "--close", ")"],
}

KIND_IDS = sorted(KINDS)


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {"llama": build_tiny_model("llama", root / "llama"),
            "wide": build_tiny_model("llama", root / "wide", seed=5, hidden_size=96, intermediate_size=192,
                                     num_hidden_layers=3)}


def make_example(model_type: str, members: dict[str, Path], out: Path, capsys) -> Path:
    assert model_type in EXAMPLES, (f"the composed kind {model_type} has no tiny example: add the surgery that makes "
                                    "one to EXAMPLES in tests/test_composed_kinds.py")
    code = main(["-q", "surgery", *(str(a) for a in EXAMPLES[model_type](members, out))])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    return out


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_registry_is_complete_and_every_kind_has_an_example():
    assert KINDS, "no composed kind is registered"
    assert sorted(EXAMPLES) == KIND_IDS, "EXAMPLES must name exactly the registered kinds"


def test_a_kind_is_one_declaration_file(tmp_path, monkeypatch):
    """The registry finds a declaration file by itself (no list to edit), refuses a model_type
    declared twice and a file that declares nothing."""
    import importlib
    import sys

    from lmexpand.compose.kinds import _discover

    calm = (PKG / "compose" / "kinds" / "calm.py").read_text()
    package = tmp_path / "fake_kinds"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mine.py").write_text(calm.replace('model_type="lmexpand_calm"', 'model_type="lmexpand_mine"'))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_kinds", raising=False)
    importlib.invalidate_caches()
    found = _discover([str(package)], "fake_kinds")
    assert list(found) == ["lmexpand_mine"] and found["lmexpand_mine"].model_class == "CalmForCausalLM"
    (package / "twice.py").write_text(calm.replace('model_type="lmexpand_calm"', 'model_type="lmexpand_mine"'))
    with pytest.raises(ValueError, match="declared twice"):
        _discover([str(package)], "fake_kinds")
    (package / "twice.py").unlink()
    (package / "nothing.py").write_text("X = 1\n")
    with pytest.raises(TypeError, match="declares no composed kind"):
        _discover([str(package)], "fake_kinds")
    for name in ("fake_kinds.mine", "fake_kinds.twice", "fake_kinds.nothing"):
        monkeypatch.delitem(sys.modules, name, raising=False)


@pytest.mark.parametrize("model_type", KIND_IDS)
def test_declaration_matches_its_modeling_file_and_surgeries(model_type):
    from transformers import AutoConfig

    from lmexpand.expand.registry import load_methods

    kind = KINDS[model_type]
    assert kind.model_type == model_type and composed_kind({"model_type": model_type}) is kind
    assert (PKG / "compose" / f"{kind.modeling}.py").is_file()
    modeling = modeling_module(model_type)
    config_class, model_class = getattr(modeling, kind.config_class), getattr(modeling, kind.model_class)
    assert config_class.model_type == model_type and model_class.config_class is config_class
    assert type(AutoConfig.for_model(model_type)) is config_class  # registered on import
    methods = load_methods()
    assert kind.surgeries and all(s in methods for s in kind.surgeries), kind.surgeries
    assert kind.tensor_prefixes and all(p.endswith(".") for p in kind.tensor_prefixes)
    assert set(kind.trainable_members) <= set(kind.tensor_prefixes)
    assert set(kind.embeddable_members) <= set(kind.tensor_prefixes)
    assert "{markers}" not in (kind.no_gradient or "") or kind.span_markers
    assert member_references({"model_type": model_type}) == []  # nothing referenced: nothing listed


@pytest.mark.parametrize("model_type", KIND_IDS)
def test_a_tiny_example_goes_through_every_command(model_type, members, tmp_path, capsys):
    kind = KINDS[model_type]
    composed = make_example(model_type, members, tmp_path / "composed", capsys)

    # what the surgery wrote: a directory of this kind, referencing its members
    config = read_config(composed)
    assert composed_kind(config) is kind and config["architectures"] == [kind.model_class]
    refs = member_references(config)
    assert refs and all(Path(p).is_dir() for _, p in refs), refs
    names = [t.name for t in CheckpointReader(composed, need_family=False)]
    assert all(n.startswith(kind.tensor_prefixes) for n in names), names
    code, out, err = run(capsys, "verify", composed)
    assert code == 0, out + err
    code, out, err = run(capsys, "inspect", composed, "--json")
    assert code == 0 and "composed model" in json.loads(out)["note"], out + err

    # the one loader, then eval and generate as the kind declares
    model = load_model(composed).eval()
    assert type(model).__name__ == kind.model_class and type(model).__module__ == f"lmexpand.compose.{kind.modeling}"
    ids, mask = padded_batch(320)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(expected[mask.bool()]).all()
    code, out, err = run(capsys, "eval", composed, "--data", f"g={GENERAL_TEXT}", "--max-tokens", "256", "--seq-len",
                         "64", "--no-samples", "--out", tmp_path / "eval")
    assert code == 0, err
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert ("co_llm" in results) == kind.deferral_gate  # the deferral table
    code, out, err = run(capsys, "generate", composed, "--prompt", "The cell", "--max-new-tokens", "3", "--ignore-eos",
                         "--threshold", "0.5", "--json")
    if kind.deferral_gate:
        assert code == 0, err
    else:
        assert code == 2 and "--threshold and --show-deferrals are only for" in err and "Traceback" not in err, err

    # export: self-contained, read back by lmexpand and by transformers alone
    code, out, err = run(capsys, "export", composed, tmp_path / "x")
    assert code == 0, err
    exported = read_config(tmp_path / "x")
    stem = f"modeling_{model_type}"
    assert exported["auto_map"] == {"AutoConfig": f"{stem}.{kind.config_class}",
                                    "AutoModelForCausalLM": f"{stem}.{kind.model_class}"}
    assert (tmp_path / "x" / f"{stem}.py").is_file() and member_references(exported) == []
    code, out, err = run(capsys, "verify", tmp_path / "x")
    assert code == 0, out + err
    with torch.no_grad():
        again = load_model(tmp_path / "x").eval()(input_ids=ids, attention_mask=mask).logits
    assert (again - expected)[mask.bool()].abs().max().item() == 0.0
    assert max_delta_without_lmexpand(tmp_path / "x", ids, mask, expected, tmp_path) == 0.0


@pytest.mark.parametrize("model_type", KIND_IDS)
def test_a_member_gone_from_disk_is_refused(model_type, members, tmp_path, capsys):
    own = {k: tmp_path / "members" / k for k in members}
    for k, path in members.items():
        shutil.copytree(path, own[k])
    composed = make_example(model_type, own, tmp_path / "composed", capsys)
    role, gone = member_references(read_config(composed))[0]
    shutil.rmtree(gone)
    for cmd, target in ((["eval", composed, "--data", f"g={GENERAL_TEXT}", "--out", tmp_path / "e"], tmp_path / "e"),
                        (["generate", composed, "--prompt", "x"], None),
                        (["export", composed, tmp_path / "x"], tmp_path / "x")):
        code, out, err = run(capsys, *cmd)
        assert code == 2 and f"the {role} {gone} is gone" in err and "Traceback" not in err, (cmd, err)
        assert target is None or not target.exists(), cmd
