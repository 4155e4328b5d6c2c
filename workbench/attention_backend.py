"""The one attention function every workbench forward runs, with its backend chosen per call.

The model is loaded once, as a ``TransformerBridge``. For the duration of one workbench call
(:func:`workbench.forward.bridge_call`) its attention components run the Hugging Face attention
module they wrap (TransformerLens' native path: ``hook_q/k/v`` and ``hook_z`` still fire through
the bridged projections) and that module's attention is :func:`workbench_attention`, registered
with ``transformers.AttentionInterface`` under ``"workbench"``. What happens inside each call is
set per forward by a ``ContextVar`` (:class:`CallState`), so concurrent threads never see each
other's settings:

- ``backend``: ``"sdpa"`` (exact, fused, differentiable, no map; plain forwards, loss, gradients,
  generation), ``"eager"`` (materialises the ``[q, k]`` map and fires ``hook_pattern``, which
  TransformerLens hooks observe and edit), ``"stats"`` (:func:`kernels.attention_with_stats`:
  output, LSE, per-row statistics and received mass, never the map) or a callable kernel with
  ``(call: AttentionCall) -> result with .out`` (block-sparse attention);
- ``edits``: the interventions (:class:`workbench.head_edits.HeadEdits`): pattern-level kinds on the
  head's probabilities (the map when it exists, exact row blocks recomputed from the LSE when
  not), output-level kinds on ``z [B, Nq, Hq, d]`` before ``W_O``: one implementation, every backend;
- ``recorders``: callbacks ``(call, result)`` fed each layer's result (the statistics stream). A
  recorder with a ``row_extras`` attribute (:class:`kernels.long_context.RowExtras`) asks the stats
  backend for the long-context rows in the same pass (``result.rows`` where the kernel gives them).

Attention modules the bridge does not map to a layer (a vision tower) run exact SDPA untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from workbench.errors import InputError, WorkbenchError
from workbench.progress import check_cancelled

ATTENTION_NAME = "workbench"
BACKENDS = ("sdpa", "eager", "stats")


@dataclass
class AttentionCall:
    """One attention call as the backends see it.

    Attributes:
        layer: layer index.
        query: ``[B, Hq, Nq, d]`` after RoPE; key, value: ``[B, Hkv, Nk, d]``.
        key_padding_mask: ``[B, Nk]`` bool (True = real) or None (all real).
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

    @property
    def kv_group(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    @property
    def query_positions(self) -> torch.Tensor:
        """``[Nq]`` absolute positions of the query rows (``Nk - Nq + i``)."""
        n_q, n_k = self.query.shape[2], self.key.shape[2]
        return torch.arange(n_k - n_q, n_k, device=self.query.device)


@dataclass
class EagerResult:
    """Result of the eager backend: ``out [B, Hq, Nq, d]`` and the (edited) map ``probs [B, Hq, Nq, Nk]``."""

    out: torch.Tensor
    probs: torch.Tensor


@dataclass
class ExactAttention:
    """Result of the sdpa backend: only ``out [B, Hq, Nq, d]``."""

    out: torch.Tensor


@dataclass(frozen=True)
class LayerSite:
    """How one Hugging Face attention module maps onto the bridge.

    Attributes:
        layer: its layer index.
        bridge_attn: the TransformerLens attention component (its ``hook_pattern``, ``o.hook_in``...).
        fire_z: True when the module's output projection is not bridged (GPT-2's ``c_proj``), so
            :func:`workbench_attention` fires ``hook_z`` itself.
        fire_v: likewise for ``hook_v`` (joint QKV projections).
    """

    layer: int
    bridge_attn: torch.nn.Module
    fire_z: bool
    fire_v: bool


Recorder = Callable[[AttentionCall, object], None]


@dataclass
class CallState:
    """Per-forward settings of :func:`workbench_attention` (see the module docstring)."""

    sites: dict[int, LayerSite]
    key_padding_mask: torch.Tensor | None
    backend: str | Callable = "sdpa"
    edits: object | None = None
    recorders: Sequence[Recorder] = field(default_factory=tuple)
    local_window: int = 8
    stop_after_layer: int | None = None
    row_extras: object | None = None


class StopForward(Exception):
    """Raised after the attention of ``CallState.stop_after_layer``: nothing later is needed."""


STATE: ContextVar[CallState | None] = ContextVar("workbench_attention_call", default=None)


def check_backend(backend) -> None:
    if not callable(backend) and backend not in BACKENDS:
        raise InputError(f"unknown attention backend '{backend}': use one of {', '.join(BACKENDS)} "
                         "or a kernel function")


def workbench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` entry: returns ``(z [B, Nq, Hq, d], None)`` like transformers' own."""
    state = STATE.get()
    causal = bool(getattr(module, "is_causal", True))
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    site = state.sites.get(id(module)) if state is not None else None
    if site is None:  # not a mapped text layer (a vision tower, or no workbench call): exact attention
        mask = attention_mask if attention_mask is not None and attention_mask.dtype == torch.bool else None
        call = AttentionCall(-1, query, key, value, None, causal, scale)
        return _sdpa(call, dense_mask=mask).transpose(1, 2).contiguous(), None
    check_cancelled()  # a cancel lands within one layer, whatever the caller is doing
    mask = None
    if state.key_padding_mask is not None:
        mask = _extend_mask(state.key_padding_mask, key.shape[2]).to(query.device)
    if site.fire_v:
        value = _fire_heads(site.bridge_attn.v.hook_out, value)
    call = AttentionCall(site.layer, query, key, value, mask, causal, scale)
    edits = state.edits
    backend = state.backend
    if backend == "eager":
        result = _eager(call, site, edits)
    elif backend == "stats":
        from kernels import attention_with_stats

        extras = state.row_extras if query.shape[2] == key.shape[2] else None
        result = attention_with_stats(query, key, value, causal=causal, key_padding_mask=mask, scale=scale,
                                      local_window=state.local_window, received=True, row_extras=extras)
        if edits is not None:
            edits.apply_pattern_edits_stats(call, result, state.local_window)
    elif backend == "sdpa":
        result = ExactAttention(_sdpa(call))
        if edits is not None:
            edits.apply_pattern_edits_out(call, result)
    else:
        if edits is not None and edits.has_pattern_edits:
            raise InputError("pattern-level interventions (softpag, redistribute) need the full attention of the "
                             "head: run them with the sdpa, eager or stats backend, not a custom kernel")
        result = backend(call)
    for record in state.recorders:
        record(call, result)
    if site.layer == state.stop_after_layer:
        raise StopForward
    z = result.out.transpose(1, 2)  # [B, Nq, Hq, d], the TransformerLens hook_z layout
    if edits is not None:
        z = edits.apply_output_edits(z, call)
    if site.fire_z:
        z = _fire_heads(site.bridge_attn.o.hook_in, z.transpose(1, 2)).transpose(1, 2)
    return z.contiguous(), None


def _fire_heads(hook_point, x: torch.Tensor) -> torch.Tensor:
    """Run ``x [B, H, N, d]`` through a bridged hook point that expects ``[B, N, H*d]``."""
    b, h, n, d = x.shape
    flat = hook_point(x.transpose(1, 2).reshape(b, n, h * d))
    return flat.reshape(b, n, h, d).transpose(1, 2)


def _eager(call: AttentionCall, site: LayerSite, edits) -> EagerResult:
    """Materialise the map, apply pattern edits, fire ``hook_pattern``, then ``z = A V``."""
    from kernels.reference import reference_probs

    probs, _, _ = reference_probs(call.query, call.key, causal=call.causal, key_padding_mask=call.key_padding_mask,
                                  scale=call.scale)
    if edits is not None:
        probs = edits.apply_pattern_edits_map(call, probs)
    probs = site.bridge_attn.hook_pattern(probs)
    values = call.value.repeat_interleave(call.kv_group, dim=1) if call.kv_group > 1 else call.value
    out = torch.matmul(probs.to(values.dtype), values)
    return EagerResult(out, probs)


def _extend_mask(mask: torch.Tensor, n_keys: int) -> torch.Tensor:
    """Pad a ``[B, N]`` mask with True for keys generated after it (generation steps)."""
    if mask.shape[1] >= n_keys:
        return mask[:, :n_keys].bool()
    extra = torch.ones(mask.shape[0], n_keys - mask.shape[1], dtype=torch.bool, device=mask.device)
    return torch.cat([mask.bool(), extra], dim=1)


def _is_right_padded(mask: torch.Tensor) -> bool:
    """True when every row of a ``[B, N]`` bool mask is a prefix of True values."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def _sdpa(call: AttentionCall, dense_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention with PyTorch SDPA (GQA without copies). Returns ``[B, Hq, Nq, d]``.

    No ``[Nq, Nk]`` mask is built for the common cases: no padding, causal right-padded batches
    (real rows never see the padding that follows them; padded rows' outputs are don't-care) and
    bidirectional key padding (a ``[B, 1, 1, Nk]`` mask). Other layouts (left padding, cached
    steps with padding) get the full visibility mask; rows that see no key output 0, as in the kernels.
    """
    q, k, v = call.query, call.key, call.value
    n_q, n_k = q.shape[2], k.shape[2]
    kwargs = dict(scale=call.scale, enable_gqa=q.shape[1] != k.shape[1])
    if dense_mask is not None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, **kwargs)
    mask = call.key_padding_mask
    if mask is not None and bool(mask.all()):
        mask = None
    if not call.causal:
        attn_mask = None if mask is None else mask[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)
    if n_q == n_k and (mask is None or _is_right_padded(mask)):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    if mask is None and n_q == 1:  # a cached generation step sees every key
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=k.device).tril(n_k - n_q)[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    dead = ~allowed.any(-1, keepdim=True)  # [B, 1, Nq, 1]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed | dead, **kwargs)
    return out.masked_fill(dead, 0.0)


def register() -> None:
    """Register ``"workbench"`` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, workbench_attention)


@dataclass(frozen=True)
class AttentionLayout:
    """What a workbench call switches on one bridge, derived once per model.

    Attributes:
        sites: ``id(HF attention module) -> LayerSite`` for every module of every layer's attention.
        components: the TransformerLens attention components (one per layer).
        configs: the Hugging Face configs whose ``_attn_implementation`` those modules read.
    """

    sites: dict[int, LayerSite]
    components: tuple[torch.nn.Module, ...]
    configs: tuple


def map_attention(bridge) -> AttentionLayout:
    """The :class:`AttentionLayout` of a bridge (see :func:`workbench.forward.bridge_call`)."""
    sites: dict[int, LayerSite] = {}
    components, configs = [], {}
    blocks = getattr(bridge, "blocks", None)
    if blocks is None:
        raise WorkbenchError("this TransformerBridge has no 'blocks' stack: the workbench needs per-layer attention")
    for layer, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        hf = getattr(attn, "original_component", None)
        if hf is None:
            raise WorkbenchError(f"layer {layer} has no bridged attention component: unsupported architecture")
        inside = {id(m) for m in hf.modules()}
        o, v = getattr(attn, "o", None), getattr(attn, "v", None)
        site = LayerSite(layer, attn, fire_z=o is not None and id(o) not in inside,
                         fire_v=v is not None and id(v) not in inside)
        components.append(attn)
        for module in hf.modules():
            sites[id(module)] = site
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                configs[id(config)] = config
    return AttentionLayout(sites, tuple(components), tuple(configs.values()))
