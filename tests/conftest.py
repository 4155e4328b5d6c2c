"""Shared fixtures: tiny random models (fast, unit tests) and the real SmolLM2 (cached)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama():
    from workbench.model import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_bert():
    from workbench.model import load_model

    return load_model("tiny-bert")


@pytest.fixture(scope="session")
def tiny_gpt2():
    from workbench.model import load_model

    return load_model("tiny-gpt2")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M, pulled and converted once into the workbench cache, loaded once per session."""
    from workbench.model import load_model

    return load_model("smollm2-135m")
