"""Parse and check ``--device`` / ``--dtype`` values before a model is loaded."""

from __future__ import annotations

import re

import torch

from workbench.errors import InputError

DTYPE_CHOICES: tuple[str, ...] = ("float32", "bfloat16", "float16")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_SUPPORTED_DTYPES = frozenset(_DTYPES.values())
_DEVICE_RE = re.compile(r"(cpu|cuda)(?::(\d+))?")
_DEVICE_CHOICES = "'cpu', 'cuda' or 'cuda:N'"


def parse_device(device: str | torch.device) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a ``torch.device`` this machine can use.

    Raises:
        InputError: unknown device string, no CUDA in this torch build or machine,
            or a GPU index beyond the visible GPUs.
    """
    if isinstance(device, torch.device):
        text = str(device)
    elif isinstance(device, str):
        text = device.strip().lower()
    else:
        raise InputError(f"device must be a string such as 'cpu' or 'cuda:0', not {type(device).__name__}: "
                         f"use one of {_DEVICE_CHOICES}")
    match = _DEVICE_RE.fullmatch(text)
    if match is None:
        raise InputError(f"unknown device '{device}': use one of {_DEVICE_CHOICES} (N = GPU index)")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise InputError(f"unknown device '{device}': the CPU has no index, use 'cpu'")
        return torch.device("cpu")
    _check_cuda(text, None if index is None else int(index))
    return torch.device(text)


def _check_cuda(text: str, index: int | None) -> None:
    """Raise InputError unless CUDA (and GPU ``index``) is usable here."""
    if torch.version.cuda is None:
        raise InputError(
            f"device '{text}' requested but this torch build has no CUDA support (torch {torch.__version__}): "
            "use --device cpu, or install a CUDA build of torch"
        )
    if not torch.cuda.is_available():
        raise InputError(
            f"device '{text}' requested but CUDA is not available (torch {torch.__version__} built for CUDA "
            f"{torch.version.cuda}, but no GPU or driver was found): use --device cpu, or check 'nvidia-smi' "
            "and CUDA_VISIBLE_DEVICES"
        )
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        plural = "GPU is" if count == 1 else "GPUs are"
        raise InputError(
            f"device '{text}' requested but only {count} {plural} visible (valid cuda:0..cuda:{count - 1}): "
            "pick a smaller index, or check CUDA_VISIBLE_DEVICES"
        )


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"float32"``/``"bf16"``/``"half"``/... (case-insensitive) or a torch dtype into a torch dtype.

    Raises:
        InputError: not one of float32, bfloat16, float16 (or their aliases).
    """
    valid = ", ".join(_DTYPES)
    if isinstance(dtype, torch.dtype):
        if dtype in _SUPPORTED_DTYPES:
            return dtype
        kind = "floating" if dtype.is_floating_point else "non-floating"
        raise InputError(f"unsupported {kind} dtype {dtype}: use one of {', '.join(DTYPE_CHOICES)}")
    if not isinstance(dtype, str):
        raise InputError(f"dtype must be a string or torch dtype, not {type(dtype).__name__}: use one of {valid}")
    key = dtype.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise InputError(f"unknown dtype '{dtype}': use one of {valid}")
    return _DTYPES[key]

