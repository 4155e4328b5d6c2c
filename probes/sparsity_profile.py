"""Sparsity-profile probe (docs/metrics.md §10): how much of the map each head really needs.

Per head, from the capture's long-context rows (:mod:`workbench.long_context`; stats mode: exact,
from the recompute pass, no map stored):

- ``block_density_90`` / ``block_density_95``: with blocks of ``B`` rows/keys, per query block the
  fewest key blocks holding 90 % (95 %) of its pooled mass over its visible key blocks; mean over
  query blocks;
- ``xattn_recall`` / ``xattn_density``: share of the true pooled mass inside the key blocks that
  XAttention's antidiagonal scorer (stride 8) keeps at threshold τ = 0.9, and the share of visible
  blocks it keeps; ``hess_recall`` / ``hess_density``: the same for the HeSS mean-pooled scorer;
- ``streaming_mass``: mean over rows of the mass on the first 4 keys plus the row's last 256 keys:
  above 0.95 a sink + window KV cache serves the head;
- ``saliency_share_90`` (ZipCache-style KV saliency, per head): the fewest tokens holding 90 % of
  the head's causal-normalised received mass ``ĉ`` (docs/metrics.md §1), over the real tokens.

Dataset level, after ``fit``: ``kv_saliency_share_90_`` is the same share with ``ĉ`` first averaged
over every captured layer and head (one saliency per token, as a KV cache that evicts tokens for
all heads at once sees it); ``kv_saliency_`` holds its mean, 95 % interval and per-sample values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from probes.base import Probe, masked_row_mean, mean_and_ci
from probes.long_context_rows import long_context_capture
from workbench.batch import TokenBatch
from workbench.capture import Capture
from workbench.errors import InputError
from workbench.long_context import LongContextSettings

_BLOCK_METRICS = {"block_density_90": "density_90", "block_density_95": "density_95",
                  "xattn_recall": "xattn_recall", "xattn_density": "xattn_density",
                  "hess_recall": "hess_recall", "hess_density": "hess_density"}


def saliency_share(saliency: torch.Tensor, mask: torch.Tensor, keep: float = 0.9) -> torch.Tensor:
    """Fewest tokens holding ``keep`` of the saliency, over the real tokens: ``[..., N] -> [...]``.

    Args:
        saliency: ``[..., N]`` non-negative per-token saliency; mask: bool broadcastable to it
            (True = real token). NaN where a sample has no saliency.
    """
    values = torch.where(mask, saliency, torch.zeros((), dtype=saliency.dtype))
    total = values.sum(-1, keepdim=True)
    ordered = values.sort(dim=-1, descending=True).values.cumsum(-1)
    need = (ordered < keep * total).sum(-1) + 1
    real = mask.expand_as(values).sum(-1)
    need = torch.minimum(need, real)
    share = need.float() / real.clamp(min=1).float()
    return torch.where(total[..., 0] > 0, share, torch.full_like(share, float("nan")))


class SparsityProfile(Probe):
    """Per-head block density, scorer recall, streaming mass and KV saliency (module docstring).

    Args:
        metrics: subset of :attr:`metrics`; None = all.
        block_size: ``B`` (64); sinks, window: streaming keys (4, 256); stride, tau: XAttention's
            stride (8) and the scorers' threshold (0.9); keep: saliency share kept (0.9).
        layers, heads: stored only (the capture holds the subset).
    """

    name: ClassVar[str] = "sparsity"
    metrics: ClassVar[tuple[str, ...]] = ("block_density_90", "block_density_95", "xattn_recall", "xattn_density",
                                          "hess_recall", "hess_density", "saliency_share_90", "streaming_mass")
    bounds: ClassVar[dict[str, tuple[float, float]]] = {m: (0.0, 1.0) for m in metrics}

    def __init__(self, metrics: Sequence[str] | None = None, *, block_size: int = 64, sinks: int = 4,
                 window: int = 256, stride: int = 8, tau: float = 0.9, keep: float = 0.9,
                 layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> None:
        self.metrics = metrics
        self.block_size, self.sinks, self.window = block_size, sinks, window
        self.stride, self.tau, self.keep = stride, tau, keep
        self.layers, self.heads = layers, heads

    def _settings(self) -> LongContextSettings:
        wanted = self._wanted()
        blocks = any(m in _BLOCK_METRICS for m in wanted)
        return LongContextSettings(blocks=blocks, block_size=self.block_size, sinks=self.sinks, window=self.window,
                                   stride=self.stride, tau=self.tau)

    def _wanted(self) -> tuple[str, ...]:
        return type(self).metrics if self.metrics is None else tuple(self.metrics)

    def check_params(self) -> None:
        if self.metrics is not None:
            self.check_metrics(self.metrics)
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise InputError(f"keep={self.keep!r} must be in (0, 1] (default 0.9)")
        self._settings().check()

    def long_context_request(self) -> LongContextSettings | None:
        """What the pipeline's capture must record for this probe (None: only the saliency share)."""
        wanted = self._wanted()
        return None if set(wanted) <= {"saliency_share_90"} else self._settings()

    def fit(self, capture: Capture | None = None, *, model=None, batch: TokenBatch | None = None) -> "SparsityProfile":
        """Scores from ``capture`` (its ``lc.*`` rows, recaptured with ``model`` when missing)."""
        self.check_inputs(capture, model, batch)
        self.check_params()
        wanted = self._wanted()
        self.metrics_ = wanted
        self.layers_, self.heads_ = list(capture.layers), list(capture.heads)
        request = self.long_context_request()
        cap = capture if request is None else long_context_capture(self.name, capture, model, request)
        mask = cap.mask[:, None, None, :]
        self.per_sample_ = {}
        for metric in wanted:
            if metric in _BLOCK_METRICS:
                self.per_sample_[metric] = cap.extras[f"lc.{_BLOCK_METRICS[metric]}"].clone()
            elif metric == "streaming_mass":
                self.per_sample_[metric] = masked_row_mean(cap.extras["lc.streaming"], mask)
            elif metric == "saliency_share_90":
                self.per_sample_[metric] = saliency_share(cap.received_normalized, mask, self.keep)
        pooled = cap.received_normalized.mean(dim=(1, 2))  # [S, N]: one saliency per token
        self.set_kv_saliency(saliency_share(pooled, cap.mask, self.keep))
        self._summarise()
        return self

    def set_kv_saliency(self, per_sample: torch.Tensor) -> None:
        """``kv_saliency_`` (and ``kv_saliency_share_90_``) from the per-sample shares ``[S]``; a
        sharded run (:mod:`probes.sharded`) calls it with every shard's shares in sample order."""
        mean, low, high = mean_and_ci(per_sample[:, None])
        self.kv_saliency_share_90_ = float(mean[0])
        self.kv_saliency_ = {"keep": self.keep, "mean": float(mean[0]), "ci_low": float(low[0]),
                             "ci_high": float(high[0]), "per_sample": per_sample.tolist()}
