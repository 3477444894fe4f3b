"""The bad-input catalogue: every case through the CLI (or a recipe), one at a time.

Each case asserts: exit code 2, a message on stderr that starts with ``error:`` (or
click's ``Error:`` for usage errors), is one paragraph, names the problem (the needles) and
says what to do; no Python traceback; and nothing written anywhere under the test's
directory (inputs included). ``docs/errors.md`` lists every case with the message it gets;
regenerate it with ``.venv/bin/python -m tests.test_bad_inputs`` after adding a case.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import GSM8K_TRAIN, REPO

TEMPLATE = "Question: {question}\nAnswer: {answer}"


@dataclass
class Ctx:
    root: Path          # everything a case may touch lives here (snapshot before/after)
    tiny: Path          # a tiny Llama (no lineage)
    pro: Path           # the tiny Llama + 2 LLaMA-Pro blocks (with lmexpand.json)
    qwen: Path          # a tiny Qwen2 with another vocabulary size
    data: Path          # 60 GSM8K problems (JSONL)
    out: Path           # an output path that does not exist

    def model_copy(self, name: str, src: Path | None = None) -> Path:
        dst = self.root / "inputs" / name
        if not dst.exists():
            shutil.copytree(src or self.tiny, dst)
        return dst

    def file(self, name: str, text: str) -> Path:
        p = self.root / "inputs" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p


@dataclass
class Case:
    id: str
    what: str
    argv: Callable[[Ctx], list]
    needles: tuple[str, ...]


def _edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _train(ctx: Ctx, model, data=None, *extra, out=None) -> list:
    return ["train", "--model", model, "--data", data or ctx.data, "--template", TEMPLATE, "--out", out or ctx.out,
            "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--no-tensorboard",
            *extra]


def _recipe(ctx: Ctx, name: str, doc: dict | str) -> Path:
    import yaml

    text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
    return ctx.file(f"{name}/r.yaml", text)


_CHAT_OK = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]}


def _chat_file(ctx: Ctx, name: str, bad: dict | None = None) -> Path:
    """Five good conversations, then ``bad`` as record 6."""
    records = [_CHAT_OK] * 5 + ([bad] if bad is not None else [])
    return ctx.file(name, "".join(json.dumps(r) + "\n" for r in records))


def _train_chat(ctx: Ctx, data, *extra) -> list:
    return ["train", "--model", ctx.pro, "--data", data, "--chat", "messages", "--out", ctx.out, "--seq-len", "64",
            "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--no-tensorboard", *extra]


def _parquet(ctx: Ctx, name: str, rows: list[dict]) -> Path:
    from datasets import Dataset

    p = ctx.root / "inputs" / name
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        Dataset.from_list(rows).to_parquet(str(p))
    return p


def _saved_splits(ctx: Ctx) -> Path:
    from datasets import Dataset, DatasetDict

    p = ctx.root / "inputs" / "saved-splits"
    if not p.exists():
        DatasetDict({"test": Dataset.from_list([{"text": "a b c"}] * 4)}).save_to_disk(str(p))
    return p


def _index(ctx: Ctx, name: str, weight_map: dict) -> Path:
    d = ctx.model_copy(name)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def _truncated(ctx: Ctx) -> Path:
    d = ctx.model_copy("truncated")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return d


def _bad_header(ctx: Ctx) -> Path:
    d = ctx.model_copy("bad-header")
    body = b"{not json"
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    return d


def _no_layer_tensor(ctx: Ctx) -> Path:
    from safetensors.torch import load_file, save_file

    d = ctx.model_copy("missing-tensor")
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _corrupted_pro(ctx: Ctx) -> Path:
    d = ctx.root / "inputs" / "corrupted-pro"
    if d.exists():
        return d
    d = ctx.model_copy("corrupted-pro", ctx.pro)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    return d


def _foreign_checkpoint(ctx: Ctx) -> Path:
    """A run dir whose checkpoint came from another model (fingerprint differs)."""
    run = ctx.root / "inputs" / "foreign-run"
    ckpt = run / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "tokens": 128, "blocks": 4,
                                                 "model_fingerprint": "0" * 64, "data_fingerprint": "0" * 64}))
    return run


def _symlink_recipe(ctx: Ctx) -> Path:
    base = ctx.root / "inputs" / "symlink-recipe"
    base.mkdir(parents=True, exist_ok=True)
    link = base / "data.jsonl"
    if not link.exists():
        link.symlink_to(ctx.data)  # points outside the recipe's directory
    return _recipe(ctx, "symlink-recipe", {"train": {"model": str(ctx.pro), "data": [{"path": "data.jsonl",
                                                                                       "template": TEMPLATE}]}})


def _no_tokenizer(ctx: Ctx, name: str = "no-tokenizer", src: Path | None = None) -> Path:
    d = ctx.model_copy(name, src)
    for f in list(d.iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    return d


def _corrupt_tokenizer(ctx: Ctx) -> Path:
    d = ctx.model_copy("bad-tokenizer", ctx.pro)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    return d


def _big_tokenizer(ctx: Ctx) -> Path:
    """The tiny Llama (vocab_size 320) with the 384-token tokenizer of the tiny Qwen2."""
    d = ctx.model_copy("big-tokenizer")
    for f in ctx.qwen.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, d / f.name)
    return d


def _symlink_to(ctx: Ctx, name: str, target: Path) -> Path:
    link = ctx.root / "inputs" / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(target)
    return link


def _bomb(ctx: Ctx) -> Path:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return _recipe(ctx, "bomb", "\n".join(lines) + "\n")


def _merge(ctx: Ctx, name: str, doc: dict) -> Path:
    import yaml

    return ctx.file(f"{name}.yaml", yaml.safe_dump(doc))


def _train_recipe(ctx: Ctx, name: str, **train) -> Path:
    doc = {"train": {"model": str(ctx.pro), "data": [{"path": str(ctx.data), "template": TEMPLATE}], "seq_len": 32,
                     "batch_size": 2, "max_steps": 2, "warmup_steps": 1, "tensorboard": False, **train}}
    return _recipe(ctx, name, doc)


def _state_edit(ctx: Ctx, name: str, fn) -> Path:
    """A copy of the tiny Llama whose weights ``fn(state)`` changed (saved as safetensors)."""
    from safetensors.torch import load_file, save_file

    d = ctx.root / "inputs" / name
    if d.exists():
        return d
    d = ctx.model_copy(name)
    state = load_file(d / "model.safetensors")
    fn(state)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _swapped_tokenizer(ctx: Ctx) -> Path:
    """A copy of the tiny Llama whose tokenizer gives two tokens each other's ids (same size)."""
    d = ctx.root / "inputs" / "swapped-tok"
    if d.exists():
        return d
    d = ctx.model_copy("swapped-tok")
    tok = json.loads((d / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= 10][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    return d


def _config_without(ctx: Ctx, name: str, key: str) -> Path:
    d = ctx.model_copy(name)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop(key, None)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _chat_template(ctx: Ctx, name: str, template: str) -> Path:
    d = ctx.model_copy(name)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


def _started_run(ctx: Ctx) -> Path:
    """A training run of the tiny LLaMA-Pro stopped after a checkpoint at step 1 (of 2)."""
    run = ctx.root / "inputs" / "started-run"
    if not run.exists():
        from lmexpand.cli import main

        assert main(["-q", *_train(ctx, ctx.pro, None, "--save-every", "1", out=run)]) == 0
        import shutil as _sh

        _sh.rmtree(run / "model")  # as if it had stopped after its first checkpoint
    return run


def _nan_ffn(state) -> None:
    state["model.layers.0.mlp.up_proj.weight"][3, 3] = float("nan")


def _wrong_q_shape(state) -> None:
    q = state["model.layers.1.self_attn.q_proj.weight"]
    state["model.layers.1.self_attn.q_proj.weight"] = q[:-16].clone()


def _overlapping_header(ctx: Ctx) -> Path:
    d = ctx.model_copy("overlap-header")
    f = d / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[names[0]], header[names[1]]
    if a["shape"] == b["shape"] and a["dtype"] == b["dtype"]:
        b["data_offsets"] = list(a["data_offsets"])  # two tensors read the same bytes
    else:  # shift the second tensor's range back into the first's
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][1] - 4, a["data_offsets"][1] - 4 + size]
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    f.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    return d


def _pickle_copy(ctx: Ctx, name: str) -> Path:
    """A copy of the tiny Llama with only pytorch_model.bin (a real weights-only pickle)."""
    import torch
    from safetensors.torch import load_file

    d = ctx.root / "inputs" / name
    if d.exists():
        return d
    d = ctx.model_copy(name)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


