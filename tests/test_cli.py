"""CLI habits and `lmexpand inspect`: fast help, JSON on stdout, clear user errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmexpand.cli import cli, main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert ("\n" + err).count("\nerror: ") == 1
    for needle in needles:
        assert needle in err, (needle, err)


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys; from lmexpand.cli import main; "
        "rc = main(['--help']); rc2 = main(['--version']); "
        "heavy = [m for m in ('torch', 'transformers', 'safetensors', 'rich') if m in sys.modules]; "
        "print(rc, rc2, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 0 []"


def test_version(capsys):
    from lmexpand import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and __version__ in out


def _all_commands(group, prefix=()):
    import click

    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, prefix + (name,))


def test_every_subcommand_has_help_with_an_example(capsys):
    commands = list(_all_commands(cli))
    assert commands
    for path, _ in commands:
        code, out, _ = run_cli(capsys, *path, "--help")
        assert code == 0
        assert "Example" in out, f"`lmexpand {' '.join(path)} --help` shows no example"


def test_inspect_json(tiny_model, capsys):
    code, out, err = run_cli(capsys, "inspect", tiny_model, "--json")
    assert code == 0, err
    info = json.loads(out)
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert info["num_layers"] == cfg["num_hidden_layers"] == len(info["per_layer_parameters"])
    assert info["hidden_size"] == 64 and info["vocab_size"] == 320
    assert info["num_key_value_heads"] == 2
    assert info["dtype"] == "float32"
    assert info["tie_word_embeddings"] == cfg["tie_word_embeddings"]
    assert info["total_parameters"] == sum(info["per_layer_parameters"]) + sum(info["non_layer_parameters"].values())
    assert info["total_bytes"] == 4 * info["total_parameters"]
    assert info["lineage"] is None
    # every layer of a uniform model has the same count
    assert len(set(info["per_layer_parameters"])) == 1


def test_inspect_counts_match_torch(tiny_llama, capsys):
    from transformers import AutoModelForCausalLM

    code, out, _ = run_cli(capsys, "inspect", tiny_llama, "--json")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert json.loads(out)["total_parameters"] == sum(p.numel() for p in model.parameters())


def test_inspect_table_for_people(tiny_llama, capsys):
    code, out, _ = run_cli(capsys, "inspect", tiny_llama)
    assert code == 0
    assert "llama" in out and "parameters per layer" in out and "kv heads" in out


def test_inspect_shows_lineage(tiny_llama, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    (d / "lmexpand.json").write_text(json.dumps({"method": "llama-pro", "source": "x"}))
    code, out, _ = run_cli(capsys, "inspect", d, "--json")
    assert json.loads(out)["lineage"]["method"] == "llama-pro"


# -- user errors: message names the problem and the fix, exit 2, no traceback ---------------
def test_missing_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", tmp_path / "nope")
    assert_user_error(code, err, str(tmp_path / "nope"), "no such file or directory")


def test_dir_without_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", tmp_path)
    assert_user_error(code, err, "no config.json", "Point at the directory")


def test_unsupported_architecture_lists_supported(capsys, tiny_llama, tmp_path):
    d = tmp_path / "gpt"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "surgery", "llama-pro", d, tmp_path / "o", "--add", "2")
    from lmexpand.checkpoint.families import FAMILIES

    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    assert_user_error(code, err, "'gpt2'", "not supported", supported)
    # inspect shows any architecture from its headers, and says what it can do with it
    code, out, err = run_cli(capsys, "inspect", d, "--json")
    assert code == 0, err
    note = json.loads(out)["note"]
    assert "'gpt2'" in note and "surgeries and `merge` need one of the families" in note and supported in note


def test_truncated_shard(capsys, tiny_llama, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tiny_llama, d)
    shard = d / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    code, _, err = run_cli(capsys, "inspect", d)
    assert_user_error(code, err, "model.safetensors", "truncated shard", "re-download")


def test_index_naming_missing_shard(capsys, tiny_llama, tmp_path):
    from lmexpand.checkpoint import CheckpointReader, copy_checkpoint

    out = copy_checkpoint(CheckpointReader(tiny_llama), tmp_path / "s", max_shard_size=60_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    code, _, err = run_cli(capsys, "inspect", out)
    assert_user_error(code, err, victim.name, "missing")


def test_pickle_only_checkpoint(capsys, tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "p"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d)
    torch.save(load_file(tiny_llama / "model.safetensors"), d / "pytorch_model.bin")
    code, _, err = run_cli(capsys, "inspect", d)
    assert_user_error(code, err, "pytorch_model.bin", "--allow-pickle")
    code, out, err = run_cli(capsys, "inspect", d, "--allow-pickle", "--json")
    assert code == 0, err
    assert json.loads(out)["family"] == "llama"


def test_hub_id_offline(capsys):
    code, _, err = run_cli(capsys, "inspect", "HuggingFaceTB/SmolLM2-360M")
    assert_user_error(code, err, "never downloads", "hf download HuggingFaceTB/SmolLM2-360M")


def test_unknown_option_is_a_usage_error(capsys):
    code, _, err = run_cli(capsys, "inspect", "--bogus")
    assert code == 2 and "Traceback" not in err and "--bogus" in err


def test_console_script_exit_codes(tmp_path):
    exe = Path(sys.executable).with_name("lmexpand")
    if not exe.exists():
        pytest.skip("console script not installed (pip install -e . creates it)")
    r = subprocess.run([exe, "inspect", tmp_path / "missing"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and "error:" in r.stderr
