"""Hugging Face hub ids (``org/name[@revision]``) as model names, resolved to cached snapshot folders.

The cache is the standard Hugging Face one (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``), read from the
environment at call time. The cache is tried first, so cached models load offline; the network is
used only when the model is not cached and offline mode (``HF_HUB_OFFLINE=1``) is not set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from workbench.errors import ModelNotFoundError

# Files a model folder needs: config, tokenizer, weights (safetensors only; no remote code).
ALLOW_PATTERNS: list[str] = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_HUB_ID_RE = re.compile(rf"({_PART}/{_PART})(?:@([A-Za-z0-9._/-]+))?")
_TRUE = {"1", "on", "yes", "true"}


def is_hub_id(name: str) -> bool:
    """True when ``name`` has the form ``org/name`` or ``org/name@revision``."""
    return isinstance(name, str) and _HUB_ID_RE.fullmatch(name) is not None and "--" not in name and ".." not in name


def split_hub_id(name: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; the revision is None when absent."""
    match = _HUB_ID_RE.fullmatch(name)
    if match is None:
        raise ModelNotFoundError(f"'{name}' is not a Hugging Face hub id: use the form org/name or org/name@revision")
    return match.group(1), match.group(2)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment now (as ``huggingface_hub.constants`` does at import)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expandvars(env)).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        home = os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set now or was set when huggingface_hub loaded."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def resolve_hub_model(name: str) -> Path:
    """Local snapshot folder of hub id ``name`` (``org/name[@revision]``), downloading it if needed and allowed.

    Raises:
        ModelNotFoundError: not cached and the hub is unreachable or offline mode is set; or the repo
            or revision does not exist on the hub.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError, RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = split_hub_id(name)
    cache = hub_cache_dir()
    kwargs = dict(revision=revision, cache_dir=str(cache), allow_patterns=ALLOW_PATTERNS)
    where = "in the Hugging Face cache"
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
    except IncompleteSnapshotError:
        where = "completely in the Hugging Face cache"  # an interrupted download: complete it below
    except LocalEntryNotFoundError:
        pass  # not cached: try the hub below
    except ValueError as err:  # invalid repo id / revision for huggingface_hub
        raise ModelNotFoundError(f"'{name}' is not a valid Hugging Face hub id ({err}): "
                                 "use the form org/name or org/name@revision") from None
    at = f"{repo_id}@{revision}" if revision else repo_id
    fix = (f"run once online, or 'hf download {repo_id}"
           f"{f' --revision {revision}' if revision else ''}', or pass a local Hugging Face folder")
    if hub_offline():
        raise ModelNotFoundError(
            f"hub model '{at}' is not {where} ({cache}) and offline mode is set "
            f"(HF_HUB_OFFLINE=1): {fix}"
        )
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"revision '{revision}' of hub model '{repo_id}' does not exist: "
                                 "check the branch, tag or commit after '@'") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"hub model '{repo_id}' not found on the Hugging Face hub (or it is private/gated): "
            "check the id, run 'hf auth login' for private or gated models, or pass a local Hugging Face folder"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}" if str(err) else type(err).__name__
        raise ModelNotFoundError(
            f"hub model '{at}' is not {where} ({cache}) and the hub could not be reached "
            f"({reason}): {fix}"
        ) from None
