"""Retrieval-head probe (docs/metrics.md §10; Wu et al. 2024): does a head copy the answer from the needle?

On needle samples (:mod:`workbench.needle`; ``meta["needle_span"]``, ``meta["answer_span"]``) the
answer is teacher-forced: for each answer token ``t`` at position ``a``, the query row ``a - 1``
(the one predicting it) is a **hit** for a head when that row's arg-max key lies in the needle span
and holds the token id of ``t``. ``retrieval_score`` = hits / answer tokens per sample, then the
mean over samples with its interval. The arg-max is exact in both capture modes (stats mode: the
recompute pass of :func:`kernels.long_context.block_pass`, no map).

``retrieval_score_generated`` (``generate=True``, needs the model): the same on the model's own
greedy answer (as many tokens as the reference answer), captured again with the generated tokens
appended; ``generated_`` keeps the texts and ``answer_correct_`` whether each equals the answer.
Samples without a needle score NaN (left out of the mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from probes.base import Probe
from probes.long_context_rows import long_context_capture
from workbench.batch import TokenBatch
from workbench.capture import Capture
from workbench.errors import InputError
from workbench.long_context import LongContextSettings

_SETTINGS = LongContextSettings(blocks=False)


def needle_spans(meta: dict, length: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """``(needle_span, answer_span)`` of a needle sample (checked against its length), else None."""
    if meta.get("kind") != "needle" or "needle_span" not in meta or "answer_span" not in meta:
        return None
    (t0, t1), (a0, a1) = meta["needle_span"], meta["answer_span"]
    if not (0 <= t0 < t1 <= a0 and 1 <= a0 < a1 <= length):
        raise InputError(f"needle sample with needle span {[t0, t1]} and answer span {[a0, a1]} does not fit "
                         f"its {length} tokens: rebuild it with workbench.needle")
    return (t0, t1), (a0, a1)


def retrieval_hits(argmax: torch.Tensor, tokens: torch.Tensor, needle: tuple[int, int],
                   answer: tuple[int, int]) -> torch.Tensor:
    """Hit share ``[L, H]`` of one sample: ``argmax [L, H, N]`` arg-max keys, ``tokens [N]``."""
    (t0, t1), (a0, a1) = needle, answer
    rows = torch.arange(a0 - 1, a1 - 1)
    keys = argmax[:, :, rows].long()  # [L, H, A]
    targets = tokens[a0:a1]
    inside = (keys >= t0) & (keys < t1)
    same = tokens[keys.clamp(min=0)] == targets
    return (inside & same).float().mean(-1)


class Retrieval(Probe):
    """Per-head retrieval score on needle samples (module docstring).

    Args:
        metrics: subset of ``retrieval_score_generated, retrieval_score``; None = ``retrieval_score``
            (plus the generated one when ``generate``).
        generate: also score the model's greedy answer (needs ``fit(..., model=model)``).
        layers, heads: stored only (the capture holds the subset).

    Attributes (after ``fit``):
        metrics_, per_sample_, mean_, ci_low_, ci_high_, layers_, heads_;
        n_needle_samples_: samples with a needle; with generation ``generated_`` (texts) and
        ``answer_correct_`` (bool per needle sample, None for the others).
    """

    name: ClassVar[str] = "retrieval"
    metrics: ClassVar[tuple[str, ...]] = ("retrieval_score_generated", "retrieval_score")
    bounds: ClassVar[dict[str, tuple[float, float]]] = {m: (0.0, 1.0) for m in metrics}

    def __init__(self, metrics: Sequence[str] | None = None, *, generate: bool = False,
                 layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> None:
        self.metrics = metrics
        self.generate = generate
        self.layers, self.heads = layers, heads

    def check_params(self) -> None:
        if self.metrics is not None:
            self.check_metrics(self.metrics)
        if not isinstance(self.generate, bool):
            raise InputError(f"generate={self.generate!r} must be True or False")

    def _wanted(self) -> tuple[str, ...]:
        if self.metrics is not None:
            return tuple(self.metrics)
        return ("retrieval_score", "retrieval_score_generated") if self.generate else ("retrieval_score",)

    def long_context_request(self) -> LongContextSettings:
        """What the pipeline's capture must record for this probe (the arg-max rows only)."""
        return _SETTINGS

    def check_run(self, model, batch) -> None:
        self.check_params()
        if not any(m.get("kind") == "needle" for m in batch.meta):
            raise InputError("the retrieval probe needs needle samples: use --dataset needle or a .jsonl of "
                             '{"prompt", "needle", "answer"} items')
        if "retrieval_score_generated" in self._wanted() and not model.causal:
            raise InputError(f"{model.name} is an encoder: retrieval_score_generated needs a causal language model")

    def cost_forwards(self, n_layers: int, n_heads: int, n_tokens: int, samples: int) -> float | None:
        """Nothing beyond the capture, except with ``generate``: per sample a greedy answer (about one
        forward of the prompt; the answer's few tokens reuse its cache) and a second capture with it."""
        return 2.0 * samples if "retrieval_score_generated" in self._wanted() else None

    def fit(self, capture: Capture | None = None, *, model=None, batch: TokenBatch | None = None) -> "Retrieval":
        """Scores from ``capture`` (its ``lc.argmax`` rows, recaptured with ``model`` when missing)."""
        self.check_inputs(capture, model, batch)
        self.check_params()
        wanted = self._wanted()
        if "retrieval_score_generated" in wanted and model is None:
            raise InputError("retrieval_score_generated needs the model (greedy answers): call fit(capture, model=model)")
        self.metrics_ = wanted
        self.layers_, self.heads_ = list(capture.layers), list(capture.heads)
        cap = long_context_capture(self.name, capture, model, _SETTINGS)
        spans = [needle_spans(m, int(n)) for m, n in zip(cap.meta, cap.lengths())]
        self.n_needle_samples_ = sum(s is not None for s in spans)
        self.per_sample_ = {}
        if "retrieval_score" in wanted:
            self.per_sample_["retrieval_score"] = self._scores(cap, spans, cap.tokens)
        if "retrieval_score_generated" in wanted:
            self.per_sample_["retrieval_score_generated"] = self._generated(cap, spans, model)
        self._summarise()
        return self

    def fit_without_needles(self, n_samples: int, layers: Sequence[int], heads: Sequence[int]) -> "Retrieval":
        """What ``fit`` gives on ``n_samples`` samples none of which has a needle (every score NaN),
        without a forward: a shard of a sharded run (:mod:`probes.sharded`) that holds no needle."""
        self.check_params()
        self.metrics_ = self._wanted()
        self.layers_, self.heads_ = list(layers), list(heads)
        self.n_needle_samples_ = 0
        empty = torch.full((n_samples, len(self.layers_), len(self.heads_)), float("nan"))
        self.per_sample_ = {m: empty.clone() for m in self.metrics_}
        if "retrieval_score_generated" in self.metrics_:
            self.generated_, self.answer_correct_ = [None] * n_samples, [None] * n_samples
        self._summarise()
        return self

    def _scores(self, cap: Capture, spans: list, tokens: torch.Tensor) -> torch.Tensor:
        """``[S, L, H]`` hit shares (NaN for samples without a needle)."""
        argmax = cap.extras["lc.argmax"]
        out = torch.full((cap.n_samples, len(cap.layers), len(cap.heads)), float("nan"))
        for s, span in enumerate(spans):
            if span is not None:
                out[s] = retrieval_hits(argmax[s], tokens[s], *span)
        return out

    def _generated(self, cap: Capture, spans: list, model) -> torch.Tensor:
        """Greedy answers, captured again with them appended, scored like the teacher-forced ones."""
        from workbench.forward import generate_ids

        if cap.info.get("interventions"):
            raise InputError("retrieval_score_generated runs the unedited model: capture without interventions")
        sequences, meta, rows = [], [], []
        self.generated_: list[str | None] = [None] * cap.n_samples
        self.answer_correct_: list[bool | None] = [None] * cap.n_samples
        for s, span in enumerate(spans):
            if span is None:
                continue
            (t0, t1), (a0, a1) = span
            prompt = cap.tokens[s, :a0]
            new = generate_ids(model, prompt, max_new_tokens=a1 - a0)
            if new.numel() == 0:
                continue
            reference = cap.tokens[s, a0:a1]
            self.generated_[s] = model.tokenizer.decode(new)
            self.answer_correct_[s] = new.numel() == reference.numel() and bool((new == reference).all())
            sequences.append(torch.cat([prompt, new]))
            meta.append(dict(cap.meta[s], answer_span=[a0, a0 + new.numel()]))
            rows.append(s)
        out = torch.full((cap.n_samples, len(cap.layers), len(cap.heads)), float("nan"))
        if not sequences:
            return out
        batch = model.batch_from_ids(sequences, meta)
        from workbench.capture import capture as run_capture

        again = run_capture(model, batch, layers=cap.layers, heads=cap.heads, mode=cap.mode, progress=False,
                            interventions=cap.info.get("interventions"), detectors=False, long_context=_SETTINGS)
        gen_spans = [needle_spans(m, int(n)) for m, n in zip(again.meta, again.lengths())]
        scores = self._scores(again, gen_spans, again.tokens)
        for i, s in enumerate(rows):
            out[s] = scores[i]
        return out
