"""Input validation shared by the torch paths and the Triton launchers.

Every check raises ``TypeError`` (wrong kind of object / dtype) or ``ValueError``
(wrong shape or value) with a message that names the problem and the fix.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS: tuple[str, ...] = ("auto", "reference", "chunked", "sdpa_recompute", "row_pass", "triton")


@dataclass(frozen=True)
class AttnDims:
    """Sizes of one attention call: q ``[B, Hq, Nq, D]``, k/v ``[B, Hkv, Nk, D]``."""

    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA): query head h reads kv head ``h // group``."""
        return self.heads_q // self.heads_kv

    @property
    def offset(self) -> int:
        """Absolute position of query row 0 (``Nk - Nq``)."""
        return self.len_k - self.len_q


def _check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_qk(q: object, k: object, *, allow_float64: bool = False) -> AttnDims:
    """Validate q ``[B, Hq, Nq, D]`` and k ``[B, Hkv, Nk, D]``; return their sizes."""
    q = _check_tensor(q, "q")
    k = _check_tensor(k, "k")
    for name, x in (("q", q), ("k", k)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have 4 dims [batch, heads, seq, head_dim], got shape {tuple(x.shape)}; "
                "reshape it (e.g. x.view(B, N, H, D).transpose(1, 2))"
            )
    allowed = SUPPORTED_DTYPES + ((torch.float64,) if allow_float64 else ())
    if q.dtype not in allowed:
        raise TypeError(f"q has dtype {q.dtype}; supported dtypes are {allowed}; cast it with q.to(...)")
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}; cast both to the same dtype")
    if k.device != q.device:
        raise ValueError(f"q is on {q.device} but k is on {k.device}; move both to the same device")
    B, Hq, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"batch sizes differ: q has {B}, k has {Bk}")
    if Dk != D:
        raise ValueError(f"head_dim differs: q has D={D}, k has D={Dk}; q and k must share the head size")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"query heads Hq={Hq} must be a multiple of kv heads Hkv={Hkv} (GQA); check the head axes"
        )
    if Nq < 1 or Nk < 1 or B < 1 or D < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Nq > Nk:
        raise ValueError(
            f"q has more rows (Nq={Nq}) than k has keys (Nk={Nk}); queries are the last Nq "
            "positions of the key sequence, so pass the full keys"
        )
    return AttnDims(B, Hq, Hkv, Nq, Nk, D)


def check_qkv(q: object, k: object, v: object, *, allow_float64: bool = False) -> AttnDims:
    """Validate q, k and v (v must match k in shape, dtype and device)."""
    dims = check_qk(q, k, allow_float64=allow_float64)
    v = _check_tensor(v, "v")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if v.dtype != k.dtype:
        raise TypeError(f"v has dtype {v.dtype} but k has {k.dtype}; cast both to the same dtype")
    if v.device != k.device:
        raise ValueError(f"k is on {k.device} but v is on {v.device}; move both to the same device")
    return dims


def check_key_padding_mask(mask: object, dims: AttnDims, device: torch.device) -> torch.Tensor | None:
    """Validate an optional bool ``[B, Nk]`` mask (True = real token); return it on ``device``."""
    if mask is None:
        return None
    mask = _check_tensor(mask, "key_padding_mask")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"key_padding_mask must be bool (True = real token), got {mask.dtype}; use mask.bool()"
        )
    if tuple(mask.shape) != (dims.batch, dims.len_k):
        raise ValueError(
            f"key_padding_mask must have shape [B, Nk] = {(dims.batch, dims.len_k)}, got {tuple(mask.shape)}"
        )
    return mask.to(device)


