"""Shared fixtures: tiny random models of every family, built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LMEXPAND_NO_PROGRESS", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist, each worker gets its share of the cores (torch's threads, and every
    subprocess's through OMP_NUM_THREADS): two workers with torch's default of one thread per core
    each would put twice as many spinning OpenMP threads as cores on a compute-heavy test."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return
    threads = max(1, (os.cpu_count() or 1) // int(workerinput.get("workercount", 1)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


# The files that take longest (whole minutes each: the results pipeline on tiny models, the
# real-SmolLM2 MoE training, the shipped recipes, the distributed trainer). Under xdist's
# `--dist loadfile` a worker takes whole files in collection order, so these go first: started
# last, the longest one would run alone on one core after the other worker has finished.
LONGEST_FIRST = ("test_results_pipeline.py", "test_moe.py", "test_train_distributed.py", "test_train_stages.py",
                 "test_merge.py", "test_recipes.py", "test_lm_eval.py", "test_bench_gpu.py", "test_calm.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order inside a file kept

from tests.tiny import TINY_FAMILIES, build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session", params=sorted(TINY_FAMILIES))
def tiny_model(request, tiny_root) -> Path:
    """A saved tiny random model dir, one per family variant."""
    return build_tiny_model(request.param, tiny_root / request.param)


@pytest.fixture(scope="session")
def tiny_llama(tiny_root) -> Path:
    return build_tiny_model("llama", tiny_root / "llama")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The embedded SmolLM2 in the user's cache (converted once per machine)."""
    from lmexpand.checkpoint.sources import resolve_source

    return resolve_source("smollm2-135m")


# Real text shipped in the repo (attributed in recipes/data/*/SOURCE.md), so the suite runs
# from any clone; ../shared is used only by benchmarks and the shipped recipes.
DATA = REPO / "recipes" / "data"
GSM8K_TRAIN = DATA / "gsm8k-subset" / "train.jsonl"
GSM8K_TEST = DATA / "gsm8k-subset" / "test.jsonl"
GENERAL_TEXT = DATA / "openstax-sample" / "valid.txt"


@pytest.fixture(scope="session")
def gsm8k_small(tmp_path_factory) -> Path:
    """The first 400 GSM8K training problems (real text, small enough to be fast)."""
    path = tmp_path_factory.mktemp("data") / "gsm8k-400.jsonl"
    lines = GSM8K_TRAIN.read_text().splitlines()[:400]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_pro(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama expanded by LLaMA-Pro (+2 blocks), through the CLI."""
    from lmexpand.cli import main

    out = tmp_path_factory.mktemp("pro") / "pro"
    assert main(["surgery", "llama-pro", str(tiny_llama), str(out), "--add", "2"]) == 0
    return out
