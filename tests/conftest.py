"""Shared fixtures: tiny random models of every family, built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LMEXPAND_NO_PROGRESS", "1")

import pytest  # noqa: E402

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
