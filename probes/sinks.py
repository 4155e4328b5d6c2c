"""Attention-sink probe (docs/metrics.md §3): sink scores, first-4 mass, no-op score, sink tokens.

Metrics per head (mean over samples, Student-t 95% interval):

- ``sink_score``: α_1 of Gu et al. 2024, ``α_k = (1/(T-k+1)) Σ_{i≥k} A_ik`` (1-based k) for the
  first token; it is the capture's causal-normalised received mass ``ĉ`` of key 0 (for an
  encoder: the mean over all queries).
- ``first4_mass``: mean over real query rows of ``Σ_{j<4} A_ij`` (StreamingLLM's 4 sinks).
- ``noop_score`` (the workbench's own composite, after Bondarenko et al. 2023): mean-row mass on
  the sink tokens of the layer × ``(1 − mean‖v_sink‖ / mean‖v_all‖)``, ``v`` from ``hook_v`` of
  the query head's KV head (GQA). It needs the model (``fit(capture, model=model)``); a sample
  whose layer has no sink token scores 0 (no mass on sinks).

Sink tokens come from the massive-activation test of :mod:`probes.sink_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
import torch

from probes.base import Probe, masked_row_mean, mean_and_ci
from probes.sink_tokens import discover_sink_dims, scan_residuals, sink_positions
from workbench.batch import TokenBatch
from workbench.capture import Capture, capture
from workbench.errors import InputError
from workbench.model import HookedModel

SinkMetric = Literal["sink_score", "first4_mass", "noop_score"]
SinkSource = Literal["auto", "massive", "first"]
_CAPTURE_METRICS = ("sink_score", "first4_mass")


class Sinks(Probe):
    """Per-head sink scores plus the model's sink tokens, ``D_sink`` and sink rate.

    Args:
        metrics: subset of ``sink_score, first4_mass, noop_score``; None = every metric the
            fit can compute (``noop_score`` only when the model is given).
        tau: sink-token threshold on φ (τ = 20).
        eps: sink-rate threshold on α_1 (ε = 0.3).
        dim_threshold: ``r_d`` threshold of the ``D_sink`` discovery (default: ``tau``).
        min_layer_frac: persistence needed for a dimension / a sink position (default 25%).
        min_abs: optional absolute floor on ``|x_d|`` (Sun et al. use 100; default 0).
        sink_source: which tokens count as sinks for ``noop_score``: ``"massive"`` (φ > τ),
            ``"first"`` (position 0 in every layer), ``"auto"`` (massive when ``D_sink`` is
            non-empty, else first).
        sink_dims: skip discovery and use these dimensions as ``D_sink``.
        batch_size: samples per forward of the residual scan.
        layers, heads: stored only (the capture holds the subset).

    Attributes (after ``fit``):
        metrics_: the metrics computed; dim_threshold_: the ``D_sink`` threshold used.
        alpha_: ``[S, L, H, N]`` α_k for every key position (0 on padding).
        per_sample_, mean_, ci_low_, ci_high_: metric -> ``[S, L, H]`` / ``[L, H]``.
        sink_rate_: % of (sample, layer, head) with α_1 > ε on this capture (Gu et al. measure it
            on T = 64 tokens: :func:`sink_rate`).
        With the model: ``sink_dims_`` (``D_sink``), ``flagged_layers_`` (dim -> layers where it
        passed), ``phi_ [S, L_model, N]``, ``sink_mask_ [S, L_model, N]``, ``sink_positions_``
        (per sample), ``sink_source_used_``.
    """

    name: ClassVar[str] = "sinks"
    metrics: ClassVar[tuple[str, ...]] = ("sink_score", "first4_mass", "noop_score")
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"sink_score": (0.0, 1.0), "first4_mass": (0.0, 1.0)}

    def __init__(self, metrics: Sequence[SinkMetric] | None = None, *, tau: float = 20.0, eps: float = 0.3,
                 dim_threshold: float | None = None, min_layer_frac: float = 0.25, min_abs: float = 0.0,
                 sink_source: SinkSource = "auto", sink_dims: Sequence[int] | None = None,
                 batch_size: int = 8, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None) -> None:
        self.metrics = metrics
        self.tau, self.eps, self.dim_threshold = tau, eps, dim_threshold
        self.min_layer_frac, self.min_abs = min_layer_frac, min_abs
        self.sink_source, self.sink_dims, self.batch_size = sink_source, sink_dims, batch_size
        self.layers, self.heads = layers, heads

    def check_params(self) -> None:
        if self.metrics is not None:
            self.check_metrics(self.metrics)
        tau, dim_threshold = self.tau, self.dim_threshold
        if tau <= 0 or (dim_threshold is not None and dim_threshold <= 0):
            raise InputError(f"tau={tau} / dim_threshold={dim_threshold} must be positive (default 20)")
        if not 0 <= self.eps <= 1:
            raise InputError(f"eps={self.eps} must be in [0, 1] (default 0.3)")
        if not 0 < self.min_layer_frac <= 1:
            raise InputError(f"min_layer_frac={self.min_layer_frac} must be in (0, 1] (default 0.25)")
        if self.sink_source not in ("auto", "massive", "first"):
            raise InputError(f"unknown sink_source '{self.sink_source}': use auto, massive or first")
        if self.batch_size < 1:
            raise InputError(f"batch_size={self.batch_size} must be at least 1")

    def check_inputs(self, capture=None, model=None, batch=None) -> None:
        super().check_inputs(capture, model, batch)
        if model is None and isinstance(self.metrics, (list, tuple)) and "noop_score" in self.metrics:
            raise InputError("noop_score needs the model (value vectors and residual stream): "
                             "call fit(capture, model=model)")

    def cost_forwards(self, n_layers: int, n_heads: int, n_tokens: int, samples: int) -> float | None:
        """With the model (as the pipeline runs it): one more forward of every sample, the residual
        scan for sink tokens and value norms (:func:`probes.sink_tokens.scan_residuals`)."""
        return float(samples)

    # ------------------------------------------------------------------ fitting
    def fit(self, capture: Capture | None = None, *, model: HookedModel | None = None,
            batch: TokenBatch | None = None) -> "Sinks":
        """Scores from ``capture``; with ``model`` also sink tokens, ``D_sink`` and ``noop_score``.

        ``batch`` is not used (the residual scan re-reads the capture's tokens); ``layers``/``heads``
        neither (the capture holds the subset).
        """
        self.check_inputs(capture, model, batch)
        self.check_params()
        wanted = self.metrics
        if wanted is None:
            wanted = type(self).metrics if model is not None else _CAPTURE_METRICS
        self.metrics_ = tuple(wanted)
        self.dim_threshold_ = self.tau if self.dim_threshold is None else self.dim_threshold
        self.layers_, self.heads_ = list(capture.layers), list(capture.heads)
        self.alpha_ = capture.received_normalized.clone()
        alpha1 = self.alpha_[..., 0]
        self.sink_rate_ = float((alpha1 > self.eps).float().mean() * 100)
        self.per_sample_ = {}
        if "sink_score" in wanted:
            self.per_sample_["sink_score"] = alpha1
        if "first4_mass" in wanted:
            self.per_sample_["first4_mass"] = masked_row_mean(capture.row_stats["first4_mass"],
                                                             capture.mask[:, None, None, :])
        if model is not None:
            self._fit_sink_tokens(model, capture)
            if "noop_score" in wanted:
                self.per_sample_["noop_score"] = self._noop(model, capture)
        self._summarise()
        return self

    def _fit_sink_tokens(self, model: HookedModel, capture: Capture) -> None:
        batch = TokenBatch(capture.tokens, capture.mask, [dict(m) for m in capture.meta])
        self.scan_ = scan = scan_residuals(model, batch, tau_dim=min(self.dim_threshold_, self.tau),
                                           batch_size=self.batch_size)
        flagged = scan.flagged_layers(self.dim_threshold_, self.min_abs)
        self.sink_dims_ = (sorted({int(d) for d in self.sink_dims}) if self.sink_dims is not None
                           else discover_sink_dims(flagged, self.min_layer_frac))
        bad = [d for d in self.sink_dims_ if not 0 <= d < scan.d_model]
        if bad:
            raise InputError(f"sink dimension {bad[0]} out of range: the model has {scan.d_model} hidden dims")
        self.flagged_layers_ = {int(d): [int(l) for l in flagged[:, d].nonzero().flatten()]
                                for d in flagged.any(0).nonzero().flatten()}
        self.phi_ = scan.phi(self.sink_dims_)
        self.sink_mask_ = (self.phi_ > self.tau) & capture.mask[:, None, :]
        self.sink_positions_ = sink_positions(self.sink_mask_, capture.mask, self.min_layer_frac)
        source = self.sink_source
        if source == "auto":
            source = "massive" if self.sink_dims_ else "first"
        self.sink_source_used_ = source

    def _noop(self, model: HookedModel, capture: Capture) -> torch.Tensor:
        """``[S, L, H]`` no-op score on the captured layers/heads."""
        scan = self.scan_
        S, N = capture.mask.shape
        if self.sink_source_used_ == "first":
            sinks = torch.zeros(S, model.n_layers, N, dtype=torch.bool)
            sinks[:, :, 0] = capture.mask[:, None, 0]
        else:
            sinks = self.sink_mask_
        layer_idx = torch.tensor(self.layers_)
        sinks = sinks[:, layer_idx]                                          # [S, L, N]
        n_rows = capture.mask.sum(1).clamp_min(1).float()                    # [S]
        mass = (capture.received * sinks[:, :, None, :]).sum(-1) / n_rows[:, None, None]
        group = model.n_heads // model.n_kv_heads
        kv = torch.tensor([h // group for h in self.heads_])
        vnorm = scan.value_norm[:, layer_idx][:, :, kv]                      # [S, L, H, N]
        real = capture.mask[:, None, None, :].float()
        mean_all = (vnorm * real).sum(-1) / real.sum(-1).clamp_min(1)
        sink_f = sinks[:, :, None, :].float()
        n_sink = sink_f.sum(-1)
        mean_sink = (vnorm * sink_f).sum(-1) / n_sink.clamp_min(1)
        ratio = mean_sink / mean_all.clamp_min(1e-12)
        return torch.where(n_sink > 0, mass * (1 - ratio), torch.zeros_like(mass))

    # ------------------------------------------------------------------ output
    def top_sink_heads(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the largest mean α_1 as ``(layer, head, α_1)``."""
        self._check_fitted("mean_")
        scores = np.nan_to_num(mean_and_ci(self.alpha_[..., 0])[0], nan=-np.inf).ravel()
        order = np.argsort(scores)[::-1][:k]
        n = len(self.heads_)
        return [(self.layers_[i // n], self.heads_[i % n], float(scores[i])) for i in order]


def sink_rate(model: HookedModel, dataset_batch: TokenBatch, T: int = 64, eps: float = 0.3,
              *, batch_size: int = 8) -> float:
    """Gu et al.'s sink rate: % of (sample, layer, head) with α_1 > ε on the first ``T`` tokens.

    Samples shorter than ``T`` are left out (α_1 depends on T).

    Raises:
        InputError: ``T < 2``, ε outside [0, 1], or no sample of at least ``T`` tokens.
    """
    if T < 2:
        raise InputError(f"T={T}: the sink rate needs at least 2 tokens (Gu et al. use 64)")
    if not 0 <= eps <= 1:
        raise InputError(f"eps={eps} must be in [0, 1] (default 0.3)")
    long_enough = [i for i, n in enumerate(dataset_batch.lengths.tolist()) if n >= T]
    if not long_enough:
        longest = int(dataset_batch.lengths.max()) if len(dataset_batch) else 0
        raise InputError(f"no sample has {T} tokens (longest: {longest}): load the data with --seq-len {T} "
                         "or lower T")
    rows = dataset_batch.select(long_enough)
    batch = TokenBatch(rows.tokens[:, :T].clone(), rows.mask[:, :T].clone(), rows.meta)
    cap = capture(model, batch, batch_size=batch_size, progress=False)
    alpha1 = cap.received_normalized[..., 0]
    return float((alpha1 > eps).float().mean() * 100)


def analytic_uniform_alpha1(T: int) -> float:
    """α_1 of a causal head that attends uniformly: ``(1/T) Σ_{i=1..T} 1/i``."""
    return sum(1.0 / i for i in range(1, T + 1)) / T


__all__ = ["Sinks", "analytic_uniform_alpha1", "sink_rate"]
