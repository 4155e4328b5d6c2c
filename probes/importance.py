"""Head importance (docs/metrics.md §4): ablation Δloss, gradient importance, attribution patching.

- ``ablation_zero`` / ``ablation_mean`` / ``ablation_resample``: per sample, the next-token
  cross-entropy (mean over the sample's real next-token positions) with the head's output ``z``
  replaced, minus the clean one; reference for mean/resample = the batch itself
  (:class:`workbench.interventions.ReferenceZ`: per-position mean; resample from sample
  ``(b + 1) mod B``, a fixed permutation). Value = mean over samples, 95% interval over samples.
- ``gradient`` (Michel et al. 2019): ``z_h <- ξ_h z_h`` with ``ξ = 1``; per sample ``|∂L_x/∂ξ_h|``
  (one backward: ξ has a sample axis), ``I_h = E_x |∂L_x/∂ξ_h|``, divided by the L2 norm of ``I``
  over the layer's heads (so each layer has unit norm); the interval is on the same scale.
- ``attribution_patching`` (Nanda): ``Δm_h ≈ Σ_{pos,d} (z_clean - z_corrupt) · ∂m/∂z |_corrupt``,
  all heads from two forwards and one backward; ``m`` = logit difference answer − distractor at
  the last token (IOI data: meta ``answer``/``distractor``/``corrupt_prompt``) or the next-token
  loss of the clean targets. The corrupted run is the ``corrupt_prompt`` batch when present, else
  the batch resampled (sample b's input is sample ``(b + 1) mod B``). With ``validate_patching``
  the real activation patching (clean ``z`` of one head into the corrupted run) is measured for
  every head and ``patching_rank_correlation_`` is the Spearman correlation of the two.

All forwards use the kernel-backed Hugging Face copy with exact attention, many ablations per
forward (:mod:`probes.pruning`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import numpy as np
import plotly.graph_objects as go
import torch

from probes.base import Probe
from probes.figures import head_heatmap
from probes.pruning import (clean_run, kernel_logits, next_token_valid, per_sample_ce, pruning_curve,
                            replaced_metric, single_head_masks)
from workbench.batch import TokenBatch
from workbench.capture import Capture
from workbench.errors import InputError
from workbench.interventions import ReferenceZ
from workbench.attention_backend import AttentionCall
from workbench.model import HookedModel

ImportanceMetric = Literal["ablation_zero", "ablation_mean", "ablation_resample", "gradient",
                           "attribution_patching"]
PatchingMetric = Literal["auto", "loss", "logit_diff"]
_ABLATIONS = {"ablation_zero": "zero", "ablation_mean": "mean", "ablation_resample": "resample"}


class HeadImportance(Probe):
    """Per-head importance scores (see module docstring).

    Args:
        metrics: subset of :attr:`metrics` (default all).
        patching_metric: ``"auto"`` (logit difference when every sample has ``answer``,
            ``distractor`` and ``corrupt_prompt``, else loss), ``"loss"`` or ``"logit_diff"``.
        validate_patching: also run real activation patching (one copy per head) and report
            the rank correlation.
        layers, heads: restrict the ablation / patching sweep (default all).
        tokens_per_forward: token budget of one batched forward (copies × B × N).

    Attributes (after ``fit``):
        metrics_: the metrics computed.
        per_sample_: metric -> ``[S, L_sel, H_sel]``; mean_, ci_low_, ci_high_: metric -> ``[L_sel, H_sel]``.
        gradient_raw_: ``[S, n_layers, Hq]`` unnormalised ``|∂L_x/∂ξ_h|`` (with ``gradient``; what a
            sharded run merges before normalising).
        layers_, heads_: the swept indices. clean_loss_: token-weighted clean loss.
        patching_metric_: the metric used; activation_patching_: ``[L_sel, H_sel]`` real patching
            effect (mean over samples) or None; patching_rank_correlation_: Spearman ρ (NaN when
            not validated).
    """

    name: ClassVar[str] = "importance"
    metrics: ClassVar[tuple[str, ...]] = ("ablation_zero", "ablation_mean", "ablation_resample", "gradient",
                                          "attribution_patching")
    needs_capture: ClassVar[bool] = False
    needs_model: ClassVar[bool] = True
    needs_batch: ClassVar[bool] = True

    def __init__(self, metrics: Sequence[ImportanceMetric] | None = None, *,
                 patching_metric: PatchingMetric = "auto", validate_patching: bool = True,
                 layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                 tokens_per_forward: int = 2048) -> None:
        self.metrics = metrics
        self.patching_metric = patching_metric
        self.validate_patching = validate_patching
        self.layers, self.heads = layers, heads
        self.tokens_per_forward = tokens_per_forward

    def check_params(self) -> None:
        self.check_metrics(self.metrics)
        if self.patching_metric not in ("auto", "loss", "logit_diff"):
            raise InputError(f"unknown patching_metric '{self.patching_metric}': use auto, loss or logit_diff")
        if self.tokens_per_forward < 1:
            raise InputError(f"tokens_per_forward={self.tokens_per_forward}: give a positive token budget")

    def check_run(self, model, batch) -> None:
        """What ``fit`` would refuse only after its sweep, checked before any forward: a causal
        model, and >= 2 samples for ``ablation_resample`` and for attribution patching without
        corrupt prompts (both take each sample's inputs from another sample)."""
        self.check_params()
        metrics = self.check_metrics(self.metrics)
        if not model.causal:
            raise InputError(f"{model.name} is an encoder: head importance uses the next-token loss of a causal LM")
        if "ablation_resample" in metrics and len(batch) < 2:
            raise InputError("ablation_resample takes each sample's head outputs from another sample: give >= 2 "
                             "samples, or leave ablation_resample out of metrics")
        has_corrupt = all("corrupt_prompt" in m for m in batch.meta) if batch.meta else False
        if "attribution_patching" in metrics and not has_corrupt and len(batch) < 2:
            raise InputError("attribution patching without corrupt prompts resamples the batch: give >= 2 samples "
                             "(a dataset, e.g. ioi), or leave attribution_patching out of metrics")

    def cost_forwards(self, n_layers: int, n_heads: int, n_tokens: int, samples: int) -> float | None:
        """The clean forward, one ablated copy of the batch per swept head and ablation metric, a
        forward + backward for ``gradient`` and for ``attribution_patching`` (plus, validated, the
        corrupted clean run and one patched copy per swept head)."""
        metrics = self.check_metrics(self.metrics)
        swept = (n_layers if self.layers is None else len(self.layers)) * (n_heads if self.heads is None else len(self.heads))
        per_sample = 1 + swept * sum(m in _ABLATIONS for m in metrics) + 3 * ("gradient" in metrics)
        if "attribution_patching" in metrics:
            per_sample += 3 + ((1 + swept) if self.validate_patching else 0)
        return float(per_sample * samples)

    def fit(self, capture: Capture | None = None, *, model: HookedModel | None = None,
            batch: TokenBatch | None = None) -> "HeadImportance":
        """Scores of the ``layers``/``heads`` sweep on ``batch`` (``capture`` is not used)."""
        self.check_inputs(capture, model, batch)
        self.check_params()
        self.metrics_ = self.check_metrics(self.metrics)
        if not model.causal:
            raise InputError(f"{model.name} is an encoder: head importance uses the next-token loss of a causal LM")
        layers, heads = model.check_heads(self.layers, self.heads)
        if "ablation_resample" in self.metrics_ and len(batch) < 2:  # one sample would resample itself
            raise InputError("ablation_resample takes each sample's head outputs from another sample: give >= 2 "
                             "samples, or leave ablation_resample out of metrics")
        valid = next_token_valid(batch)
        if not valid.any():
            raise InputError("importance needs at least one sequence of 2 or more tokens")
        self.layers_, self.heads_ = layers, heads
        logits, z_clean, inputs = clean_run(model, batch, layer_inputs=True)
        clean = per_sample_ce(logits[None], batch.tokens, valid)[0].cpu()
        self.clean_loss_ = float(clean.nan_to_num().mul(valid.sum(-1)).sum() / valid.sum())
        self.per_sample_: dict[str, torch.Tensor] = {}
        masks = single_head_masks(model.n_layers, model.n_heads, layers, heads)
        positions = torch.arange(batch.tokens.shape[1])
        for metric in self.metrics_:
            if metric in _ABLATIONS:
                sources = _ablation_sources(_ABLATIONS[metric], z_clean, batch, positions)
                ablated = replaced_metric(model, batch, masks, sources,
                                          lambda lg: per_sample_ce(lg, batch.tokens, valid),
                                          tokens_per_forward=self.tokens_per_forward, layer_inputs=inputs)
                self.per_sample_[metric] = (ablated - clean[None]).T.reshape(len(batch), len(layers), len(heads))
            elif metric == "gradient":
                self.gradient_raw_ = gradient_raw(model, batch, self.tokens_per_forward)
                self.per_sample_[metric] = _select(normalise_gradient(self.gradient_raw_), layers, heads)
        self.activation_patching_, self.patching_rank_correlation_ = None, float("nan")
        if "attribution_patching" in self.metrics_:
            self._fit_patching(model, batch, z_clean, masks)
        self._summarise()
        return self

    def _fit_patching(self, model: HookedModel, batch: TokenBatch, z_clean: dict[int, torch.Tensor],
                      masks: torch.Tensor) -> None:
        corrupt, metric, sample_ok, self.patching_metric_ = _patching_setup(model, batch, self.patching_metric)
        width = corrupt.tokens.shape[1]
        z_clean = {layer: _fit_width(z, width) for layer, z in z_clean.items()}
        position_ok = _fit_width(batch.mask, width) & corrupt.mask
        estimate, corrupt_metric = attribution_patching(model, corrupt, z_clean, metric, position_ok)
        nan = torch.tensor(float("nan"))
        estimate = torch.where(sample_ok[:, None, None], estimate, nan)
        self.per_sample_["attribution_patching"] = _select(estimate, self.layers_, self.heads_)
        self.n_patching_samples_ = int(sample_ok.sum())
        if not self.validate_patching:
            return
        _, _, corrupt_inputs = clean_run(model, corrupt, layer_inputs=True)
        patched = replaced_metric(model, corrupt, masks, z_clean, metric, tokens_per_forward=self.tokens_per_forward,
                                  layer_inputs=corrupt_inputs)
        effect = torch.where(sample_ok[None], patched - corrupt_metric[None], nan)
        effect = effect.T.reshape(len(batch), len(self.layers_), len(self.heads_))
        self.activation_patching_ = np.nanmean(effect.numpy(), axis=0)
        est_mean = np.nanmean(self.per_sample_["attribution_patching"].numpy(), axis=0)
        finite = np.isfinite(est_mean) & np.isfinite(self.activation_patching_)
        if finite.sum() >= 2:
            from scipy.stats import spearmanr

            rho = spearmanr(est_mean[finite], self.activation_patching_[finite]).statistic
            self.patching_rank_correlation_ = float(rho)

    def figure(self, metric: ImportanceMetric = "ablation_zero") -> go.Figure:
        """Layer × head heatmap of one fitted metric."""
        self._check_fitted("mean_")
        self.check_metrics([metric])
        if metric not in self.mean_:
            raise InputError(f"metric '{metric}' was not computed: fit with it in metrics")
        return head_heatmap(self.to_frame(), metric, probe=self.name, title=f"head importance: {metric}")

    def figures(self) -> dict[str, go.Figure]:
        """One heatmap per fitted metric."""
        self._check_fitted("mean_")
        return {metric: self.figure(metric) for metric in self.metrics_}


def _select(values: torch.Tensor, layers: Sequence[int], heads: Sequence[int]) -> torch.Tensor:
    return values[:, list(layers)][:, :, list(heads)]


def _fit_width(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Cut or zero-pad axis 1 to ``width``."""
    if tensor.shape[1] >= width:
        return tensor[:, :width]
    pad = torch.zeros(tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:], dtype=tensor.dtype)
    return torch.cat([tensor, pad.to(tensor.device)], 1)


def _ablation_sources(kind: str, z_clean: dict[int, torch.Tensor], batch: TokenBatch,
                      positions: torch.Tensor) -> dict[int, torch.Tensor | None]:
    """Replacement ``z`` per layer for one ablation kind (the batch is its own reference)."""
    if kind == "zero":
        return {}
    refs = {layer: ReferenceZ(z, batch.mask) for layer, z in z_clean.items()}
    if kind == "mean":
        return {layer: ref.mean_at(positions) for layer, ref in refs.items()}
    return {layer: ref.resample_at(len(batch), positions) for layer, ref in refs.items()}


def gradient_importance(model: HookedModel, batch: TokenBatch, tokens_per_forward: int = 2048) -> torch.Tensor:
    """Per-sample ``|∂L_x/∂ξ_h|`` scaled by the per-layer L2 norm of its mean, ``[S, n_layers, Hq]``."""
    return normalise_gradient(gradient_raw(model, batch, tokens_per_forward))


def normalise_gradient(values: torch.Tensor) -> torch.Tensor:
    """``[S, L, H]`` raw ``|∂L_x/∂ξ_h|`` divided by the L2 norm over the layer's heads of the mean
    over samples (0 where that norm is 0); a merged run divides its merged mean the same way."""
    norm = torch.linalg.vector_norm(values.nanmean(0), dim=-1, keepdim=True)  # [L, 1]
    return torch.where(norm > 0, values / norm.clamp_min(1e-30), torch.zeros_like(values))


def gradient_raw(model: HookedModel, batch: TokenBatch, tokens_per_forward: int = 2048) -> torch.Tensor:
    """Per-sample ``|∂L_x/∂ξ_h|`` ``[S, n_layers, Hq]`` (NaN for a sample without a scored position).

    Samples go through in chunks (their losses are independent, so one backward per chunk
    gives every sample's own gradient).
    """
    per_sample = []
    chunk = max(1, tokens_per_forward // batch.tokens.shape[1])
    for part in batch.chunks(chunk):
        xi = torch.ones(len(part), model.n_layers, model.n_heads, requires_grad=True)

        def edit(z: torch.Tensor, call: AttentionCall) -> torch.Tensor:
            return z * xi[:, call.layer, None, :, None].to(z)
        logits = kernel_logits(model, part, [edit], grad=True)
        losses = per_sample_ce(logits[None], part.tokens, next_token_valid(part))[0]
        (grad,) = torch.autograd.grad(losses.nan_to_num().sum(), xi)
        per_sample.append(torch.where(losses.isnan()[:, None, None].to(grad.device), float("nan"), grad.abs()).cpu())
    return torch.cat(per_sample)


def _patching_setup(model: HookedModel, batch: TokenBatch, choice: str):
    """``(corrupt batch, metric fn, sample_ok [B], metric name)`` for attribution patching."""
    meta = batch.meta
    has_corrupt = all("corrupt_prompt" in m for m in meta)
    has_answers = all("answer" in m and "distractor" in m for m in meta)
    name = choice if choice != "auto" else ("logit_diff" if has_corrupt and has_answers else "loss")
    if name == "logit_diff" and not has_answers:
        raise InputError("patching_metric='logit_diff' needs 'answer' and 'distractor' in every sample's meta "
                         "(e.g. the ioi dataset): use patching_metric='loss'")
    if has_corrupt:
        corrupt = model.tokenize([m["corrupt_prompt"] for m in meta])
        sample_ok = corrupt.lengths == batch.lengths
    else:
        if len(batch) < 2:
            raise InputError("attribution patching without corrupt prompts resamples the batch: give >= 2 samples")
        order = (torch.arange(len(batch)) + 1) % len(batch)
        corrupt = TokenBatch(batch.tokens[order], batch.mask[order])
        sample_ok = torch.ones(len(batch), dtype=torch.bool)
    width = max(batch.tokens.shape[1], corrupt.tokens.shape[1])
    tokens = torch.full((len(batch), width), model.pad_id, dtype=torch.long)
    tokens[:, :corrupt.tokens.shape[1]] = corrupt.tokens
    corrupt = TokenBatch(tokens, _fit_width(corrupt.mask, width))
    clean_tokens, clean_mask = _fit_width(batch.tokens, width), _fit_width(batch.mask, width)
    if name == "loss":
        valid = next_token_valid(TokenBatch(clean_tokens, clean_mask)) & next_token_valid(corrupt)
        sample_ok = sample_ok & valid.any(-1)
        return corrupt, (lambda lg: per_sample_ce(lg, clean_tokens, valid)), sample_ok, name
    answer = torch.tensor([_first_token(model, m["answer"]) for m in meta])
    distractor = torch.tensor([_first_token(model, m["distractor"]) for m in meta])
    sample_ok = sample_ok & (answer != distractor)
    last = (batch.lengths - 1).clamp_min(0)
    rows = torch.arange(len(batch))

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        final = logits[:, rows, last].float()  # [c, B, V]
        return final[:, rows, answer] - final[:, rows, distractor]
    return corrupt, logit_diff, sample_ok, name


def _first_token(model: HookedModel, text: str) -> int:
    ids = model.tokenizer(str(text), add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"answer/distractor '{text}' has no token: fix the dataset item")
    return int(ids[0])


def attribution_patching(model: HookedModel, corrupt: TokenBatch, z_clean: dict[int, torch.Tensor], metric,
                         position_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear estimate of patching each head's clean ``z`` into the corrupted run.

    Returns ``(estimate [B, n_layers, Hq], metric on the corrupted run [B])`` from one forward
    and one backward of the corrupted batch (the clean ``z`` comes from the caller's forward).
    """
    anchor = torch.zeros((), requires_grad=True)  # puts every z in the graph even with frozen weights
    z_run: dict[int, torch.Tensor] = {}

    def keep(z: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        z = z + anchor.to(z)
        z_run[call.layer] = z
        return z
    logits = kernel_logits(model, corrupt, [keep], grad=True)
    values = metric(logits[None])[0]
    layers = sorted(z_run)
    grads = torch.autograd.grad(values.nan_to_num().sum(), [z_run[layer] for layer in layers])
    estimate = torch.zeros(len(corrupt), model.n_layers, model.n_heads)
    for layer, grad in zip(layers, grads):
        weight = position_ok[:, :, None, None].to(grad.device, torch.float32)
        diff = (z_clean[layer].to(grad.device) - z_run[layer].detach().float()) * weight
        estimate[:, layer] = (diff * grad.float()).sum((1, 3)).cpu()
    return estimate, values.detach().float().cpu()


__all__ = ["HeadImportance", "attribution_patching", "gradient_importance", "pruning_curve"]
