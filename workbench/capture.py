"""Capture: one forward over a batch that records only what the probes need.

Both modes run the one forward (:func:`workbench.forward.run`) on the one model; the mode picks
the attention backend and every intervention is applied by the same code in both:

- ``patterns``: the eager backend materialises each layer's map and fires
  ``blocks.L.attn.hook_pattern``; a TransformerLens hook there reduces it on the fly to the
  statistics (the kernels' own :func:`kernels.reference.stats_from_probs`) and keeps the full map
  only when asked (short inputs);
- ``stats``: the recompute kernels stream the same statistics, never building a ``[q, k]`` map
  (:mod:`workbench.capture_stats`);
- ``auto``: ``patterns`` up to :data:`AUTO_PATTERNS_MAX_TOKENS` tokens, ``stats`` above (the one
  place this threshold lives).

The forward stops after the last captured layer. The result holds no reference to the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

from workbench.batch import TokenBatch
from workbench.capture_data import Capture, CaptureMode
from workbench.errors import InputError, check_int
from workbench.forward import Hook, run
from workbench.model import bind_hook, hook_name, HookedModel
from workbench.pattern_rows import DETECTOR_ROWS, STAT_NAMES, detector_rows, map_received_mass, map_row_statistics
from workbench.progress import Progress, as_progress

AUTO_PATTERNS_MAX_TOKENS = 512
"""``mode="auto"``: inputs up to this many tokens are captured with full patterns, longer ones in stats mode."""

__all__ = ["AUTO_PATTERNS_MAX_TOKENS", "Capture", "CaptureMode", "as_batch", "capture", "resolve_mode"]


def resolve_mode(mode: str, n_tokens: int, patterns_max_tokens: int | None = None) -> CaptureMode:
    """``"patterns"`` / ``"stats"`` as given; ``"auto"`` by the input width (patterns up to
    ``patterns_max_tokens``, default :data:`AUTO_PATTERNS_MAX_TOKENS`)."""
    if mode == "auto":
        limit = AUTO_PATTERNS_MAX_TOKENS if patterns_max_tokens is None else patterns_max_tokens
        return "patterns" if n_tokens <= limit else "stats"
    if mode not in ("patterns", "stats"):
        raise InputError(f"unknown capture mode '{mode}': use 'patterns', 'stats' or 'auto'")
    return mode


def as_batch(model: HookedModel, inputs: TokenBatch | Sequence[str] | str, max_tokens: int | None = None) -> TokenBatch:
    """Accept a batch, one prompt, or a list of prompts."""
    if isinstance(inputs, TokenBatch):
        if len(inputs) == 0:
            raise InputError("empty dataset: it has no sequences")
        return inputs.check(getattr(model.bridge.cfg, "d_vocab", None))
    if not isinstance(inputs, (str, list, tuple)):
        raise InputError(f"inputs must be a TokenBatch, a prompt or a list of prompts, got {type(inputs).__name__}")
    return model.tokenize([inputs] if isinstance(inputs, str) else list(inputs), max_tokens=max_tokens)


def capture(model, inputs: TokenBatch | Sequence[str] | str, *,
            layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
            mode: Literal["patterns", "stats", "auto"] = "patterns", keep_patterns: bool = False,
            keep_qk: bool = False, batch_size: int = 8, local_window: int = 8, fwd_hooks: Sequence[Hook] = (),
            interventions=None, progress: bool | Callable | Progress = True, max_tokens: int | None = None,
            detectors: bool = True, long_context=None) -> Capture:
    """Run ``inputs`` through ``model`` once and record per-head attention facts.

    Args:
        model: a :class:`HookedModel` (or anything :func:`workbench.load_model` accepts: a
            ``TransformerBridge`` or Hugging Face model already in memory, a name, a folder).
        inputs: a :class:`TokenBatch`, a prompt, or a list of prompts (padding handled).
        layers, heads: subset to record (default all); validated against the model.
        mode: ``"patterns"``, ``"stats"`` or ``"auto"`` (see the module docstring).
        keep_patterns: keep the full maps (patterns mode; short inputs only).
        keep_qk: keep Q/K/LSE for exact tiles later (stats mode).
        batch_size: samples per forward.
        local_window: ``w`` of the local-mass statistic.
        fwd_hooks: extra TransformerLens hooks active during the capture (both modes).
        interventions: an :class:`workbench.interventions.InterventionSet` (or its text) active
            during the capture; the statistics describe the edited patterns in both modes.
        progress: True for a terminal bar, False for none, or a callback ``(fraction, message)``
            (:class:`workbench.progress.Progress`, which also carries a cancel check).
        detectors: also record the detector rows ``induction_mass`` / ``duplicate_mass``
            (docs/metrics.md §2); ``False`` skips them (about 8% of a long stats capture).
        long_context: a :class:`workbench.long_context.LongContextSettings` to also record the
            arg-max key, streaming mass and block-sparsity rows (``Capture.extras["lc.*"]``), or None.
    """
    from workbench.interventions import as_intervention_set
    from workbench.model import load_model

    model = load_model(model) if not isinstance(model, HookedModel) else model
    check_int("batch_size", batch_size)
    check_int("local_window", local_window, 0)
    layers, heads = model.check_heads(layers, heads)
    batch = as_batch(model, inputs, max_tokens)
    mode = resolve_mode(mode, batch.tokens.shape[1])
    spec = as_intervention_set(interventions)
    edits = spec.compile(model, batch)
    tracker = as_progress(progress, desc=f"capture ({mode} mode, {batch.tokens.shape[1]} tokens)", total=len(batch))
    extra = _long_context_recorder(model, batch, layers, heads, long_context, edits)
    if mode == "stats":
        from workbench.capture_stats import capture_stats

        cap = capture_stats(model, batch, layers=layers, heads=heads, keep_qk=keep_qk, batch_size=batch_size,
                            local_window=local_window, fwd_hooks=fwd_hooks, edits=edits, progress=tracker,
                            detectors=detectors, recorders=extra)
    else:
        cap = _capture_patterns(model, batch, layers, heads, keep_patterns, batch_size, local_window, fwd_hooks,
                                edits, tracker, detectors, extra)
    for recorder in extra:
        cap.extras.update(recorder.extras())
        cap.info["long_context"] = recorder.settings.as_dict()
    if len(spec):
        cap.info["interventions"] = spec.text
    if edits is not None and edits.pattern:
        cap.info["pattern_edited_heads"] = sorted([layer, head] for layer, heads in edits.pattern.items()
                                                  for head in heads)
    return cap


def _long_context_recorder(model: HookedModel, batch: TokenBatch, layers: list[int], heads: list[int],
                           settings, edits) -> list:
    """``[LongContextRecorder]`` when ``settings`` asks for the long-context rows, else ``[]``."""
    if settings is None:
        return []
    from workbench.long_context import LongContextRecorder

    if edits is not None and edits.has_pattern_edits:
        raise InputError("the long-context rows (retrieval, sparsity) describe unedited attention: drop the "
                         "pattern-level interventions (softpag, redistribute) or run those probes separately")
    return [LongContextRecorder(model, len(batch), batch.tokens.shape[1], layers, heads, settings)]


def _capture_patterns(model: HookedModel, batch: TokenBatch, layers: list[int], heads: list[int],
                      keep_patterns: bool, batch_size: int, local_window: int, fwd_hooks: Sequence[Hook],
                      edits, tracker: Progress, detectors: bool, recorders: Sequence = ()) -> Capture:
    """Patterns mode: a TransformerLens hook on each captured layer's ``hook_pattern``."""
    B, N = batch.tokens.shape
    L, H = len(layers), len(heads)
    detector_names = DETECTOR_ROWS if detectors else ()
    row_stats = {name: torch.zeros(B, L, H, N) for name in STAT_NAMES + detector_names}
    received = torch.zeros(B, L, H, N)
    received_norm = torch.zeros(B, L, H, N)
    patterns = {layer: torch.zeros(B, H, N, N) for layer in layers} if keep_patterns else None
    head_index = torch.tensor(heads)
    start = 0
    for chunk in batch.chunks(batch_size):
        rows, width = slice(start, start + len(chunk)), chunk.tokens.shape[1]
        mask = chunk.mask

        def record(pattern: torch.Tensor, hook, *, li: int, layer: int, rows=rows, width=width, chunk=chunk, mask=mask):
            tracker.check()
            A = pattern.detach()[:, head_index].float().cpu()
            for name, value in map_row_statistics(A, mask, causal=model.causal, local_window=local_window).items():
                row_stats[name][rows, li, :, :width] = value
            if detectors:
                for name, value in detector_rows(A, chunk.tokens, mask).items():
                    row_stats[name][rows, li, :, :width] = value
            received[rows, li, :, :width], received_norm[rows, li, :, :width] = \
                map_received_mass(A, mask, causal=model.causal)
            if patterns is not None:
                patterns[layer][rows, :, :width, :width] = A * mask[:, None, :, None]
            tracker.step_info(f"layer {layer + 1}/{model.n_layers}")
            return pattern

        hooks = list(fwd_hooks) + [
            (hook_name(layer, "pattern"), bind_hook(record, li=li, layer=layer)) for li, layer in enumerate(layers)
        ]
        for recorder in recorders:
            recorder.start(chunk, start)
        run(model, chunk, backend="eager", edits=edits, fwd_hooks=hooks, recorders=recorders,
            stop_after_layer=max(layers))
        start += len(chunk)
        tracker.advance(len(chunk))
    tracker.close()
    return Capture.from_rows(model, batch, "patterns", layers, heads, row_stats, received, received_norm,
                             patterns=patterns, info={"local_window": local_window})
