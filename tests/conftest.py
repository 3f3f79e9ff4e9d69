"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random model + SmolLM2 tokenizer checkpoint (``prepare_base("tiny-random")``), built once."""
    from troupe.modeling import prepare_base

    return prepare_base("tiny-random", tmp_path_factory.mktemp("tiny_model"))
