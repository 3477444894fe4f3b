"""Streaming reader + writer: bitwise copies, sharding, atomicity, refusals, faults."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lmexpand.checkpoint import CheckpointReader, copy_checkpoint
from lmexpand.checkpoint import writer as writer_mod
from lmexpand.errors import CheckpointError, DiskFullError, SourceError, TargetError


def _all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(model_dir)
    return {t.name: reader.get_tensor(t.name).clone() for t in reader}


def _dir_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_reader_sees_headers_only(tiny_model):
    reader = CheckpointReader(tiny_model)
    with safe_open(tiny_model / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(reader.tensors)
        for name in f.keys():
            sl = f.get_slice(name)
            assert tuple(sl.get_shape()) == reader.info(name).shape
            assert reader.info(name).nbytes == f.get_tensor(name).numel() * f.get_tensor(name).element_size()
    assert reader.total_bytes == sum(t.nbytes for t in reader)
    assert reader.family is not None


def test_copy_is_bitwise_and_loads_with_stock_transformers(tiny_model, tmp_path):
    out = copy_checkpoint(CheckpointReader(tiny_model), tmp_path / "copy")
    src, dst = _all_tensors(tiny_model), _all_tensors(out)
    assert src.keys() == dst.keys()
    for name in src:
        assert src[name].dtype == dst[name].dtype
        assert torch.equal(src[name], dst[name]), name
    assert (out / "generation_config.json").is_file()
    assert torch.equal(_logits(tiny_model), _logits(out))


def test_sharded_copy_writes_index_and_round_trips(tiny_llama, tmp_path):
    out = copy_checkpoint(CheckpointReader(tiny_llama), tmp_path / "sharded", max_shard_size=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == CheckpointReader(tiny_llama).total_bytes
    # the sharded copy reads back bitwise, and copying it back to one file too
    again = copy_checkpoint(CheckpointReader(out), tmp_path / "single")
    assert not (again / "model.safetensors.index.json").exists()
    a, b = _all_tensors(tiny_llama), _all_tensors(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(tiny_llama), _logits(out))


def test_mixed_dtypes_are_aligned_and_exact(tmp_path):
    from lmexpand.checkpoint import Computed, OutputTensor, TensorSlot, write_checkpoint

    tensors = {
        "a": torch.randn(3, dtype=torch.bfloat16),
        "b": torch.randn(5, 3, dtype=torch.float32),
        "c": torch.arange(7, dtype=torch.int64),
        "d": torch.tensor([True, False, True]),
        "e": torch.randn(1, dtype=torch.float16),
    }
    from lmexpand.checkpoint.reader import st_dtype_of

    outs = [OutputTensor(TensorSlot(k, st_dtype_of(v), tuple(v.shape)), Computed(lambda v=v: v)) for k, v in tensors.items()]
    out = write_checkpoint(tmp_path / "mixed", outs, files={"config.json": b"{}"})
    with safe_open(out / "model.safetensors", framework="pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    for info in CheckpointReader(out, need_family=False):
        item = torch.empty(0, dtype=getattr(torch, {"BF16": "bfloat16", "F32": "float32", "I64": "int64", "BOOL": "bool", "F16": "float16"}[info.dtype])).element_size()
        assert info.offset % item == 0, info


def test_plan_promise_mismatch_is_caught(tmp_path):
    from lmexpand.checkpoint import Computed, OutputTensor, TensorSlot, write_checkpoint

    bad = [OutputTensor(TensorSlot("w", "F32", (2, 2)), Computed(lambda: torch.zeros(3)))]
    with pytest.raises(CheckpointError, match="promised"):
        write_checkpoint(tmp_path / "bad", bad, files={"config.json": b"{}"})
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".bad*"))


def test_target_refusals(tiny_llama, tmp_path):
    reader = CheckpointReader(tiny_llama)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    with pytest.raises(TargetError, match="not empty.*--force"):
        copy_checkpoint(reader, existing)
    assert (existing / "keep.txt").read_text() == "precious"
    with pytest.raises(TargetError, match="inside the source"):
        copy_checkpoint(reader, tiny_llama / "sub")
    # replacing a dir that holds the source would destroy it
    with pytest.raises(TargetError, match="inside the output"):
        copy_checkpoint(reader, tiny_llama.parent, force=True)
    # --force replaces atomically
    copy_checkpoint(reader, existing, force=True)
    assert not (existing / "keep.txt").exists() and (existing / "model.safetensors").is_file()
    # an empty existing dir is fine without --force
    empty = tmp_path / "empty"
    empty.mkdir()
    copy_checkpoint(reader, empty)


def test_disk_full_during_write_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    before = _dir_digest(tiny_llama)
    written = {"n": 0}
    real_write = writer_mod._write_all
    real_copy = writer_mod._copy_range

    def failing_write(fd, data):
        written["n"] += 1
        if written["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fd, data)

    def failing_copy(src_fd, dst_fd, offset, count, *rest):
        written["n"] += 1
        if written["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_copy(src_fd, dst_fd, offset, count, *rest)

    monkeypatch.setattr(writer_mod, "_write_all", failing_write)
    monkeypatch.setattr(writer_mod, "_copy_range", failing_copy)
    with pytest.raises(DiskFullError, match="disk filled up.*partial output was removed"):
        copy_checkpoint(CheckpointReader(tiny_llama), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left
    assert _dir_digest(tiny_llama) == before


def test_io_error_is_reported_and_cleaned(tiny_llama, tmp_path, monkeypatch):
    def eio(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer_mod, "_copy_range", eio)
    with pytest.raises(TargetError, match="I/O error"):
        copy_checkpoint(CheckpointReader(tiny_llama), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_free_space_is_checked_before_writing(tiny_llama, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(writer_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DiskFullError, match="only 1.00 KB is free"):
        copy_checkpoint(CheckpointReader(tiny_llama), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_dirs_are_cleaned(tiny_llama, tmp_path):
    dead_pid = 2**22 + 12345  # above pid_max defaults: never alive
    stale = tmp_path / f".out.lmexpand-partial-{dead_pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    copy_checkpoint(CheckpointReader(tiny_llama), tmp_path / "out")
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_truncated_shard_is_refused(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    shard = bad / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated shard.*100 missing"):
        CheckpointReader(bad)


def test_index_naming_missing_shard_is_refused(tiny_llama, tmp_path):
    out = copy_checkpoint(CheckpointReader(tiny_llama), tmp_path / "sharded", max_shard_size=60_000)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{victim.name}', which is missing"):
        CheckpointReader(out)


def test_hostile_index_pointing_outside_is_refused(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    names = list(CheckpointReader(tiny_llama).tensors)
    (bad / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "../../etc/passwd" for n in names}})
    )
    with pytest.raises(CheckpointError, match="outside the model directory"):
        CheckpointReader(bad)


def test_pickle_is_refused_unless_allowed(tiny_llama, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_llama / "config.json", pickled)
    torch.save(_all_tensors(tiny_llama), pickled / "pytorch_model.bin")
    with pytest.raises(SourceError, match="pickle.*--allow-pickle"):
        CheckpointReader(pickled)
    reader = CheckpointReader(pickled, allow_pickle=True)
    out = copy_checkpoint(reader, tmp_path / "converted")
    a, b = _all_tensors(tiny_llama), _all_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_weights_and_no_config(tmp_path, tiny_llama):
    with pytest.raises(SourceError, match="no config.json"):
        CheckpointReader(tmp_path)
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(tiny_llama / "config.json", d)
    with pytest.raises(SourceError, match="no weights"):
        CheckpointReader(d)


def test_header_claiming_huge_size_is_refused(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    shard = bad / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = (10**15).to_bytes(8, "little")
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or not safetensors"):
        CheckpointReader(bad)


def test_writer_fsyncs_and_renames_into_place(tiny_llama, tmp_path, monkeypatch):
    """The target only ever appears complete: at rename time every shard is in the temp dir."""
    seen = {}
    real_rename = os.rename

    def spy(src, dst):
        if Path(dst).name == "out":
            seen["files"] = sorted(p.name for p in Path(src).iterdir())
            seen["target_existed"] = Path(dst).exists()
        return real_rename(src, dst)

    monkeypatch.setattr(writer_mod.os, "rename", spy)
    copy_checkpoint(CheckpointReader(tiny_llama), tmp_path / "out")
    assert "model.safetensors" in seen["files"] and "config.json" in seen["files"]
    assert seen["target_existed"] is False


def test_shards_are_balanced_and_within_the_limit():
    from lmexpand.checkpoint.safetensors_format import TensorSlot
    from lmexpand.checkpoint.writer import plan_shards

    def sizes(shards):
        return [sum(s.nbytes for s in shard) for shard in shards]

    same = [TensorSlot(f"t{i}", "U8", (100,)) for i in range(10)]
    shards = plan_shards(same, 400)  # greedy filling: 400 + 400 + 200
    assert sizes(shards) == [300, 400, 300] or sorted(sizes(shards)) == [300, 300, 400]
    assert [s.name for shard in shards for s in shard] == [s.name for s in same]  # order kept
    mixed = [TensorSlot("a", "U8", (700,)), *[TensorSlot(f"b{i}", "U8", (50,)) for i in range(8)],
             TensorSlot("c", "U8", (900,))]
    shards = plan_shards(mixed, 500)
    assert all(len(sh) == 1 or sz <= 500 for sh, sz in zip(shards, sizes(shards)))
    assert sum(sizes(shards)) == 2000 and [s.name for sh in shards for s in sh] == [s.name for s in mixed]
    assert len(plan_shards(same, 10**9)) == 1 and plan_shards([], 10) == [[]]


def test_recorded_hashes_are_the_files_sha256_for_every_kind_of_tensor(tiny_llama, tmp_path):
    """Raw copies, holes and computed tensors, over several shards hashed in parallel from the
    plan's bytes: each recorded sha256 is what sha256sum prints for the finished file."""
    from lmexpand.checkpoint.safetensors_format import TensorSlot
    from lmexpand.checkpoint.writer import Computed, OutputTensor, RawCopy, Zeros, sha256_file, write_checkpoint

    reader = CheckpointReader(tiny_llama)
    tensors = []
    for i, t in enumerate(reader):
        slot = TensorSlot(t.name, t.dtype, tuple(t.shape))
        kind = i % 3
        producer = RawCopy(t) if kind == 0 else Zeros() if kind == 1 else \
            Computed(lambda name=t.name: reader.get_tensor(name) * 2)
        tensors.append(OutputTensor(slot, producer))
    lineage = json.dumps({"lmexpand_version": "test"}).encode()
    out = write_checkpoint(tmp_path / "out", tensors, files={"lmexpand.json": lineage,
                                                             "config.json": tiny_llama / "config.json"},
                           max_shard_size=60_000, sources=[tiny_llama])
    shards = json.loads((out / "lmexpand.json").read_text())["shards"]
    assert len(shards) >= 3 and set(shards) == {p.name for p in out.glob("*.safetensors")}
    for name, rec in shards.items():
        assert rec == {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        first = next(iter(f.keys()))
        assert f.get_tensor(first).shape == reader.get_tensor(first).shape
