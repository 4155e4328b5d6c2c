"""Which models a shared front end (the app) may load: registry names, the model it was started
with, and local folders under an allowed models root; anything else only when its operator
allows any model (``workbench app --allow-any-model``)."""

from __future__ import annotations

from pathlib import Path

from workbench.errors import InputError
from workbench.registry import REGISTRY


def check_model_allowed(name: str, *, models_root: str | Path | None = None, allow_any: bool = False,
                        also: tuple[str, ...] = ()) -> str:
    """Return ``name`` if a client may load it, else raise :class:`InputError`.

    Args:
        name: what the client asked for (registry name, folder, hub id).
        models_root: folders whose real path (symlinks resolved) lies under this folder are allowed.
        allow_any: allow everything :func:`workbench.model.load_model` accepts.
        also: further names allowed as given (the model the app was started with).
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError("no model chosen: pick one from the list or type a local folder")
    name = name.strip()
    if allow_any or name in REGISTRY or name in also:
        return name
    if models_root is not None:
        root = Path(models_root).expanduser().resolve()
        folder = Path(name).expanduser()
        if not folder.is_absolute():
            folder = root / folder
        real = folder.resolve()
        if real != root and root in real.parents and real.is_dir():
            return str(real)
        where = f"a folder under {root}"
    else:
        where = "no local folders (the app was started without --models-root)"
    raise InputError(f"model '{name}' is not allowed here: this app loads registry models "
                     f"({', '.join(sorted(REGISTRY))}) and {where}; start it with --allow-any-model to lift this")
