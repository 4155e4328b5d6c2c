"""Run a model with its attention computed by the workbench kernels (no ``[q, k]`` map).

The ``TransformerBridge`` re-implements attention eagerly, so kernel-backed forwards use a
plain Hugging Face copy of the same checkpoint (loaded once per model, sharing nothing with
the bridge) whose attention goes through ``transformers.AttentionInterface`` under the name
``"workbench_kernel"``. What happens inside each attention call is set per forward by
:func:`kernel_forward` (a ``ContextVar``, so concurrent threads never see each other's):

- ``key_padding_mask [B, Nk]``: real tokens (transformers passes no mask to custom functions);
- ``attention``: the kernel to run (default :func:`kernels.attention_with_stats`; HeSS passes
  a block-sparse one);
- ``recorders``: callbacks ``(call, result)`` that keep statistics / Q / K / LSE (stats capture);
- ``z_editors``: callbacks ``(z, call) -> z`` that edit per-head outputs ``z [B, Nq, Hq, d]``
  before the output projection (interventions in stats mode).
Outside :func:`kernel_forward` the function falls back to exact SDPA so the copy stays usable.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from workbench.errors import WorkbenchError

KERNEL_ATTENTION = "workbench_kernel"


@dataclass
class AttentionCall:
    """One attention call as the kernels see it.

    Attributes:
        layer: layer index.
        query: ``[B, Hq, Nq, d]`` after RoPE; key, value: ``[B, Hkv, Nk, d]``.
        key_padding_mask: ``[B, Nk]`` bool (True = real) or None.
        causal: causal (decoder) attention.
        scale: softmax scale.
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_padding_mask: torch.Tensor | None
    causal: bool
    scale: float


ZEditor = Callable[[torch.Tensor, AttentionCall], torch.Tensor]
Recorder = Callable[[AttentionCall, object], None]
AttentionFn = Callable[..., object]


@dataclass
class KernelForwardState:
    key_padding_mask: torch.Tensor | None
    attention: AttentionFn | None
    recorders: Sequence[Recorder] = field(default_factory=tuple)
    z_editors: Sequence[ZEditor] = field(default_factory=tuple)


_STATE: ContextVar[KernelForwardState | None] = ContextVar("workbench_kernel_forward", default=None)


@contextlib.contextmanager
def kernel_forward(key_padding_mask: torch.Tensor | None, *, attention: AttentionFn | None = None,
                   recorders: Sequence[Recorder] = (), z_editors: Sequence[ZEditor] = ()) -> Iterator[None]:
    """Scope the kernel attention settings to one forward (restored even on error)."""
    token = _STATE.set(KernelForwardState(key_padding_mask, attention, tuple(recorders), tuple(z_editors)))
    try:
        yield
    finally:
        _STATE.reset(token)


@contextlib.contextmanager
def extra_z_editors(editors: Sequence[ZEditor]) -> Iterator[None]:
    """Add z editors to the active kernel forward (used by interventions)."""
    state = _STATE.get()
    if state is None:
        raise WorkbenchError("extra_z_editors needs an active kernel_forward")
    token = _STATE.set(KernelForwardState(state.key_padding_mask, state.attention, state.recorders,
                                          tuple(state.z_editors) + tuple(editors)))
    try:
        yield
    finally:
        _STATE.reset(token)


def _kernel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` entry: returns ``(out [B, Nq, Hq, d], None)`` like transformers'."""
    state = _STATE.get()
    causal = bool(getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    mask = None
    if state is not None and state.key_padding_mask is not None:
        mask = _extend_mask(state.key_padding_mask, key.shape[2]).to(query.device)
    call = AttentionCall(int(getattr(module, "layer_idx", -1)), query, key, value, mask, causal, scale)
    if state is None:
        return _sdpa(call).transpose(1, 2).contiguous(), None
    attention = state.attention
    if attention is None:
        from kernels import attention_with_stats as attention
    result = attention(query, key, value, causal=causal, key_padding_mask=mask, scale=scale)
    for record in state.recorders:
        record(call, result)
    z = result.out.transpose(1, 2)  # [B, Nq, Hq, d], the TransformerLens hook_z layout
    for edit in state.z_editors:
        z = edit(z, call)
    return z.contiguous(), None


def _extend_mask(mask: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Pad a ``[B, N]`` mask with True for keys generated after it (generation steps)."""
    if mask.shape[1] >= n_keys:
        return mask[:, :n_keys].bool()
    extra = torch.ones(mask.shape[0], n_keys - mask.shape[1], dtype=torch.bool, device=mask.device)
    return torch.cat([mask.bool(), extra], dim=1)


def _sdpa(call: AttentionCall) -> torch.Tensor:
    """Exact attention with PyTorch SDPA, GQA by repeating K/V. Returns ``[B, Hq, Nq, d]``."""
    groups = call.query.shape[1] // call.key.shape[1]
    key = call.key.repeat_interleave(groups, dim=1)
    value = call.value.repeat_interleave(groups, dim=1)
    n_q, n_k = call.query.shape[2], key.shape[2]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=key.device)
    if call.causal:
        allowed = allowed.tril(n_k - n_q)
    allowed = allowed[None, None]
    if call.key_padding_mask is not None:
        allowed = allowed & call.key_padding_mask[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        call.query, key, value, attn_mask=allowed, scale=call.scale)


def register_kernel_attention() -> None:
    """Register ``"workbench_kernel"`` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(KERNEL_ATTENTION, _kernel_attention)


def load_kernel_model(folder, dtype: torch.dtype, device: str, causal: bool):
    """A plain Hugging Face model of ``folder`` whose attention is the kernel function."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    register_kernel_attention()
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    model = auto.from_pretrained(str(folder), dtype=dtype, attn_implementation=KERNEL_ATTENTION)
    return model.to(device).eval()