CASES: list[Case] = [
    # -- the command line ------------------------------------------------------------
    Case("unknown-command", "a command that does not exist", lambda c: ["frobnicate"], ("No such command",)),
    Case("unknown-surgery", "a surgery method that does not exist",
         lambda c: ["surgery", "llama-max", c.tiny, c.out], ("No such command", "llama-max")),
    Case("unknown-option", "a misspelled option", lambda c: ["surgery", "llama-pro", c.tiny, c.out, "--adds", "2"],
         ("--adds",)),
    Case("bad-size", "an unparseable size", lambda c: ["surgery", "llama-pro", c.tiny, c.out, "--add", "1",
                                                       "--max-shard-size", "5 gigs"], ("--max-shard-size", "5 gigs")),
    # -- sources ---------------------------------------------------------------------
    Case("source-missing", "a source path that does not exist",
         lambda c: ["surgery", "llama-pro", c.root / "nope", c.out, "--add", "1"], ("no such file",)),
    Case("source-is-file", "a file given as the source",
         lambda c: ["inspect", c.tiny / "config.json"], ("not a directory",)),
    Case("no-config", "a directory without config.json",
         lambda c: ["inspect", c.file("empty/readme.txt", "x").parent], ("no config.json",)),
    Case("config-not-json", "config.json that is not JSON",
         lambda c: ["inspect", (lambda d: ((d / "config.json").write_text("{oops"), d)[1])(c.model_copy("cfg-bad"))],
         ("config.json", "cannot read")),
    Case("config-not-object", "config.json holding a list",
         lambda c: ["inspect", (lambda d: ((d / "config.json").write_text("[1, 2]"), d)[1])(c.model_copy("cfg-list"))],
         ("JSON object",)),
    Case("no-weights", "a config but no weight files",
         lambda c: ["inspect", (lambda d: ((d / "model.safetensors").unlink(), d)[1])(c.model_copy("no-weights"))],
         ("no weights",)),
    Case("pickle-only", "only pytorch_model.bin, without --allow-pickle",
         lambda c: ["surgery", "llama-pro", (lambda d: ((d / "model.safetensors").rename(d / "pytorch_model.bin"), d)[1])(
             c.model_copy("pickle")), c.out, "--add", "1"], ("pickle", "--allow-pickle")),
    Case("unsupported-architecture", "an architecture no surgery supports",
         lambda c: ["surgery", "llama-pro", _edit_config(c.model_copy("bert"), architectures=["BertModel"],
                                                          model_type="bert"), c.out, "--add", "1"], ("bert",)),
    Case("already-moe", "a source that is already a mixture of experts",
         lambda c: ["surgery", "llama-pro", _edit_config(c.model_copy("moe-cfg"), num_local_experts=8, model_type="mixtral",
                                                          architectures=["MixtralForCausalLM"]), c.out,
                    "--add", "1"], ("num_local_experts",)),
    Case("absurd-layers", "config.json with 10^12 layers",
         lambda c: ["surgery", "llama-pro", _edit_config(c.model_copy("absurd"), num_hidden_layers=10**12), c.out,
                    "--add", "1"], ("num_hidden_layers", "absurd")),
    Case("size-not-integer", "config.json with a size that is not an integer",
         lambda c: ["inspect", _edit_config(c.model_copy("str-size"), hidden_size="big")], ("hidden_size", "'big'")),
    Case("hostile-index", "an index mapping a tensor to a file outside the directory",
         lambda c: ["inspect", _index(c, "hostile", {"model.embed_tokens.weight": "../../outside.safetensors"})],
         ("outside the model directory",)),
    Case("index-absolute", "an index naming an absolute path",
         lambda c: ["inspect", _index(c, "absolute", {"model.embed_tokens.weight": "/etc/passwd"})],
         ("outside the model directory",)),
    Case("index-missing-shard", "an index naming a shard that is not there",
         lambda c: ["inspect", _index(c, "missing-shard", {"model.embed_tokens.weight": "model-00009.safetensors"})],
         ("missing", "model-00009.safetensors")),
    Case("truncated-shard", "a weight file cut short", lambda c: ["inspect", _truncated(c)], ("truncated",)),
    Case("bad-header", "a safetensors file with a garbage header", lambda c: ["inspect", _bad_header(c)],
         ("header",)),
    Case("missing-layer-tensor", "a layer tensor missing from the weights",
         lambda c: ["surgery", "llama-pro", _no_layer_tensor(c), c.out, "--add", "1"],
         ("model.layers.1.mlp.up_proj.weight",)),
    # -- surgery arguments -----------------------------------------------------------
    Case("llama-pro-add-zero", "llama-pro --add 0", lambda c: ["surgery", "llama-pro", c.tiny, c.out, "--add", "0"],
         ("--add",)),
    Case("llama-pro-position-range", "llama-pro --positions beyond the last layer",
         lambda c: ["surgery", "llama-pro", c.tiny, c.out, "--positions", "99"], ("99",)),
    Case("upscale-drop-too-many", "upscale --drop of half the layers or more",
         lambda c: ["surgery", "upscale", c.tiny, c.out, "--drop", "2"], ("--drop",)),
    Case("upscale-bad-slices", "upscale --slices that are not ranges",
         lambda c: ["surgery", "upscale", c.tiny, c.out, "--slices", "0-2,x"], ("--slices", "'x'")),
    Case("moe-top-k", "moe --top-k above the number of experts",
         lambda c: ["surgery", "moe", c.tiny, c.out, "--experts", "2", "--top-k", "3"], ("--top-k",)),
    Case("moe-segments", "moe --segments that do not divide the FFN",
         lambda c: ["surgery", "moe", c.tiny, c.out, "--segments", "7"], ("--segments",)),
    Case("moe-absurd-experts", "moe --experts 10^6 (refused before a plan is built)",
         lambda c: ["surgery", "moe", c.tiny, c.out, "--experts", "1000000"], ("--experts", "4096")),
    Case("moe-absurd-replicas", "moe --replicas 10^6",
         lambda c: ["surgery", "moe", c.tiny, c.out, "--segments", "8", "--replicas", "1000000"], ("--replicas",)),
    Case("llama-pro-absurd-per-group", "llama-pro --per-group 10^5",
         lambda c: ["surgery", "llama-pro", c.tiny, c.out, "--add", "2", "--per-group", "100000"],
         ("--per-group", "10,000")),
    Case("upscale-absurd-slices", "upscale --slices giving 12,000 layers",
         lambda c: ["surgery", "upscale", c.tiny, c.out, "--slices", ",".join(["0-4"] * 3000)], ("12,000",)),
    Case("calm-one-source", "calm with one source instead of two",
         lambda c: ["surgery", "calm", c.tiny, c.out], ("calm",)),
    Case("calm-vocab", "calm with models of different vocabularies",
         lambda c: ["surgery", "calm", c.tiny, c.qwen, c.out, "--every", "1"], ("vocab",)),
    # -- output targets --------------------------------------------------------------
    Case("target-inside-source", "an output directory inside the source",
         lambda c: ["surgery", "llama-pro", c.tiny, c.tiny / "sub", "--add", "1"], ("inside the source",)),
    Case("target-not-empty", "an existing non-empty output without --force",
         lambda c: ["surgery", "llama-pro", c.tiny, c.file("taken/x.txt", "x").parent, "--add", "1"],
         ("not empty", "--force")),
    Case("target-is-file", "an output path that is a file",
         lambda c: ["surgery", "llama-pro", c.tiny, c.file("a-file", "x"), "--add", "1"], ("is a file",)),
    # -- training --------------------------------------------------------------------
    Case("train-data-missing", "a data file that does not exist",
         lambda c: _train(c, c.pro, c.root / "nope.jsonl"), ("nope.jsonl",)),
    Case("train-empty-corpus", "an empty data file", lambda c: _train(c, c.pro, c.file("empty.jsonl", "")),
         ("empty",)),
    Case("train-missing-field", "JSON lines without the template's field",
         lambda c: _train(c, c.pro, c.file("nofield.jsonl", '{"text": "a"}\n' * 20)), ("question",)),
    Case("train-bad-jsonl", "a data line that is not JSON",
         lambda c: _train(c, c.pro, c.file("broken.jsonl", '{"question": "a", "answer": "b"}\n{oops\n')),
         ("broken.jsonl",)),
    Case("train-seq-len", "seq_len above the model's max positions",
         lambda c: _train(c, c.pro, None, "--seq-len", "100000"), ("max_position_embeddings",)),
    Case("train-no-lineage", "a model without lmexpand.json and no --trainable",
         lambda c: _train(c, c.tiny), ("lmexpand.json", "--trainable")),
    Case("train-nothing-trainable", "--trainable globs that match nothing",
         lambda c: _train(c, c.pro, None, "--trainable", "nomatch.*"), ("nomatch.*",)),
    Case("train-bad-lr", "a negative learning rate", lambda c: _train(c, c.pro, None, "--lr", "-1"), ("lr",)),
    Case("train-out-not-empty", "a run directory in use, without --resume or --force",
         lambda c: ["train", "--model", c.pro, "--data", c.data, "--template", TEMPLATE,
                    "--out", c.file("busy/x.txt", "x").parent, "--seq-len", "32"], ("--resume", "--force")),
    Case("train-resume-nothing", "--resume where no checkpoint exists",
         lambda c: _train(c, c.pro, None, "--resume"), ("no checkpoint",)),
    Case("train-resume-foreign", "--resume from a checkpoint of another model",
         lambda c: ["train", "--model", c.pro, "--data", c.data, "--template", TEMPLATE, "--out",
                    _foreign_checkpoint(c), "--seq-len", "32", "--resume", "--no-tensorboard"], ("another model",)),
    Case("train-corrupted-shard", "a model whose shard no longer matches its recorded sha256",
         lambda c: _train(c, _corrupted_pro(c)), ("sha256", "lmexpand verify")),
    Case("train-bad-template", "a template naming a field no line has",
         lambda c: ["train", "--model", c.pro, "--data", c.data, "--template", "{nope}", "--out", c.out,
                    "--seq-len", "32", "--no-tensorboard"], ("nope",)),
    # -- recipes ---------------------------------------------------------------------
    Case("recipe-missing", "a recipe file that does not exist", lambda c: ["run", c.root / "none.yaml"],
         ("none.yaml",)),
    Case("recipe-not-yaml", "a recipe that is not YAML", lambda c: ["run", _recipe(c, "notyaml", "a: [1, 2\n")],
         ("YAML",)),
    Case("recipe-not-mapping", "a recipe that is a list", lambda c: ["run", _recipe(c, "list", "- 1\n- 2\n")],
         ("mapping",)),
    Case("recipe-unknown-section", "a misspelled section",
         lambda c: ["run", _recipe(c, "typo", {"trian": {}})], ("trian",)),
    Case("recipe-bad-method", "an unknown surgery method in a recipe",
         lambda c: ["run", _recipe(c, "method", {"surgery": {"method": "llama-max", "source": str(c.tiny)}})],
         ("surgery.method", "llama-max")),
    Case("recipe-bad-value", "a negative max_steps in a recipe",
         lambda c: ["run", _recipe(c, "steps", {"train": {"model": str(c.pro), "max_steps": -5,
                                                          "data": [{"path": str(c.data)}]}})], ("max_steps",)),
    Case("recipe-source-count", "calm with one source in a recipe",
         lambda c: ["run", _recipe(c, "calm1", {"surgery": {"method": "calm", "source": str(c.tiny),
                                                                         "args": {"every": 1}}})],
         ("source",)),
    Case("recipe-symlink-escape", "a relative recipe path that a symlink sends outside the recipe's directory",
         lambda c: ["run", _symlink_recipe(c)], ("symlink", "data.jsonl")),
    # -- export, eval, verify --------------------------------------------------------
    Case("export-not-model", "export of a directory that is not a model",
         lambda c: ["export", c.file("notmodel/x.txt", "x").parent, c.out], ("config.json",)),
    Case("eval-data-missing", "eval with a data file that does not exist",
         lambda c: ["eval", c.pro, "--data", f"math={c.root / 'gone.jsonl'}", "--out", c.out], ("gone.jsonl",)),
    Case("eval-lm-eval-options-alone", "eval --lm-eval-limit without --lm-eval",
         lambda c: ["eval", c.pro, "--data", f"math={c.data}", "--template", TEMPLATE, "--out", c.out,
                    "--lm-eval-limit", "10"], ("--lm-eval TASKS",)),
    Case("eval-lm-eval-limit", "eval --lm-eval with a limit of zero documents",
         lambda c: ["eval", c.pro, "--data", f"math={c.data}", "--template", TEMPLATE, "--out", c.out,
                    "--lm-eval", "hellaswag", "--lm-eval-limit", "0"], ("--lm-eval-limit", "positive")),
    Case("eval-lm-eval-batch", "eval --lm-eval with a batch size that is not a number",
         lambda c: ["eval", c.pro, "--data", f"math={c.data}", "--template", TEMPLATE, "--out", c.out,
                    "--lm-eval", "hellaswag", "--lm-eval-batch-size", "big"], ("--lm-eval-batch-size", "'auto'")),
    Case("eval-lm-eval-no-tasks", "eval --lm-eval with an empty task list",
         lambda c: ["eval", c.pro, "--data", f"math={c.data}", "--template", TEMPLATE, "--out", c.out,
                    "--lm-eval", ","], ("name at least one task",)),
    Case("verify-corrupted", "verify of a model whose shard changed", lambda c: ["verify", _corrupted_pro(c)],
         ("sha256",)),

    # -- round two: no command deletes or writes into its own inputs --------------------
    Case("train-out-is-model", "train --out the model it trains, with --force",
         lambda c: (lambda m: _train(c, m, None, "--force", out=m))(c.model_copy("self", c.pro)),
         ("is the --model",)),
    Case("train-out-holds-model", "train --out a parent of the model, with --force",
         lambda c: ["train", "--model", c.model_copy("nested/pro", c.pro), "--data", c.data, "--template", TEMPLATE,
                    "--out", c.root / "inputs" / "nested", "--seq-len", "32", "--max-steps", "2", "--force"],
         ("inside the output", "--model")),
    Case("train-out-inside-model", "train --out inside the model directory",
         lambda c: ["train", "--model", c.pro, "--data", c.data, "--template", TEMPLATE, "--out", c.pro / "run",
                    "--seq-len", "32", "--max-steps", "2"], ("inside the --model",)),
    Case("train-out-is-data", "train --out the training data file, with --force",
         lambda c: ["train", "--model", c.pro, "--data", c.data, "--template", TEMPLATE, "--out", c.data,
                    "--seq-len", "32", "--max-steps", "2", "--force"], ("is the --data",)),
    Case("train-out-symlink-to-model", "train --out a symlink to the model, with --force",
         lambda c: ["train", "--model", c.pro, "--data", c.data, "--template", TEMPLATE, "--out",
                    _symlink_to(c, "link-to-pro", c.pro), "--seq-len", "32", "--max-steps", "2", "--force"],
         ("is the --model",)),
    Case("surgery-out-is-source", "surgery writing over its own source, with --force",
         lambda c: ["surgery", "llama-pro", c.model_copy("src-self"), c.root / "inputs" / "src-self", "--add", "1",
                    "--force"], ("is the source",)),
    Case("export-out-is-source", "export over the model it exports, with --force",
         lambda c: ["export", c.model_copy("export-self", c.pro), c.root / "inputs" / "export-self", "--force"],
         ("is the source",)),
    Case("eval-out-is-model", "eval writing its report into the model directory",
         lambda c: ["eval", c.pro, "--data", f"math={c.data}", "--template", TEMPLATE, "--out", c.pro,
                    "--max-tokens", "64", "--seq-len", "32"], ("--out", "model")),
    Case("eval-out-inside-model", "eval --out inside the model directory",
         lambda c: ["eval", c.pro, "--data", f"math={c.data}", "--template", TEMPLATE, "--out", c.pro / "report",
                    "--max-tokens", "64", "--seq-len", "32"], ("inside the evaluated model",)),
    Case("run-out-holds-recipe", "a recipe whose surgery output is the recipe's own directory",
         lambda c: ["run", _recipe(c, "holds", {"surgery": {"method": "llama-pro", "source": str(c.tiny),
                                                          "out": ".", "args": {"add": 1}}})],
         ("surgery.out", "recipe")),
    Case("run-train-out-is-model", "a recipe training into its own model directory",
         lambda c: ["run", _train_recipe(c, "train-self", model=str(c.model_copy("rself", c.pro)),
                                         out=str(c.root / "inputs" / "rself"))], ("train.out", "train.model")),
    Case("run-outputs-overlap", "a recipe whose eval output lies inside its training output",
         lambda c: ["run", _recipe(c, "overlap", {
             "train": {"model": str(c.pro), "data": [{"path": str(c.data), "template": TEMPLATE}], "seq_len": 32,
                       "max_steps": 2, "out": "run"},
             "eval": {"data": {"math": str(c.data)}, "template": TEMPLATE, "out": "run/eval"}})],
         ("eval.out", "train.out")),
    Case("run-workdir-is-file", "a recipe whose workdir is a file",
         lambda c: ["run", _recipe(c, "wd-file", {"workdir": str(c.data), "train": {
             "model": str(c.pro), "data": [{"path": str(c.data), "template": TEMPLATE}], "seq_len": 32}})],
         ("workdir", "is a file")),
    # -- output paths ------------------------------------------------------------------
    Case("surgery-parent-is-file", "an output whose parent is a file",
         lambda c: ["surgery", "llama-pro", c.tiny, c.file("plain-file", "x") / "out", "--add", "1"],
         ("parent", "is a file")),
    Case("train-out-is-file", "train --out an existing file",
         lambda c: _train(c, c.pro, None, out=c.file("out-file", "x")),
         ("is a file",)),
    Case("export-parent-is-file", "export into a path under a file",
         lambda c: ["export", c.pro, c.file("exp-file", "x") / "sub" / "out"], ("parent", "is a file")),
    Case("eval-out-parent-is-file", "eval --out under a file, refused before scoring",
         lambda c: ["eval", c.pro, "--data", f"math={c.data}", "--template", TEMPLATE, "--out",
                    c.file("eval-file", "x") / "report", "--max-tokens", "64", "--seq-len", "32"],
         ("parent", "is a file")),
    # -- non-finite arguments -----------------------------------------------------------
    Case("train-lr-inf", "--lr inf", lambda c: _train(c, c.pro, None, "--lr", "inf"), ("--lr", "finite")),
    Case("train-lr-nan", "--lr nan", lambda c: _train(c, c.pro, None, "--lr", "nan"), ("--lr", "finite")),
    Case("train-grad-norm-inf", "--max-grad-norm inf", lambda c: _train(c, c.pro, None, "--max-grad-norm", "inf"),
         ("--max-grad-norm", "finite")),
    Case("upscale-seam-scale-inf", "upscale --seam-scale inf",
         lambda c: ["surgery", "upscale", c.tiny, c.out, "--drop", "1", "--seam-scale", "inf"],
         ("--seam-scale", "finite")),
    Case("moe-noise-inf", "moe --noise inf",
         lambda c: ["surgery", "moe", c.tiny, c.out, "--experts", "2", "--noise", "inf"], ("--noise", "finite")),
    Case("recipe-lr-inf", "a recipe with lr: .inf",
         lambda c: ["run", _recipe(c, "lr-inf", "train:\n  model: " + str(c.pro) + "\n  data: [{path: " + str(c.data)
                                   + "}]\n  lr: .inf\n")], ("lr", "finite")),
    # -- training data: chat, formats, mixtures ------------------------------------------
    Case("train-chat-no-messages", "--chat messages on records without a messages field",
         lambda c: _train_chat(c, c.data, "--chat-template", "chatml"), ("'messages'", "data.jsonl:1", "--chat")),
    Case("train-chat-roles-order", "a conversation whose first turn is the assistant's",
         lambda c: _train_chat(c, _chat_file(c, "order.jsonl", {"messages": [
             {"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]}), "--chat-template", "chatml"),
         ("order.jsonl: record 6", "turn 1 is 'assistant'", "Fix the order")),
    Case("train-chat-empty-answer", "a conversation with an empty assistant turn",
         lambda c: _train_chat(c, _chat_file(c, "empty-answer.jsonl", {"messages": [
             {"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}), "--chat-template", "chatml"),
         ("empty-answer.jsonl: record 6", "empty assistant turn", "Fill in the answer")),
    Case("train-chat-unanswered", "a conversation ending with a user turn",
         lambda c: _train_chat(c, _chat_file(c, "unanswered.jsonl", {"messages": [
             {"role": "user", "content": "q"}]}), "--chat-template", "chatml"),
         ("unanswered.jsonl: record 6", "does not end with an assistant turn")),
    Case("train-chat-bad-turn", "a turn without content",
         lambda c: _train_chat(c, _chat_file(c, "no-content.jsonl", {"messages": [
             {"role": "user"}, {"role": "assistant", "content": "a"}]}), "--chat-template", "chatml"),
         ("no-content.jsonl: record 6", "turn 1")),
    Case("train-chat-no-template", "chat data for a model whose tokenizer has no chat template",
         lambda c: _train_chat(c, _chat_file(c, "chat.jsonl")), ("no chat template", "--chat-template chatml")),
    Case("train-chat-template-missing", "--chat-template naming a file that does not exist",
         lambda c: _train_chat(c, _chat_file(c, "chat2.jsonl"), "--chat-template", c.root / "nope.jinja"),
         ("nope.jinja", "no such file")),
    Case("train-chat-template-silent", "a chat template that renders nothing to learn",
         lambda c: _train_chat(c, _chat_file(c, "chat3.jsonl"), "--chat-template", c.file(
             "silent.jinja", "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
                             "{% endfor %}")), ("record 1", "renders nothing to learn", "--chat-template")),
    Case("train-chat-on-text", "--chat on a plain-text file",
         lambda c: _train_chat(c, c.file("plain.txt", "just text\n"), "--chat-template", "chatml"),
         ("plain.txt", "--chat reads records")),
    Case("train-parquet-wrong-type", "a parquet text column holding numbers",
         lambda c: ["train", "--model", c.pro, "--data", _parquet(c, "ints.parquet", [{"text": i} for i in range(9)]),
                    "--out", c.out, "--seq-len", "32", "--max-steps", "2", "--no-tensorboard"],
         ("ints.parquet", "'text' holds int64, not text", "--template")),
    Case("train-parquet-missing-column", "a parquet file without the template's column",
         lambda c: _train(c, c.pro, _parquet(c, "cols.parquet", [{"q": "a", "a": "b"}] * 3)),
         ("cols.parquet", "'question'", "Fields present: q (string), a (string)")),
    Case("train-parquet-chat-type", "a parquet messages column that is not a list of turns",
         lambda c: _train_chat(c, _parquet(c, "msgs.parquet", [{"messages": "hello"}] * 3), "--chat-template",
                               "chatml"), ("msgs.parquet", "'messages' holds string", "list of {role, content}")),
    Case("train-not-parquet", "a .parquet file that is not parquet",
         lambda c: _train(c, c.pro, c.file("fake.parquet", "question,answer\n")), ("fake.parquet", "not a readable")),
    Case("train-saved-no-train-split", "a save_to_disk directory without a train split",
         lambda c: ["train", "--model", c.pro, "--data", _saved_splits(c), "--out", c.out, "--seq-len", "32",
                    "--no-tensorboard"],
         ("test", "saved-splits/test")),
    Case("train-plain-directory", "a directory that save_to_disk did not write",
         lambda c: _train(c, c.pro, c.file("somedir/x.parquet", "x").parent), ("somedir", "save_to_disk")),
    Case("train-hub-id", "a Hugging Face Hub dataset id as --data",
         lambda c: _train(c, c.pro, "openai/gsm8k"), ("never downloads", "hf download openai/gsm8k")),
    Case("train-weight-zero", "a mixture weight of 0",
         lambda c: _train(c, c.pro, f"{c.data}:0"), ("--data", "positive finite")),
    Case("train-weight-negative", "a negative mixture weight",
         lambda c: _train(c, c.pro, f"{c.data}:-0.5"), ("-0.5", "positive finite")),
    Case("train-weight-nan", "a mixture weight of nan",
         lambda c: _train(c, c.pro, f"{c.data}:nan"), ("nan", "positive finite")),
    Case("train-weights-partial", "a mixture where one source has no weight",
         lambda c: _train(c, c.pro, f"{c.data}:0.7", "--data", c.data), ("give every source a weight",)),
    Case("recipe-weight-inf", "a recipe data entry with weight: .inf",
         lambda c: ["run", _train_recipe(c, "w-inf", data=[{"path": str(c.data), "template": TEMPLATE,
                                                            "weight": float("inf")}])],
         ("train", "weight", "positive finite")),
    Case("recipe-weight-zero", "a recipe data entry with weight: 0",
         lambda c: ["run", _train_recipe(c, "w-zero", data=[{"path": str(c.data), "template": TEMPLATE, "weight": 0}]),
                    "--check"], ("data.jsonl", "positive finite")),
    Case("recipe-train-stages-empty", "a recipe whose train section is an empty list",
         lambda c: ["run", _recipe(c, "no-stages", {"surgery": {"method": "llama-pro", "source": str(c.tiny),
                                                               "args": {"add": 1}}, "train": []})],
         ("train", "empty list")),
    Case("run-check-chat-no-template", "run --check: chat data for a model without a chat template",
         lambda c: ["run", _train_recipe(c, "chk-chat", data=[{"path": str(_chat_file(c, "chat4.jsonl")),
                                                               "chat": "messages"}]), "--check"],
         ("no chat template", "chat_template: chatml")),
    Case("run-check-stage-chat", "run --check: a second train stage with a malformed conversation",
         lambda c: ["run", _recipe(c, "stages", {
             "train": [{"model": str(c.pro), "data": [{"path": str(c.data), "template": TEMPLATE}], "seq_len": 32},
                       {"data": [{"path": str(_chat_file(c, "chat5.jsonl", {"messages": [
                           {"role": "user", "content": "q"}, {"role": "user", "content": "q"}]})), "chat": "messages"}],
                        "chat_template": "chatml", "seq_len": 32}]}), "--check"],
         ("chat5.jsonl: record 6", "turn 2 is 'user'")),
    # -- checks before the work --------------------------------------------------------
    Case("run-check-missing-field", "run --check: the template names a field the data lacks",
         lambda c: ["run", _train_recipe(c, "chk-field", data=[{"path": str(c.data), "template": "{nope}"}]),
                    "--check"], ("nope",)),
    Case("run-check-seq-len", "run --check: train.seq_len beyond the model's positions",
         lambda c: ["run", _train_recipe(c, "chk-seq", seq_len=100000), "--check"],
         ("train.seq_len", "max_position_embeddings")),
    Case("run-check-loss-from", "run --check: a loss_from marker no document contains",
         lambda c: ["run", _train_recipe(c, "chk-lossfrom", data=[{"path": str(c.data), "template": TEMPLATE,
                                                                   "loss_from": "Réponse:"}]), "--check"],
         ("Réponse:",)),
    Case("run-check-no-tokenizer", "run --check: the model has no tokenizer",
         lambda c: ["run", _train_recipe(c, "chk-tok", model=str(_no_tokenizer(c, "rno-tok", c.pro))), "--check"],
         ("no tokenizer", "Copy")),
    Case("eval-seq-len", "eval --seq-len beyond the model's positions",
         lambda c: ["eval", c.pro, "--data", f"math={c.data}", "--template", TEMPLATE, "--out", c.out,
                    "--seq-len", "100000"], ("--seq-len", "max_position_embeddings")),
    # -- tokenizers --------------------------------------------------------------------
    Case("train-no-tokenizer", "train a model directory without a tokenizer",
         lambda c: _train(c, _no_tokenizer(c, "tno-tok", c.pro)), ("no tokenizer", "Copy")),
    Case("train-corrupt-tokenizer", "train a model whose tokenizer.json is cut short",
         lambda c: _train(c, _corrupt_tokenizer(c)), ("tokenizer cannot be loaded",)),
    Case("train-tokenizer-too-big", "a tokenizer with more tokens than the model's vocab_size",
         lambda c: _train(c, _big_tokenizer(c), None, "--trainable", "all"), ("vocab_size", "384 tokens")),
    Case("eval-no-tokenizer", "eval a model directory without a tokenizer",
         lambda c: ["eval", _no_tokenizer(c, "eno-tok"), "--data", f"math={c.data}", "--template", TEMPLATE,
                    "--out", c.out], ("no tokenizer",)),
    Case("eval-different-tokenizers", "eval side by side with a base of another tokenizer",
         lambda c: ["eval", c.pro, "--base", c.qwen, "--data", f"math={c.data}", "--template", TEMPLATE,
                    "--out", c.out], ("different tokenizers",)),
    # -- recipes (YAML) ------------------------------------------------------------------
    Case("recipe-alias-bomb", "a 900-byte YAML alias bomb", lambda c: ["run", _bomb(c), "--check"], ("aliases",)),
    Case("recipe-duplicate-key", "a key given twice in one mapping",
         lambda c: ["run", _recipe(c, "dup", "train:\n  lr: 1.0e-4\n  lr: 3.0e-4\n"), "--check"],
         ("'lr'", "twice")),
    Case("recipe-not-utf8", "a recipe in Latin-1",
         lambda c: ["run", (lambda p: (p.write_bytes("name: caf\u00e9\n".encode("latin-1")), p)[1])(
             c.root / "inputs" / "latin1.yaml"), "--check"], ("UTF-8",)),
    Case("recipe-too-large", "a recipe of several megabytes",
         lambda c: ["run", c.file("huge.yaml", "# " + "x" * (2 << 20) + "\n"), "--check"], ("too large",)),
    Case("recipe-is-directory", "a directory given as the recipe",
         lambda c: ["run", c.file("recipe-dir/x.txt", "x").parent, "--check"], ("recipe-dir",)),
    # -- silently wrong ----------------------------------------------------------------
    Case("train-loss-from-absent", "--loss-from text that occurs in no document",
         lambda c: _train(c, c.pro, None, "--loss-from", "Réponse:"), ("Réponse:", "no document")),
    Case("train-lora-r-zero", "--lora-r 0", lambda c: _train(c, c.pro, None, "--lora", "--lora-r", "0"),
         ("--lora-r",)),
    Case("train-lora-targets-nomatch", "--lora-targets that match no module",
         lambda c: _train(c, c.pro, None, "--lora", "--lora-targets", "qkv_proj"), ("qkv_proj", "q_proj")),
    # -- defaults that conflict with what the user set ---------------------------------
    Case("train-warmup-exceeds", "--warmup-steps above --max-steps (one line, no config dump)",
         lambda c: _train(c, c.pro, None, "--max-steps", "2", "--warmup-steps", "9"),
         ("--warmup-steps", "at most 2")),
    # -- checkpoints: checked against the config before planning -------------------------
    Case("surgery-wrong-shape", "a q_proj whose shape the config does not imply",
         lambda c: ["surgery", "llama-pro", _state_edit(c, "wrong-q", _wrong_q_shape), c.out, "--add", "1"],
         ("q_proj", "do not match config.json", "lmexpand verify")),
    Case("surgery-config-fewer-layers", "a config counting fewer layers than the tensors hold",
         lambda c: ["surgery", "llama-pro", _edit_config(c.model_copy("fewer-layers"), num_hidden_layers=3), c.out,
                    "--add", "1"], ("model.layers.3", "does not have")),
    Case("header-overlap", "a safetensors header whose tensors share bytes",
         lambda c: ["inspect", _overlapping_header(c)], ("overlap",)),
    Case("surgery-nan-computed", "a NaN in a source tensor the surgery computes from",
         lambda c: ["surgery", "moe", _state_edit(c, "nan-ffn", _nan_ffn), c.out, "--segments", "2"],
         ("non-finite", "up_proj", "nothing was written")),
    Case("surgery-nested-out-refused", "a refused surgery into missing parent directories creates none",
         lambda c: ["surgery", "llama-pro", _state_edit(c, "wrong-q", _wrong_q_shape), c.root / "a" / "b" / "c",
                    "--add", "1"], ("do not match",)),
    Case("eval-base-pickle", "eval --base of pickle-only weights without --allow-pickle",
         lambda c: ["eval", c.tiny, "--base", (lambda d: ((d / "model.safetensors").rename(d / "pytorch_model.bin"),
                                                          d)[1])(c.model_copy("pickle-base")),
                    "--data", f"math={c.data}", "--template", TEMPLATE, "--out", c.out], ("--allow-pickle",)),
    Case("upscale-seam-scale-nan", "upscale --seam-scale nan",
         lambda c: ["surgery", "upscale", c.tiny, c.out, "--drop", "1", "--seam-scale", "nan"],
         ("--seam-scale", "finite")),
    Case("train-min-lr-ratio-nan", "--min-lr-ratio nan", lambda c: _train(c, c.pro, None, "--min-lr-ratio", "nan"),
         ("--min-lr-ratio", "finite")),
    Case("moe-bias-gap-inf", "moe --bias-gap inf",
         lambda c: ["surgery", "moe", c.tiny, c.out, "--segments", "2", "--bias-gap", "inf"],
         ("--bias-gap", "finite")),
    Case("recipe-many-aliases", "a recipe with 1,500 alias references",
         lambda c: ["run", _recipe(c, "aliases", "a: &a 1\nb: [" + ", ".join(["*a"] * 1500) + "]\n"), "--check"],
         ("aliases",)),
    Case("recipe-duplicate-nested", "a key given twice inside a data entry",
         lambda c: ["run", _recipe(c, "dup-nested", "train:\n  model: " + str(c.pro) + "\n  data:\n    - path: "
                                   + str(c.data) + "\n      template: a\n      template: b\n"), "--check"],
         ("'template'", "twice")),
    Case("train-pickle", "train pickle-only weights without --allow-pickle",
         lambda c: _train(c, _pickle_copy(c, "pickle-train"), None, "--trainable", "all"), ("--allow-pickle",)),
    Case("export-pickle", "export pickle-only weights without --allow-pickle",
         lambda c: ["export", _pickle_copy(c, "pickle-export"), c.out], ("--allow-pickle",)),
    Case("eval-compare-pickle", "eval --compare of pickle-only weights without --allow-pickle",
         lambda c: ["eval", c.tiny, "--compare", f"old={_pickle_copy(c, 'pickle-compare')}", "--data",
                    f"math={c.data}", "--template", TEMPLATE, "--out", c.out], ("--allow-pickle",)),
    Case("train-out-parent-is-file", "train --out under a file",
         lambda c: _train(c, c.pro, None, out=c.file("train-file", "x") / "run"), ("parent", "is a file")),
    Case("eval-compare-other-tokenizer", "eval --compare a model of another tokenizer",
         lambda c: ["eval", c.tiny, "--compare", f"other={c.qwen}", "--data", f"math={c.data}", "--template",
                    TEMPLATE, "--out", c.out], ("different tokenizers", "other")),
    Case("run-check-eval-seq-len", "run --check: eval.seq_len beyond the model's positions",
         lambda c: ["run", _recipe(c, "chk-eval-seq", {
             "train": {"model": str(c.pro), "data": [{"path": str(c.data), "template": TEMPLATE}], "seq_len": 32},
             "eval": {"data": {"math": str(c.data)}, "template": TEMPLATE, "seq_len": 100000}}), "--check"],
         ("eval.seq_len", "max_position_embeddings")),
    Case("run-eval-out-is-base", "a recipe writing its eval report into the base model",
         lambda c: ["run", _recipe(c, "eval-into-base", {
             "train": {"model": str(c.pro), "data": [{"path": str(c.data), "template": TEMPLATE}], "seq_len": 32},
             "eval": {"data": {"math": str(c.data)}, "template": TEMPLATE, "base": str(c.tiny),
                      "out": str(c.tiny)}}), "--check"], ("eval.out", "eval.base")),
    Case("verify-overlap", "verify of a file whose tensors share bytes",
         lambda c: ["verify", _overlapping_header(c)], ("overlap",)),
    Case("train-config-fewer-layers", "train a model whose config counts fewer layers than its tensors",
         lambda c: _train(c, _edit_config(c.model_copy("train-fewer", c.pro), num_hidden_layers=5)),
         ("model.layers.5", "does not have")),
    # -- merge (mergekit YAML) --------------------------------------------------------------
    Case("merge-unknown-method", "a merge_method that does not exist",
         lambda c: ["merge", _merge(c, "m-method", {"merge_method": "tiess", "models": [{"model": str(c.tiny)}]}), c.out],
         ("merge_method", "Available:", "dare_ties")),
    Case("merge-misspelled-parameter", "a misspelled merge parameter (mergekit ignores it)",
         lambda c: ["merge", _merge(c, "m-param", {"merge_method": "ties", "base_model": str(c.tiny), "models": [
             {"model": str(c.model_copy("m-a")), "parameters": {"weight": 1, "densty": 0.5}}]}), c.out],
         ("'densty' is not a parameter of ties",)),
    Case("merge-missing-weight", "linear without weights",
         lambda c: ["merge", _merge(c, "m-weight", {"merge_method": "linear", "models": [
             {"model": str(c.tiny)}, {"model": str(c.model_copy("m-a"))}]}), c.out], ("weight of", "required")),
    Case("merge-density", "density outside [0, 1]",
         lambda c: ["merge", _merge(c, "m-density", {"merge_method": "ties", "base_model": str(c.tiny), "models": [
             {"model": str(c.model_copy("m-a")), "parameters": {"weight": 1, "density": 1.5}}]}), c.out],
         ("outside [0, 1]",)),
    Case("merge-della-epsilon", "della with density +- epsilon outside (0, 1)",
         lambda c: ["merge", _merge(c, "m-eps", {"merge_method": "della", "base_model": str(c.tiny), "models": [
             {"model": str(c.model_copy("m-a")), "parameters": {"weight": 1, "density": 0.9, "epsilon": 0.2}}]}),
             c.out], ("epsilon", "(0, 1)")),
    Case("merge-slerp-three", "slerp of three models",
         lambda c: ["merge", _merge(c, "m-slerp", {"merge_method": "slerp", "base_model": str(c.tiny),
                                                    "parameters": {"t": 0.5}, "models": [
             {"model": str(c.tiny)}, {"model": str(c.model_copy("m-a"))}, {"model": str(c.model_copy("m-b"))}]}),
             c.out], ("exactly 2 models",)),
    Case("merge-no-base", "ties without base_model",
         lambda c: ["merge", _merge(c, "m-nobase", {"merge_method": "ties", "models": [
             {"model": str(c.tiny), "parameters": {"weight": 1}}]}), c.out], ("needs base_model",)),
    Case("merge-duplicate", "the same model listed twice",
         lambda c: ["merge", _merge(c, "m-dup", {"merge_method": "linear", "models": [
             {"model": str(c.tiny), "parameters": {"weight": 1}}, {"model": str(c.tiny), "parameters": {"weight": 1}}]}),
             c.out], ("listed 2 times",)),
    Case("merge-vocab", "models with different vocabularies",
         lambda c: ["merge", _merge(c, "m-vocab", {"merge_method": "linear", "models": [
             {"model": str(c.tiny), "parameters": {"weight": 1}}, {"model": str(c.qwen), "parameters": {"weight": 1}}]}),
             c.out], ("qwen2",)),
    Case("merge-weights-zero", "normalized weights summing to 0",
         lambda c: ["merge", _merge(c, "m-zero", {"merge_method": "linear", "models": [
             {"model": str(c.tiny), "parameters": {"weight": 1}},
             {"model": str(c.model_copy("m-a")), "parameters": {"weight": -1}}]}), c.out], ("sum to 0",)),
    Case("merge-token-source", "a tokenizer.tokens source that is not a merged model",
         lambda c: ["merge", _merge(c, "m-union", {"merge_method": "linear", "tokenizer": {"source": "union", "tokens": {
             "<tool>": {"source": "other-model"}}}, "models": [
             {"model": str(c.tiny), "parameters": {"weight": 1}}]}), c.out], ("not one of the merged models",)),
    Case("merge-token-force", "tokenizer.tokens force: true without a source",
         lambda c: ["merge", _merge(c, "m-force", {"merge_method": "linear", "tokenizer": {"tokens": {
             "<tool>": {"force": True}}}, "models": [
             {"model": str(c.tiny), "parameters": {"weight": 1}}]}), c.out], ("give source",)),
    Case("merge-out-is-input", "a merge written into one of its inputs",
         lambda c: ["merge", _merge(c, "m-into", {"merge_method": "linear", "models": [
             {"model": str(c.model_copy("m-into-a")), "parameters": {"weight": 1}}]}), c.model_copy("m-into-a"),
             "--force"], ("m-into-a",)),
    Case("merge-config-not-mapping", "a merge file that is a YAML list",
         lambda c: ["merge", c.file("m-list.yaml", "- merge_method: linear\n"), c.out], ("YAML mapping",)),
    Case("merge-device", "a --device that is not one",
         lambda c: ["merge", _merge(c, "m-device", {"merge_method": "linear", "models": [
             {"model": str(c.tiny), "parameters": {"weight": 1}}]}), c.out, "--device", "tpu"],
         ("--device", "cpu, cuda, cuda:N or auto")),
    Case("merge-device-missing", "a CUDA device that is not there",
         lambda c: ["merge", _merge(c, "m-cuda", {"merge_method": "linear", "models": [
             {"model": str(c.tiny), "parameters": {"weight": 1}}]}), c.out, "--device", "cuda:99"],
         ("--device cuda:99", "--device cpu")),
    Case("merge-nearswap-three", "nearswap of three models",
         lambda c: ["merge", _merge(c, "m-nearswap", {"merge_method": "nearswap", "base_model": str(c.tiny),
                                                      "parameters": {"t": 0.001}, "models": [
             {"model": str(c.tiny)}, {"model": str(c.model_copy("m-a"))}, {"model": str(c.model_copy("m-b"))}]}),
             c.out], ("nearswap takes exactly 2 models", "the base and one other")),
    Case("extract-lora-vocab", "LoRA extraction from a model with another vocabulary",
         lambda c: ["extract-lora", c.qwen, c.tiny, c.out, "--rank", "2"], ("is a qwen2 model", "fine-tune of BASE")),
    Case("extract-lora-rank", "LoRA extraction of rank 0",
         lambda c: ["extract-lora", c.model_copy("xl-a"), c.tiny, c.out, "--rank", "0"], ("--rank", "x>=1")),
    Case("merge-multislerp-weight", "multislerp without weights",
         lambda c: ["merge", _merge(c, "m-mslerp", {"merge_method": "multislerp", "models": [
             {"model": str(c.tiny)}, {"model": str(c.model_copy("m-a"))}]}), c.out], ("weight of",)),

    # -- logit compositions and generate --------------------------------------------------
    Case("logit-sum-one-member", "a logit sum of a single model",
         lambda c: ["surgery", "logit-sum", c.tiny, c.out], ("at least 2 models",)),
    Case("logit-sum-other-tokenizer", "members with different tokenizers",
         lambda c: ["surgery", "logit-sum", c.tiny, c.qwen, c.out], ("vocabularies differ beyond padding",)),
    Case("logit-sum-weights-count", "a weight count that does not match the models",
         lambda c: ["surgery", "logit-sum", c.tiny, c.model_copy("ls-b"), c.out, "--weights", "1"],
         ("1 weights for 2 models",)),
    Case("logit-sum-weight-nan", "a NaN weight",
         lambda c: ["surgery", "logit-sum", c.tiny, c.model_copy("ls-b"), c.out, "--weights", "1,nan"],
         ("--weights",)),
    Case("proxy-negative-alpha", "proxy-tuning with a negative alpha",
         lambda c: ["surgery", "proxy-tune", c.tiny, c.model_copy("px-e"), c.model_copy("px-a"), c.out,
                    "--alpha", "-0.5"], ("--alpha", "greater than or equal to 0")),
    Case("contrastive-alpha-range", "a plausibility alpha above 1",
         lambda c: ["surgery", "contrastive", c.tiny, c.model_copy("cd-a"), c.out, "--alpha", "1.5"],
         ("--alpha", "less than or equal to 1")),
    Case("contrastive-negative-beta", "contrastive decoding with a negative beta",
         lambda c: ["surgery", "contrastive", c.tiny, c.model_copy("cd-a"), c.out, "--beta", "-1"], ("--beta",)),
    Case("co-llm-threshold", "a Co-LLM threshold above 1",
         lambda c: ["surgery", "co-llm", c.tiny, c.model_copy("co-a"), c.out, "--threshold", "1.5"],
         ("--threshold", "less than or equal to 1")),
    Case("co-llm-other-tokenizer", "a Co-LLM assistant with another tokenizer",
         lambda c: ["surgery", "co-llm", c.tiny, c.qwen, c.out], ("vocabularies differ beyond padding",)),
    Case("co-llm-missing-assistant", "a Co-LLM assistant that does not exist",
         lambda c: ["surgery", "co-llm", c.tiny, c.root / "no-assistant", c.out], ("no-assistant",)),
    Case("co-llm-init-on-plain-model", "--co-llm-init-steps on a model that is not Co-LLM",
         lambda c: ["train", "--model", c.pro, "--data", c.data, "--template", TEMPLATE, "--co-llm-init-steps", "5",
                    "--out", c.out], ("initialises a Co-LLM gate",)),
    Case("generate-threshold-plain-model", "--threshold on a model that is not Co-LLM",
         lambda c: ["generate", c.tiny, "--prompt", "hi", "--threshold", "0.5"], ("only for Co-LLM",)),
    Case("deep-fusion-marker-not-one-token", "a deep-fusion marker that is several tokens",
         lambda c: ["surgery", "deep-fusion", c.tiny, c.out, "--open", "```"], ("not a single token",)),
    Case("deep-fusion-layer-range", "a deep-fusion layer out of range",
         lambda c: ["surgery", "deep-fusion", c.tiny, c.out, "--open", "(", "--layers", "9"],
         ("layer 9 is out of range",)),
    Case("generate-no-prompt", "generate without a prompt", lambda c: ["generate", c.tiny], ("give a prompt",)),
    Case("generate-chat-no-template", "--chat on a tokenizer without a chat template",
         lambda c: ["generate", c.tiny, "--prompt", "hi", "--chat"], ("no chat template", "Drop --chat")),
    Case("generate-too-long", "more new tokens than the model has positions",
         lambda c: ["generate", c.tiny, "--prompt", "hi", "--max-new-tokens", "5000"], ("positions",)),
    Case("generate-missing-model", "generate from a directory that does not exist",
         lambda c: ["generate", c.root / "nowhere", "--prompt", "hi"], ("nowhere",)),

    # -- issue 33: non-finite values, run --check = the run's checks, bounds ---------------
    Case("merge-passthrough-nan", "passthrough (raw copies) of a model holding a NaN",
         lambda c: ["merge", _merge(c, "m-pass-nan", {"merge_method": "passthrough", "slices": [{"sources": [
             {"model": str(_state_edit(c, "nan-ffn", _nan_ffn)), "layer_range": [0, 4]}]}]}), c.out],
         ("model.layers.0.mlp.up_proj.weight", "NaN/Inf", "nothing was written")),
    Case("llama-pro-copies-nan", "LLaMA-Pro of a model holding a NaN in a copied tensor",
         lambda c: ["surgery", "llama-pro", _state_edit(c, "nan-ffn", _nan_ffn), c.out, "--add", "1"],
         ("model.layers.0.mlp.up_proj.weight", "NaN/Inf")),
    Case("export-nan", "export of a model holding a NaN",
         lambda c: ["export", _state_edit(c, "nan-ffn", _nan_ffn), c.out], ("model.layers.0.mlp.up_proj.weight",)),
    Case("composition-member-nan", "a proxy-tuning member holding a NaN",
         lambda c: ["surgery", "proxy-tune", c.tiny, _state_edit(c, "nan-ffn", _nan_ffn), c.model_copy("px-a"),
                    c.out], ("expert", "NaN/Inf", "model.layers.0.mlp.up_proj.weight")),
    Case("proxy-huge-alpha", "a proxy-tuning alpha so large the logits overflow",
         lambda c: ["surgery", "proxy-tune", c.tiny, c.model_copy("px-e"), c.model_copy("px-a"), c.out,
                    "--alpha", "1e36"], ("--alpha", "1000")),
    Case("logit-sum-huge-weight", "a logit-sum weight so large the logits overflow",
         lambda c: ["surgery", "logit-sum", c.tiny, c.model_copy("ls-b"), c.out, "--weights", "1,1e30"],
         ("--weights", "overflow")),
    Case("eval-nan-model", "eval of a model whose logits are NaN",
         lambda c: ["eval", _state_edit(c, "nan-ffn", _nan_ffn), "--data", f"math={c.data}", "--template", TEMPLATE,
                    "--out", c.out, "--seq-len", "32", "--no-samples"], ("not a number", "math", "verify")),
    Case("generate-nan-model", "generate from a model whose logits are NaN",
         lambda c: ["generate", _state_edit(c, "nan-ffn", _nan_ffn), "--prompt", "hi", "--max-new-tokens", "2"],
         ("NaN/Inf", "empty text")),
    Case("eval-out-not-empty", "eval into a non-empty --out without --force",
         lambda c: ["eval", c.tiny, "--data", f"math={c.data}", "--template", TEMPLATE,
                    "--out", c.file("eval-full/notes.txt", "x").parent], ("not empty", "--force")),
    Case("eval-no-text-field", "eval of JSONL records without the text field",
         lambda c: ["eval", c.tiny, "--data", f"math={c.data}", "--out", c.out], ("no field 'text'", "--text-field")),
    Case("eval-unclosed-brace", "an eval template with an unclosed {",
         lambda c: ["eval", c.tiny, "--data", f"math={c.data}", "--template", "Q: {question", "--out", c.out],
         ("--template",)),
    Case("run-check-merge-then-train", "a recipe training a merge with the default (empty) trainable set",
         lambda c: ["run", _recipe(c, "chk-merge-train", {
             "surgery": {"method": "merge", "args": {"config": str(_merge(c, "m-for-run", {
                 "merge_method": "linear", "models": [{"model": str(c.tiny), "parameters": {"weight": 1}}]}))}},
             "train": {"data": [{"path": str(c.data), "template": TEMPLATE}], "seq_len": 32}}), "--check"],
         ("train.trainable", "no new parameters", "trainable: all")),
    Case("run-check-composition-train", "a recipe training a composition that has nothing to train",
         lambda c: ["run", _recipe(c, "chk-cd-train", {
             "surgery": {"method": "contrastive", "source": [str(c.tiny), str(c.model_copy("cd-a"))]},
             "train": {"data": [{"path": str(c.data), "template": TEMPLATE}], "seq_len": 32}}), "--check"],
         ("train: nothing to train", "contrastive")),
    Case("run-check-contrastive-eval", "a recipe scoring the perplexity of contrastive decoding",
         lambda c: ["run", _recipe(c, "chk-cd-eval", {
             "surgery": {"method": "contrastive", "source": [str(c.tiny), str(c.model_copy("cd-a"))]},
             "eval": {"data": {"math": str(c.data)}, "template": TEMPLATE}}), "--check"],
         ("eval:", "perplexity is infinite")),
    Case("run-check-marker-tokens", "a recipe's deep-fusion marker that is several tokens",
         lambda c: ["run", _recipe(c, "chk-df-marker", {
             "surgery": {"method": "deep-fusion", "source": str(c.tiny), "args": {"open": "```"}}}), "--check"],
         ("surgery.args.open", "not a single token")),
    Case("run-check-eval-text-field", "a recipe's eval data without its text field",
         lambda c: ["run", _recipe(c, "chk-eval-field", {
             "surgery": {"method": "llama-pro", "source": str(c.tiny), "args": {"add": 1}},
             "eval": {"data": {"math": str(c.data)}}}), "--check"], ("eval.data.math", "eval.text_field")),
    Case("run-check-soup-no-eval-data", "a recipe's greedy soup without held-out text to rank its candidates",
         lambda c: ["run", _recipe(c, "chk-soup", {"surgery": {"method": "merge", "args": {"config": str(_merge(
             c, "m-soup", {"merge_method": "greedy_soup",
                           "models": [{"model": str(c.tiny)}, {"model": str(c.model_copy("soup-b"))}]}))}}}),
                    "--check"], ("surgery.eval_data", "greedy_soup")),
    Case("run-check-eval-data-not-merge", "a recipe's surgery.eval_data on a method that reads no held-out text",
         lambda c: ["run", _recipe(c, "chk-eval-data", {"surgery": {
             "method": "llama-pro", "source": str(c.tiny), "args": {"add": 1}, "eval_data": str(c.data)}}), "--check"],
         ("surgery.eval_data", "Remove it")),
    Case("merge-too-many-layers", "a passthrough merge past the layer limit",
         lambda c: ["merge", _merge(c, "m-layers", {"merge_method": "passthrough", "slices": [
             {"sources": [{"model": str(c.tiny), "layer_range": [0, 4]}]} for _ in range(2600)]}), c.out, "--dry-run"],
         ("num_hidden_layers = 10,400", "10,000")),
    Case("merge-other-tokenizer", "a merge of models whose tokenizers map tokens to other ids",
         lambda c: ["merge", _merge(c, "m-tok", {"merge_method": "linear", "models": [
             {"model": str(c.tiny), "parameters": {"weight": 1}},
             {"model": str(_swapped_tokenizer(c)), "parameters": {"weight": 1}}]}), c.out],
         ("different tokenizers", "token->id pairs differ")),
    Case("config-no-layers", "a config without num_hidden_layers",
         lambda c: ["inspect", _config_without(c, "no-layers", "num_hidden_layers")],
         ("no num_hidden_layers", "Fix config.json")),
    Case("export-corrupt-results", "export --eval of a results.json that is not JSON",
         lambda c: ["export", c.tiny, c.out, "--eval", c.file("bad-eval/results.json", "{not json")],
         ("--eval", "not a readable results.json")),
    Case("generate-undecodable-prompt", "a prompt with bytes that are not UTF-8",
         lambda c: ["generate", c.tiny, "--prompt", b"caf\xff".decode("utf-8", "surrogateescape")],
         ("--prompt", "not valid UTF-8")),
    Case("generate-broken-chat-template", "--chat with a chat template that is not valid Jinja",
         lambda c: ["generate", _chat_template(c, "bad-jinja", "{% for m in messages %}{{ m.content }"),
                    "--prompt", "hi", "--chat"], ("not valid Jinja", "line 1")),
    Case("resume-other-seq-len", "--resume with another --seq-len than the run's",
         lambda c: _train(c, c.pro, None, "--resume", "--seq-len", "48", out=_started_run(c)),
         ("--resume", "--seq-len 48", "the run used 32")),
    Case("co-llm-init-steps-huge", "--co-llm-init-steps beyond the limit",
         lambda c: _train(c, c.pro, None, "--co-llm-init-steps", "100000"), ("--co-llm-init-steps", "10000")),
    Case("recipe-many-unknown-keys", "a recipe with thousands of unknown keys (a short message)",
         lambda c: ["run", _recipe(c, "many-keys", {"workdir": "w", **{f"key{i}": i for i in range(5000)}}),
                    "--check"], ("unknown key", "and 4,995 more problem(s)")),

]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def ctx(tiny_llama, tiny_pro, tmp_path_factory) -> Ctx:
    from tests.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("bad-inputs")
    data = root / "inputs" / "data.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("\n".join(GSM8K_TRAIN.read_text().splitlines()[:60]) + "\n")
    qwen = build_tiny_model("qwen2", root / "inputs" / "qwen-vocab", vocab_size=384)
    return Ctx(root=root, tiny=tiny_llama, pro=tiny_pro, qwen=qwen, data=data, out=root / "out")


LIBRARY_LOG = "[a library's log]"


def run_case(argv: list, c: Ctx) -> tuple[int, str]:
    """Run the CLI in this process on ``argv`` (built by the case beforehand)."""
    import contextlib
    import io

    import datasets  # noqa: F401  (the libraries whose log handlers are made on import)
    import transformers  # noqa: F401

    from lmexpand.cli import main

    argv = [str(a) for a in argv]

    err = io.StringIO()
    # a library's log handler holds the stream it found when it was made (datasets',
    # transformers'): point every one at this case's stderr too, so a line a library logs is
    # part of the message the case checks, as it is for a user on a terminal
    handlers = [h for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
                if isinstance(lg, logging.Logger) for h in lg.handlers
                if type(h) is logging.StreamHandler]
    # (assigned, not setStream: that flushes the old stream, which may be an earlier test's
    # capture file, closed by now)
    saved = [(h.stream, h.formatter) for h in handlers]
    for h in handlers:  # marked, so that the case can tell a library's line from lmexpand's
        h.stream = err
        h.setFormatter(logging.Formatter(f"{LIBRARY_LOG} %(name)s: %(message)s"))
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        for h, (stream, fmt) in zip(handlers, saved):
            h.stream = stream
            h.setFormatter(fmt)
    return code, err.getvalue()


def _message(stderr: str) -> str:
    """The error paragraph: from the ``error:`` line (or click's usage block) to the end;
    what came before is progress and the parameter table."""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("error:", "Usage:")):
            return "\n".join(lines[i:]).strip()
    return stderr.strip()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx: Ctx, tiny_llama, tiny_pro):
    if ctx.out.exists():
        shutil.rmtree(ctx.out)
    argv = case.argv(ctx)  # builds the case's inputs: they may be written, the run may not write
    before = _snapshot(ctx.root)
    src_before = (_snapshot(tiny_llama), _snapshot(tiny_pro))
    code, stderr = run_case(argv, ctx)
    msg = _message(stderr)
    assert code == 2, f"exit {code}: {stderr}"
    assert "Traceback" not in stderr, stderr
    assert LIBRARY_LOG not in stderr, f"a library's own log line reaches the user beside the error: {stderr}"
    assert msg.lower().startswith("error:") or "Usage:" in msg, msg
    body = msg.split("Error:", 1)[-1] if "Usage:" in msg else msg
    assert "\n\n" not in body.strip(), f"more than one paragraph: {msg}"
    for needle in case.needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    doubled = re.search(r"\b([a-z]{2,}) \1\b", msg)  # "the model model's" (usage strings are upper case)
    assert doubled is None, f"doubled word {doubled.group(0)!r} in: {msg}"
    assert _snapshot(ctx.root) == before, "something was written"
    assert (_snapshot(tiny_llama), _snapshot(tiny_pro)) == src_before
    assert not ctx.out.exists()


def test_catalogue_is_large_and_documented():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 120
    doc = (REPO / "docs" / "errors.md").read_text()
    undocumented = [i for i in ids if f"`{i}`" not in doc]
    assert not undocumented, f"add to docs/errors.md (python -m tests.test_bad_inputs): {undocumented}"


def write_docs() -> None:
    """Run every case and write docs/errors.md with the messages they get."""
    import tempfile

    import tests.conftest  # noqa: F401  (offline environment)
    from lmexpand.cli import main
    from tests.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tiny = build_tiny_model("llama", root / "models" / "llama")
        pro = root / "models" / "pro"
        assert main(["-q", "surgery", "llama-pro", str(tiny), str(pro), "--add", "2"]) == 0
        (root / "case").mkdir()
        data = root / "case" / "inputs" / "data.jsonl"
        data.parent.mkdir(parents=True)
        data.write_text("\n".join(GSM8K_TRAIN.read_text().splitlines()[:60]) + "\n")
        qwen = build_tiny_model("qwen2", root / "case" / "inputs" / "qwen-vocab", vocab_size=384)
        c = Ctx(root=root / "case", tiny=tiny, pro=pro, qwen=qwen, data=data, out=root / "case" / "out")
        rows = []
        for case in CASES:
            code, stderr = run_case(case.argv(c), c)
            msg = _message(stderr).replace(str(root / "case"), "<dir>").replace(str(root / "models"), "<models>")
            msg = " ".join(msg.split())
            cell = msg.replace("|", "\\|")
            rows.append(f"| `{case.id}` | {case.what} | {code} | {cell} |")
    text = [
        "# Errors: the bad-input catalogue",
        "",
        "Every bad input below is a test in `tests/test_bad_inputs.py`: the command exits with code 2, prints",
        "one paragraph that names the problem and the fix, no Python traceback, and writes nothing (inputs",
        "and outputs are compared before and after). Exit code 1 with a traceback is reserved for bugs in",
        "lmexpand. Regenerate this table with `.venv/bin/python -m tests.test_bad_inputs`",
        "(`<dir>` stands for the test's directory, `<models>` for its tiny models).",
        "",
        f"{len(rows)} cases.",
        "",
        "| case | bad input | exit | message |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    (REPO / "docs" / "errors.md").write_text("\n".join(text))
    print(f"wrote docs/errors.md ({len(rows)} cases)")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    write_docs()
