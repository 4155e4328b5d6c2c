"""Hugging Face hub ids resolve from the standard HF cache, offline, and never touch the network."""

import os
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

import workbench
from workbench.errors import ModelNotFoundError
from workbench.hub import hub_cache_dir, is_hub_id, split_hub_id
from workbench.registry import REGISTRY, resolve_spec
from workbench.tiny import build_tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """A HF_HOME whose hub cache holds ``org/name`` (tiny Llama) in the standard blobs/refs/snapshots layout."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / COMMIT
    build = home / "build"
    build_tiny_model(REGISTRY["tiny-llama"].tiny_config, build)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, src in enumerate(sorted(p for p in build.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{i:040x}"
        src.rename(blob)
        (snapshot / src.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


@pytest.fixture
def offline_hub(hf_home, monkeypatch) -> Path:
    """Point the environment (and huggingface_hub's import-time constants) at ``hf_home``, offline."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def test_hub_id_syntax():
    assert is_hub_id("org/name") and is_hub_id("HuggingFaceTB/SmolLM2-135M@main")
    assert is_hub_id("org/name@refs/pr/1")
    for not_id in ("gpt-17", "./org/name", "/abs/path", "org/", "/name", "a/b/c", "org--x/name", "org/na..me"):
        assert not is_hub_id(not_id), not_id
    assert split_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert split_hub_id("org/name") == ("org/name", None)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert hub_cache_dir() == tmp_path / "direct"


def test_cached_hub_id_resolves_to_the_snapshot(offline_hub):
    snapshot = offline_hub / "hub" / "models--org--name" / "snapshots" / COMMIT
    assert Path(resolve_spec("org/name")).resolve() == snapshot.resolve()
    assert Path(resolve_spec(f"org/name@{COMMIT}")).resolve() == snapshot.resolve()
    assert Path(resolve_spec("org/name@main")).resolve() == snapshot.resolve()


def test_cached_hub_id_loads(offline_hub):
    model = workbench.load_model("org/name")
    assert model.n_layers == 2 and model.causal
    assert model.name == "org/name"


def test_uncached_hub_id_fails_fast_offline(offline_hub, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as err:
        resolve_spec("org/missing")
    message = str(err.value)
    assert "org/missing" in message and "cache" in message and str(offline_hub / "hub") in message
    assert "HF_HUB_OFFLINE" in message and "hf download org/missing" in message and "\n" not in message
    assert time.monotonic() - start < 2
    with pytest.raises(ModelNotFoundError, match="org/name@v9.*--revision v9"):
        resolve_spec("org/name@v9")


def test_uncached_hub_id_with_env_only_offline(offline_hub, monkeypatch):
    """HF_HUB_OFFLINE set after huggingface_hub was imported is still honoured."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelNotFoundError, match="offline mode is set"):
        resolve_spec("org/missing")


def test_local_folder_wins_over_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_spec("org/name") == (tmp_path / "org" / "name").resolve()


def test_unknown_plain_name_mentions_hub_ids():
    with pytest.raises(ModelNotFoundError, match="unknown model 'gpt-17'.*local Hugging Face folder.*'org/name'"):
        resolve_spec("gpt-17")
