"""Direct logit attribution per head (docs/metrics.md §11): the probe ``attribution``.

- ``dla``: each head's direct contribution, at each sample's last prompt token, to the logit
  of the target: the first token of the item's ``answer`` (tokenized on its own, no special
  tokens), or, for items without an answer, the model's own top prediction there.
- ``dla_diff``: the same for ``logit(answer) − logit(distractor)``; NaN for items without a
  distractor (the bundled ``ioi`` has one).

One forward per batch chunk (:func:`workbench.logit_attribution.components`, TransformerLens hooks
on the one forward path); mean and 95 % interval over samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import plotly.graph_objects as go
import torch

from probes.base import Probe
from probes.figures import head_heatmap
from workbench.batch import TokenBatch
from workbench.capture import Capture
from workbench.errors import InputError, check_int
from workbench.logit_attribution import answer_token, components, project
from workbench.model import HookedModel

AttributionMetric = Literal["dla", "dla_diff"]


class LogitAttribution(Probe):
    """Per-head direct logit attribution (see module docstring).

    Args:
        metrics: subset of :attr:`metrics` (default both).
        layers, heads: restrict the reported heads (default all).
        batch_size: samples per forward.

    Attributes (after ``fit``):
        metrics_, layers_, heads_: what was computed.
        per_sample_: metric -> ``[S, L_sel, H_sel]``; mean_, ci_low_, ci_high_: metric -> ``[L_sel, H_sel]``.
        targets_: ``[S]`` target token ids; target_source_: per sample ``"answer"`` or ``"top"``.
        identity_error_: largest ``|Σ components − logit|`` over samples (the decomposition's check).
    """

    name: ClassVar[str] = "attribution"
    metrics: ClassVar[tuple[str, ...]] = ("dla", "dla_diff")
    needs_capture: ClassVar[bool] = False
    needs_model: ClassVar[bool] = True
    needs_batch: ClassVar[bool] = True

    def __init__(self, metrics: Sequence[AttributionMetric] | None = None, *,
                 layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                 batch_size: int = 16) -> None:
        self.metrics = metrics
        self.layers, self.heads = layers, heads
        self.batch_size = batch_size

    def check_params(self) -> None:
        self.check_metrics(self.metrics)
        check_int("batch_size", self.batch_size)

    def check_run(self, model, batch) -> None:
        self.check_params()
        if not model.causal:
            raise InputError(f"{model.name} is an encoder: direct logit attribution needs a causal language model")

    def cost_forwards(self, n_layers: int, n_heads: int, n_tokens: int, samples: int) -> float | None:
        """One forward of every sample (the per-head decomposition is read off that forward)."""
        return float(samples)

    def fit(self, capture: Capture | None = None, *, model: HookedModel | None = None,
            batch: TokenBatch | None = None) -> "LogitAttribution":
        """Attribution of every selected head on ``batch`` (``capture`` is not used)."""
        self.check_inputs(capture, model, batch)
        self.check_run(model, batch)
        self.metrics_ = self.check_metrics(self.metrics)
        self.layers_, self.heads_ = model.check_heads(self.layers, self.heads)
        values: dict[str, list[torch.Tensor]] = {m: [] for m in self.metrics_}
        targets, sources, errors = [], [], [0.0]
        for part in batch.chunks(self.batch_size):
            parts = components(model, part)
            answers = [m.get("answer") for m in part.meta]
            top = parts.logits.argmax(-1)
            target = torch.tensor([answer_token(model, a) if a is not None else int(t) for a, t in zip(answers, top)])
            targets.append(target)
            sources += ["answer" if a is not None else "top" for a in answers]
            heads = parts.head_index[self.layers_][:, self.heads_]  # [L_sel, H_sel] component indices
            rows = torch.arange(len(part))
            if "dla" in self.metrics_:
                contrib, _ = project(model, parts, target)
                errors.append(float((contrib.sum(1) - parts.logits[rows, target]).abs().max()))
                values["dla"].append(contrib[:, heads])
            if "dla_diff" in self.metrics_:
                has = torch.tensor(["distractor" in m for m in part.meta])
                other = torch.tensor([answer_token(model, m["distractor"]) if "distractor" in m else int(t)
                                      for m, t in zip(part.meta, target)])
                contrib, _ = project(model, parts, target, other)
                expected = parts.logits[rows, target] - parts.logits[rows, other]
                errors.append(float((contrib.sum(1) - expected).abs().max()))
                values["dla_diff"].append(torch.where(has[:, None, None], contrib[:, heads], float("nan")))
        self.per_sample_ = {m: torch.cat(v) for m, v in values.items()}
        self.targets_ = torch.cat(targets)
        self.target_source_ = sources
        self.identity_error_ = max(errors)
        self._summarise()
        return self

    def figure(self, metric: AttributionMetric = "dla_diff") -> go.Figure:
        """Layer × head heatmap of one fitted metric."""
        self._check_fitted("mean_")
        self.check_metrics([metric])
        if metric not in self.mean_:
            raise InputError(f"metric '{metric}' was not computed: fit with it in metrics")
        return head_heatmap(self.to_frame(), metric, probe=self.name, title=f"direct logit attribution: {metric}")

    def figures(self) -> dict[str, go.Figure]:
        """One heatmap per fitted metric."""
        self._check_fitted("mean_")
        return {metric: self.figure(metric) for metric in self.metrics_}


__all__ = ["LogitAttribution"]
