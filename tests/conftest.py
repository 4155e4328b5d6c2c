"""Shared fixtures: tiny random models (fast, unit tests) and the real SmolLM2 (cached)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# the session fixtures below keep four models alive; a larger cache avoids reloading them (default 2)
os.environ.setdefault("WORKBENCH_MODEL_CACHE", "8")


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


@pytest.fixture(scope="module")
def ws():
    """One app workspace (tiny-llama default) per test module, its job threads stopped after."""
    from app.web.services.workspace import Workspace

    workspace = Workspace(default_model="tiny-llama")
    yield workspace
    workspace.jobs.shutdown()


@pytest.fixture(scope="module")
def analysis(ws, tiny_llama):
    """The app's analysis of app_support.PROMPT on tiny-llama."""
    from app.web.services import analysis as svc
    from app_support import PROMPT, run_job

    return ws.analyses.get(run_job(ws, svc.start_analysis(ws, "tiny-llama", PROMPT))["key"])
