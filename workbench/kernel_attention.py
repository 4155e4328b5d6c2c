"""Run a model with its attention computed by the workbench kernels (no ``[q, k]`` map).

The ``TransformerBridge`` re-implements attention eagerly, so kernel-backed forwards use a
plain Hugging Face copy of the same checkpoint (loaded once per model, sharing nothing with
the bridge) whose attention goes through ``transformers.AttentionInterface`` under the name
``"workbench_kernel"``. What happens inside each attention call is set per forward by
:func:`kernel_forward` (a ``ContextVar``, so concurrent threads never see each other's):

- ``key_padding_mask [B, Nk]``: real tokens (transformers passes no mask to custom functions);
- ``attention``: the kernel to run (default: :func:`kernels.attention_with_stats` when a recorder
  is set, else exact PyTorch SDPA, which is faster and differentiable; HeSS passes a block-sparse one);
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
    if state is None or (state.attention is None and not state.recorders):
        z = _sdpa(call).transpose(1, 2)  # nothing needs statistics: exact, fast, differentiable
    else:
        attention = state.attention
        if attention is None:
            from kernels import attention_with_stats as attention
        result = attention(query, key, value, causal=causal, key_padding_mask=mask, scale=scale)
        for record in state.recorders:
            record(call, result)
        z = result.out.transpose(1, 2)  # [B, Nq, Hq, d], the TransformerLens hook_z layout
    for edit in (state.z_editors if state is not None else ()):
        z = edit(z, call)
    return z.contiguous(), None


def _extend_mask(mask: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Pad a ``[B, N]`` mask with True for keys generated after it (generation steps)."""
    if mask.shape[1] >= n_keys:
        return mask[:, :n_keys].bool()
    extra = torch.ones(mask.shape[0], n_keys - mask.shape[1], dtype=torch.bool, device=mask.device)
    return torch.cat([mask.bool(), extra], dim=1)


def _sdpa(call: AttentionCall) -> torch.Tensor:
    """Exact attention with PyTorch SDPA (GQA without copies). Returns ``[B, Hq, Nq, d]``.

    No ``[Nq, Nk]`` mask is built for the common cases: no padding, causal right-padded batches
    (real rows never see the padding that follows them; padded rows' outputs are don't-care) and
    bidirectional key padding (a ``[B, 1, 1, Nk]`` mask). Other layouts (left padding, cached
    steps with padding) get the full visibility mask; rows that see no key output 0, as in the kernels.
    """
    q, k, v = call.query, call.key, call.value
    n_q, n_k = q.shape[2], k.shape[2]
    mask = call.key_padding_mask
    if mask is not None and bool(mask.all()):
        mask = None
    kwargs = dict(scale=call.scale, enable_gqa=q.shape[1] != k.shape[1])
    if not call.causal:
        attn_mask = None if mask is None else mask[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
    if n_q == n_k and (mask is None or _is_right_padded(mask)):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=k.device).tril(n_k - n_q)[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    dead = ~allowed.any(-1, keepdim=True)  # [B, 1, Nq, 1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed | dead, **kwargs)
    return out.masked_fill(dead, 0.0)


@dataclass
class ExactAttention:
    """Result of :func:`exact_attention`: only the output ``out [B, Hq, Nq, d]`` (no statistics)."""

    out: torch.Tensor


def exact_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool,
                    key_padding_mask: torch.Tensor | None, scale: float) -> ExactAttention:
    """Exact, differentiable attention in the kernels' call signature (for ``kernel_forward(attention=)``)."""
    return ExactAttention(_sdpa(AttentionCall(-1, query, key, value, key_padding_mask, causal, scale)))


def _is_right_padded(mask: torch.Tensor) -> bool:
    """True when every row of a ``[B, N]`` bool mask is a prefix of True values."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


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
