"""The one pipeline from (model, inputs, probes, mode, interventions, progress/cancel) to a tidy table.

The CLI (``workbench analyze``), the app and the notebook all call :func:`analyze`; none
re-implements capture-then-fit::

    import workbench as wb
    from probes import analyze

    model = wb.load_model("smollm2-135m")
    result = analyze(model, wb.load_dataset("induction", model, n=8), probes="stats,detectors")
    result.table                      # layer, head, probe, metric, value, ci_low, ci_high

Every probe is checked before any forward runs (names, metrics, parameters, what it needs), the
capture runs once when a probe reads it (``mode="auto"`` picks patterns or stats by length, see
:func:`workbench.capture.resolve_mode`), model-based probes sweep only the selected layers and
heads, and a :class:`workbench.progress.Progress` reports each stage and cancels within one
layer of any forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

from probes.base import Probe, concat_frames
from probes.registry import PROBES, parse_probes, split_metrics
from workbench.batch import TokenBatch
from workbench.capture import Capture, as_batch, capture, resolve_mode
from workbench.errors import InputError, WorkbenchError
from workbench.progress import Progress, reporting

__all__ = ["AnalysisResult", "analyze", "build_probes"]


@dataclass
class AnalysisResult:
    """What :func:`analyze` returns.

    Attributes:
        table: the tidy table of every probe (``probes.base.FRAME_COLUMNS``), restricted to the
            selected layers and heads.
        probes: name -> the fitted probe.
        capture: the capture the probes read (None when no probe needed one).
        batch: the analysed inputs.
        mode: the capture mode used (``"patterns"`` / ``"stats"``), None without a capture.
        layers, heads: the selection.
        timings: seconds per stage.
        notes: probe -> why it was skipped (``on_error="note"``).
        engine: how it ran: ``{"engine": "local"}``, or the Ray engine's facts (workers, shards,
            Ray version; :mod:`probes.engine_ray`).
    """

    table: pd.DataFrame
    probes: dict[str, Probe]
    capture: Capture | None
    batch: TokenBatch
    mode: str | None
    layers: list[int]
    heads: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    engine: dict = field(default_factory=lambda: {"engine": "local"})


def build_probes(probes: str | Sequence[str | Probe], metrics: str | Sequence[str] | None = None, *,
                 layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> dict[str, Probe]:
    """Probe instances from names (``"stats,detectors"``) or instances, with a ``--metrics`` subset
    assigned to the probes that own each metric; parameters checked now (no model needed).

    Raises:
        InputError: unknown probe or metric, or a bad probe parameter.
    """
    given = [probes] if isinstance(probes, Probe) else probes
    if isinstance(given, str) or all(isinstance(p, str) for p in given):
        classes = parse_probes(given)
        split = split_metrics(classes, metrics)
        built = {cls.name: cls(split.get(cls.name), layers=layers, heads=heads) for cls in classes
                 if metrics is None or cls.name in split}
    else:
        if metrics is not None:
            raise InputError("metrics= applies to probe names: set the metrics of probe instances in their constructor")
        built = {}
        for probe in given:
            if not isinstance(probe, Probe):
                raise InputError(f"probes must be names ({', '.join(PROBES)}) or probe instances, "
                                 f"got {type(probe).__name__}")
            built[probe.name] = probe
    for probe in built.values():
        probe.check_params()
    return built


def _long_context_request(probes: Sequence[Probe]):
    """The long-context rows the capture must record for ``probes`` (their ``long_context_request()``), or None."""
    from workbench.long_context import merge_settings

    requests = [p.long_context_request() for p in probes if hasattr(p, "long_context_request")]
    return merge_settings([r for r in requests if r is not None])


def analyze(model, inputs: TokenBatch | Sequence[str] | str, *, probes: str | Sequence[str | Probe] = "stats,detectors",
            metrics: str | Sequence[str] | None = None, mode: str = "auto", layers: Sequence[int] | None = None,
            heads: Sequence[int] | None = None, interventions=None, batch_size: int = 8, local_window: int = 8,
            keep_patterns: bool = False, keep_qk: bool = False,
            progress: bool | Callable[[float, str], None] | Progress = True,
            cancel: Callable[[], bool] | None = None, on_error: str = "raise",
            patterns_max_tokens: int | None = None, engine="local") -> AnalysisResult:
    """Score every selected head with ``probes`` on ``inputs`` (see the module docstring).

    Args:
        model: a :class:`workbench.model.HookedModel` (or anything :func:`workbench.load_model` takes).
        inputs: a :class:`TokenBatch`, a prompt or a list of prompts.
        probes: names (``"stats,detectors,importance"``) or probe instances.
        metrics: a subset of the probes' metrics (names only).
        mode: capture mode, ``"auto"`` (default), ``"patterns"`` or ``"stats"``; ``patterns_max_tokens``
            overrides the ``auto`` threshold (default :data:`workbench.capture.AUTO_PATTERNS_MAX_TOKENS`).
        layers, heads: the heads to score (model-based probes sweep only these).
        interventions: an :class:`workbench.interventions.InterventionSet` (or its text) active in
            the capture; the statistics then describe the edited heads, identically in both modes.
        batch_size, local_window, keep_patterns, keep_qk: capture settings
            (:func:`workbench.capture.capture`).
        progress: True (terminal bar), False, a callback ``(fraction, message)``, or a Progress.
        cancel: returns True once the work should stop (:class:`workbench.progress.Cancelled` is raised).
        on_error: ``"raise"``, or ``"note"`` to skip a probe whose fit raises a
            :class:`workbench.errors.WorkbenchError` and keep its one-line reason in ``notes``.
        engine: ``"local"`` (this process), or ``"ray"`` / a :class:`probes.engine_ray.RayEngine`:
            the same pipeline over dataset shards on Ray workers, merged to the same table
            (``capture`` is then None; ``model`` may be a name; see :mod:`probes.engine_ray`).
    """
    if engine != "local":
        from probes.engine_ray import as_engine

        return as_engine(engine).analyze(
            model, inputs, probes=probes, metrics=metrics, mode=mode, layers=layers, heads=heads,
            interventions=interventions, batch_size=batch_size, local_window=local_window,
            keep_patterns=keep_patterns, keep_qk=keep_qk, progress=progress, cancel=cancel, on_error=on_error,
            patterns_max_tokens=patterns_max_tokens)
    from workbench.interventions import as_intervention_set
    from workbench.model import HookedModel, load_model

    built = build_probes(probes, metrics, layers=layers, heads=heads)
    model = model if isinstance(model, HookedModel) else load_model(model)
    layers, heads = model.check_heads(layers, heads)
    batch = as_batch(model, inputs)
    spec = as_intervention_set(interventions)
    spec.validate(model, batch)
    if on_error not in ("raise", "note"):
        raise InputError(f"on_error='{on_error}': use 'raise' or 'note'")
    notes: dict[str, str] = {}
    for name, probe in list(built.items()):  # every probe's cheap checks before any forward
        try:
            probe.check_run(model, batch)
        except WorkbenchError as err:
            if on_error != "note":
                raise
            notes[name] = str(err)
            del built[name]
    tracker = progress if isinstance(progress, Progress) else \
        Progress(progress if callable(progress) else None, bar=progress is True)
    if cancel is not None:
        tracker.cancel = cancel
    timings: dict[str, float] = {}
    cap = None
    chosen_mode = None
    needs_capture = [p for p in built.values() if p.needs_capture]
    stages = len(built) + (1 if needs_capture else 0)
    with reporting(tracker):
        if needs_capture:
            chosen_mode = resolve_mode(mode, batch.tokens.shape[1], patterns_max_tokens)
            tracker.lo, tracker.hi = 0.0, 1.0 / stages  # capture() names its own stage on this slice
            start = time.perf_counter()
            cap = capture(model, batch, layers=layers, heads=heads, mode=chosen_mode, keep_patterns=keep_patterns,
                          keep_qk=keep_qk, batch_size=batch_size, local_window=local_window, interventions=spec,
                          progress=tracker, detectors=any(p.name == "detectors" for p in needs_capture),
                          long_context=_long_context_request(needs_capture))
            timings["capture_s"] = time.perf_counter() - start
        done = 1 if needs_capture else 0
        for name, probe in built.items():
            tracker.stage(f"probe {name}", 1, lo=done / stages, hi=(done + 1) / stages)
            start = time.perf_counter()
            try:
                probe.fit(cap if probe.needs_capture else None, model=model, batch=batch)
            except WorkbenchError as err:
                if on_error != "note":
                    raise
                notes[name] = str(err)
            timings[f"probe_{name}_s"] = time.perf_counter() - start
            tracker.advance(1)
            done += 1
    tracker.close()
    fitted = {name: probe for name, probe in built.items() if name not in notes}
    table = concat_frames([p.to_frame() for p in fitted.values()])
    table = table[table["layer"].isin(layers) & table["head"].isin(heads)].reset_index(drop=True)
    return AnalysisResult(table, fitted, cap, batch, chosen_mode, layers, heads, timings, notes)