def resolve_scale(scale: object, head_dim: int) -> float:
    """Return ``scale`` as a float, defaulting to ``1/sqrt(head_dim)``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return float(scale)


def check_lse(lse: object, dims: AttnDims, device: torch.device) -> torch.Tensor:
    """Validate a saved log-sum-exp ``[B, Hq, Nq]``; return it as fp32 on ``device``."""
    lse = _check_tensor(lse, "lse")
    expected = (dims.batch, dims.heads_q, dims.len_q)
    if tuple(lse.shape) != expected:
        raise ValueError(
            f"lse must have shape [B, Hq, Nq] = {expected}, got {tuple(lse.shape)}; "
            "pass the .lse of the attention_with_stats call on the same q and k"
        )
    if not lse.is_floating_point():
        raise TypeError(f"lse must be a floating tensor, got {lse.dtype}")
    return lse.to(device=device, dtype=torch.float32)


def check_int(value: object, name: str, *, low: int, high: int | None = None) -> int:
    """Validate an integer in ``[low, high]`` (``high`` inclusive, None = unbounded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f", {high}"
        raise ValueError(f"{name}={value} is out of range; expected a value in [{low}{upper}]")
    return value


def check_range(rng: object, upper: int, name: str) -> tuple[int, int]:
    """Validate a half-open index range ``(start, stop)`` with ``0 <= start < stop <= upper``."""
    if not isinstance(rng, Sequence) or len(rng) != 2:
        raise TypeError(f"{name} must be a pair (start, stop), got {rng!r}")
    start, stop = rng
    for v in (start, stop):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must hold two ints, got {rng!r}")
    if not 0 <= start < stop <= upper:
        raise ValueError(
            f"{name}={tuple(rng)} is out of range; need 0 <= start < stop <= {upper} (half-open range)"
        )
    return int(start), int(stop)


def check_block(value: object, name: str, *, power_of_two: bool = False) -> int:
    """Validate a block size (positive int; optionally a power of two >= 16)."""
    value = check_int(value, name, low=1)
    if power_of_two and (value < 16 or value & (value - 1)):
        raise ValueError(f"{name}={value} must be a power of two >= 16 for the Triton kernels")
    return value


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: object, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` (CUDA + triton) or ``"chunked"``; validate explicit names."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "chunked"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package; install it or use backend='chunked'")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); move them to the GPU, "
                "use backend='chunked', or set TRITON_INTERPRET=1 before importing triton"
            )
    return str(backend)


def check_triton_inputs(*tensors: torch.Tensor) -> None:
    """Device check for Triton launchers: CUDA, or CPU under the interpreter."""
    for x in tensors:
        if x.device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"the Triton kernels need CUDA tensors, got one on {x.device}; "
                "use backend='chunked' on the CPU (or TRITON_INTERPRET=1 for the interpreter)"
            )


def check_head_dim_for_triton(head_dim: int) -> None:
    """The Triton kernels pad the head to a power of two; keep it in a sane range."""
    if not 16 <= head_dim <= 256:
        raise ValueError(f"the Triton kernels support head_dim in [16, 256], got {head_dim}; use backend='chunked'")


def block_counts(dims: AttnDims, block_size: int) -> tuple[int, int]:
    """Number of query blocks and key blocks for a block-sparse layout."""
    return -(-dims.len_q // block_size), -(-dims.len_k // block_size)


def check_keep(keep: object, dims: AttnDims, block_size: int, device: torch.device) -> torch.Tensor:
    """Normalise a block-sparse layout to a bool tensor ``[B, Hq, n_q_blocks, n_k_blocks]``.

    Accepts a bool tensor ``[B, Hq, nqb, nkb]`` or ``[Hq, nqb, nkb]`` (shared by the batch), or
    nested lists ``keep[query_block][head]`` = key-block indices (shared by the batch).
    Query block ``t`` holds query rows ``[t*block_size, (t+1)*block_size)``; key block ``u``
    holds key positions ``[u*block_size, (u+1)*block_size)``.
    """
    nqb, nkb = block_counts(dims, block_size)
    if isinstance(keep, torch.Tensor):
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor, got {keep.dtype}; use keep.bool()")
        if keep.ndim == 3:
            keep = keep.unsqueeze(0).expand(dims.batch, -1, -1, -1)
        expected = (dims.batch, dims.heads_q, nqb, nkb)
        if tuple(keep.shape) != expected:
            raise ValueError(
                f"keep must have shape [B, Hq, n_q_blocks, n_k_blocks] = {expected} for block_size="
                f"{block_size}, got {tuple(keep.shape)}"
            )
        return keep.to(device)
    if not isinstance(keep, Sequence):
        raise TypeError(f"keep must be a bool tensor or nested lists keep[query_block][head], got {type(keep).__name__}")
    if len(keep) != nqb:
        raise ValueError(f"keep lists need one entry per query block ({nqb} for block_size={block_size}), got {len(keep)}")
    out = torch.zeros(dims.heads_q, nqb, nkb, dtype=torch.bool)
    for qb, per_head in enumerate(keep):
        if not isinstance(per_head, Sequence) or len(per_head) != dims.heads_q:
            raise ValueError(f"keep[{qb}] must list key-block indices for each of the {dims.heads_q} query heads")
        for h, blocks in enumerate(per_head):
            for kb in blocks:
                if isinstance(kb, bool) or not isinstance(kb, int) or not 0 <= kb < nkb:
                    raise ValueError(f"keep[{qb}][{h}] holds {kb!r}; key-block indices must be ints in [0, {nkb})")
                out[h, qb, kb] = True
    return out.unsqueeze(0).expand(dims.batch, -1, -1, -1).to(device)
