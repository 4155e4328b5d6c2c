"""Sink tokens by massive activations (docs/metrics.md §3), read from the residual stream.

For a hidden state ``x`` (``[D]``) the RMS-scaled magnitude of dimension ``d`` is
``r_d(x) = |x_d| / RMS(x)`` with ``RMS(x) = sqrt(mean_d x_d²)``; the sink test of "See What You
Are Told" (ICLR 2025) is ``φ(x) = max_{d ∈ D_sink} r_d(x) > τ`` (τ = 20).

``D_sink`` discovery (the workbench's RMS-scaled reading of Sun et al. 2024, who call an
activation massive when ``|x_d| > 100`` and about 1000× the median ``|x|`` of its hidden state):
a dimension ``d`` is *flagged* in layer ``l`` when some real token's hidden state entering that
layer (``blocks.l.hook_resid_pre``) has ``r_d > τ_dim`` (default τ_dim = τ) and ``|x_d| > min_abs``
(default 0; 100 reproduces Sun et al.'s absolute test); ``d ∈ D_sink`` when it is flagged in at
least ``ceil(min_layer_frac · n_layers)`` layers (default 25%). The persistence rule encodes
Sun et al.'s observation that massive activations appear in an early layer and stay nearly
constant through the middle layers; it rejects last-layer outliers that are large on many
ordinary tokens for one or two layers only.

Because ``Σ_d r_d² = D``, at most ``D / τ²`` dimensions of one hidden state can exceed τ and
``φ ≤ sqrt(D)``: with τ = 20 the test needs ``D > 400`` (e.g. SmolLM2's 576), so tiny test models
need a lower τ. The scan keeps, per token and layer, only the ``k = D // τ_dim² + 8`` largest
``r_d`` (exact for every threshold test above, since no more than ``D // τ_dim²`` dimensions can
pass), so no ``[B, L, N, D]`` tensor is stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workbench.batch import TokenBatch
from workbench.errors import InputError
from workbench.progress import Estimate
from workbench.model import bind_hook, hook_name, HookedModel


def massive_ratio(x: torch.Tensor) -> torch.Tensor:
    """``r_d(x) = |x_d| / RMS(x)`` over the last axis; same shape as ``x``."""
    x = x.float()
    rms = x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
    return x.abs() / rms


@dataclass
class ResidualScan:
    """What one scan of the residual stream kept.

    Attributes:
        top_ratio: ``[B, L, N, k]`` largest ``r_d`` per token and layer (descending).
        top_dim: ``[B, L, N, k]`` their dimensions.
        rms: ``[B, L, N]`` RMS of each hidden state (``|x_d| = r_d · rms``).
        value_norm: ``[B, L, Hkv, N]`` ‖v‖ per KV head and token (``hook_v``).
        mask: ``[B, N]`` real tokens.
        d_model: hidden size D.
    """

    top_ratio: torch.Tensor
    top_dim: torch.Tensor
    rms: torch.Tensor
    value_norm: torch.Tensor
    mask: torch.Tensor
    d_model: int

    def flagged_layers(self, tau_dim: float, min_abs: float = 0.0) -> torch.Tensor:
        """``[L, D]`` bool: dimension d exceeds ``tau_dim`` (and ``min_abs``) on a real token in layer l."""
        passes = (self.top_ratio > tau_dim) & (self.top_ratio * self.rms[..., None] > min_abs)
        passes &= self.mask[:, None, :, None]
        n_layers = self.top_ratio.shape[1]
        flagged = torch.zeros(n_layers, self.d_model, dtype=torch.bool)
        for layer in range(n_layers):
            dims = self.top_dim[:, layer][passes[:, layer]]
            flagged[layer, dims.unique()] = True
        return flagged

    def phi(self, dims: Sequence[int]) -> torch.Tensor:
        """``φ = max_{d ∈ dims} r_d`` per ``[B, L, N]``; exact whenever a dim of ``dims`` is among
        the kept top-k of that token (always when φ exceeds the scan threshold), else 0."""
        if not dims:
            return torch.zeros(self.rms.shape)
        member = torch.isin(self.top_dim, torch.tensor(list(dims), dtype=self.top_dim.dtype))
        return torch.where(member, self.top_ratio, torch.zeros_like(self.top_ratio)).amax(-1)


def scan_residuals(model: HookedModel, batch: TokenBatch, *, tau_dim: float = 20.0,
                   batch_size: int = 8) -> ResidualScan:
    """One forward per chunk recording the top RMS-scaled dims of every layer's input and ‖v‖.

    Args:
        model: a loaded model.
        batch: right-padded tokens.
        tau_dim: the lowest threshold the result will be asked about (sets k).
    """
    if tau_dim <= 0:
        raise InputError(f"dimension threshold {tau_dim} must be positive (default 20)")
    n_layers, d_model = model.n_layers, int(model.bridge.cfg.d_model)
    k = min(d_model, int(d_model // (tau_dim ** 2)) + 8)
    B, N = batch.tokens.shape
    top_ratio = torch.zeros(B, n_layers, N, k)
    top_dim = torch.zeros(B, n_layers, N, k, dtype=torch.long)
    rms = torch.zeros(B, n_layers, N)
    value_norm = torch.zeros(B, n_layers, model.n_kv_heads, N)
    start = 0
    chunks = batch.chunks(batch_size)
    eta = Estimate(n_layers * len(chunks), "layers scanned")  # sub-progress + a cancel check per layer
    for chunk in chunks:
        rows, width = slice(start, start + len(chunk)), chunk.tokens.shape[1]

        def resid(x, hook, *, layer: int, rows=rows, width=width):
            eta.advance()
            x32 = x.detach().float()
            r = massive_ratio(x32)
            values, dims = r.topk(k, dim=-1)
            top_ratio[rows, layer, :width], top_dim[rows, layer, :width] = values, dims
            rms[rows, layer, :width] = x32.pow(2).mean(-1).sqrt()
            return x

        def value(v, hook, *, layer: int, rows=rows, width=width):
            value_norm[rows, layer, :, :width] = v.detach().float().norm(dim=-1).transpose(1, 2)
            return v

        hooks = []
        for layer in range(n_layers):
            hooks.append((f"blocks.{layer}.hook_resid_pre", bind_hook(resid, layer=layer)))
            hooks.append((hook_name(layer, "v"), bind_hook(value, layer=layer)))
        model.run(chunk, fwd_hooks=hooks)
        start += len(chunk)
    return ResidualScan(top_ratio, top_dim, rms, value_norm, batch.mask.clone(), d_model)


def discover_sink_dims(flagged: torch.Tensor, min_layer_frac: float = 0.25) -> list[int]:
    """Dimensions flagged in at least ``ceil(min_layer_frac · L)`` layers (``flagged [L, D]`` bool)."""
    if not 0 < min_layer_frac <= 1:
        raise InputError(f"min_layer_frac={min_layer_frac} must be in (0, 1] (default 0.25)")
    needed = max(1, math.ceil(min_layer_frac * flagged.shape[0]))
    return [int(d) for d in (flagged.sum(0) >= needed).nonzero().flatten()]


def sink_positions(sink_mask: torch.Tensor, mask: torch.Tensor, min_layer_frac: float = 0.25) -> list[list[int]]:
    """Per sample, positions that are sinks in at least ``ceil(min_layer_frac · L)`` layers.

    Args:
        sink_mask: ``[B, L, N]`` bool per-layer sink test.
        mask: ``[B, N]`` real tokens.
    """
    needed = max(1, math.ceil(min_layer_frac * sink_mask.shape[1]))
    persistent = (sink_mask.sum(1) >= needed) & mask
    return [[int(p) for p in row.nonzero().flatten()] for row in persistent]

