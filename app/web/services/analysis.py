"""Model & prompt: run one prompt through the model, capture every head, score it.

The work runs as a background job (:mod:`app.web.jobs`); the finished :class:`Analysis` goes
into the workspace cache under a random key, which the browser session keeps.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch

from app.web.jobs import JobContext
from app.web.services.inputs import parse_int
from app.web.services.workspace import Workspace
from probes.base import concat_frames
from probes.pipeline import AnalysisResult, analyze
from probes.registry import PROBES
from workbench.batch import TokenBatch
from workbench.capture import Capture, resolve_mode
from workbench.data import list_datasets, load_dataset
from workbench.errors import InputError, WorkbenchError
from workbench.forward import run
from workbench.model import HookedModel, load_model, next_token_loss
from workbench.registry import REGISTRY

Mode = Literal["patterns", "stats"]
MAX_EXAMPLE_INDEX = 100_000


@dataclass
class Analysis:
    """One analysed prompt.

    Attributes:
        model_name: registry name or folder of the model.
        prompt: the text.
        batch: its one-sample :class:`TokenBatch` (``[1, n]``).
        capture: every head; patterns mode keeps the maps, stats mode keeps Q/K/LSE.
        mode: ``"patterns"`` (n <= patterns limit) or ``"stats"``.
        frame: tidy head table of every probe computed so far (capture probes at once,
            model-based probes added on demand by :func:`app.web.services.headmap.start_probe`).
        notes: probes that could not run on this input, with the reason.
        sources: probe -> what it was computed on (``"this prompt"`` or ``"DATASET ×n"``).
    """

    model_name: str
    prompt: str
    batch: TokenBatch
    capture: Capture
    mode: Mode
    frame: pd.DataFrame
    notes: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    forward_s: float | None = None  # one clean forward of the prompt (fused backend), measured
    clean_last_logits: torch.Tensor | None = None  # [V] next-token logits of that forward (Compare's "before")
    clean_loss: float | None = None  # next-token loss of that forward

    @property
    def n_tokens(self) -> int:
        return int(self.batch.lengths[0])

    @property
    def tokens(self) -> list[str]:
        return self.capture.tokens_of(0)

    def add_frame(self, frame: pd.DataFrame, source: str = "this prompt") -> None:
        """Merge a probe's table (replacing earlier rows of the same probe)."""
        with self.lock:
            probes = set(frame["probe"].unique())
            kept = self.frame[~self.frame["probe"].isin(probes)]
            self.frame = concat_frames([kept, frame])
            for probe in probes:
                self.sources[probe] = source
                self.notes.pop(probe, None)


# ---------------------------------------------------------------- choices for the page
def model_options() -> list[dict]:
    """Dropdown options of the registry models."""
    return [{"label": f"{spec.name} — {spec.description}", "value": spec.name} for spec in REGISTRY.values()]


def dataset_options(ws: Workspace | None = None) -> list[dict]:
    """The bundled datasets, plus the ``.txt``/``.jsonl`` files of the app's data folder (if any)."""
    options = [{"label": name, "value": name} for name in list_datasets()]
    if ws is not None and ws.data_dir is not None and ws.data_dir.is_dir():
        options += [{"label": f"{p.name} (data folder)", "value": p.name}
                    for p in sorted(ws.data_dir.iterdir()) if p.is_file() and p.suffix in (".txt", ".jsonl")]
    return options


def check_dataset(ws: Workspace, name: str | None) -> str:
    """What the app may load for a client's dataset choice: a bundled name, or a ``.txt``/``.jsonl``
    file directly in the data folder (``workbench app --data-dir``); never any other path.

    Returns:
        the bundled name, or the file's resolved path.
    Raises:
        InputError: no choice, or anything else (the message does not say whether a path exists).
    """
    if not name or not str(name).strip():
        raise InputError("no dataset chosen: pick one from the list")
    name = str(name).strip()
    if name in list_datasets():
        return name
    folder = ws.data_dir.resolve() if ws.data_dir is not None else None
    if folder is not None and "/" not in name and "\\" not in name and name not in (".", ".."):
        path = (folder / name).resolve()
        if path.parent == folder and path.suffix in (".txt", ".jsonl") and path.is_file():
            return str(path)
    where = f" or a .txt/.jsonl file of the data folder {ws.data_dir}" if folder is not None else \
        " (start the app with --data-dir FOLDER to add your own files)"
    raise InputError(f"dataset {name!r} is not available in the app: use one of {', '.join(list_datasets())}{where}")


def resolve_model_name(choice: str | None, folder: str | None) -> str:
    """The model to use: a typed local folder wins over the dropdown."""
    folder = (folder or "").strip()
    if folder:
        return folder
    if not choice:
        raise InputError("no model chosen: pick one from the list or type a local folder")
    return choice


def check_prompt(ws: Workspace, text: str | None) -> str:
    """Cheap checks before any job starts (empty, absurdly long)."""
    if text is None or not text.strip():
        raise InputError("empty prompt: type some text or load a dataset example")
    limit = ws.limits.stats * ws.limits.chars_per_token
    if len(text) > limit:
        raise InputError(f"prompt is {len(text)} characters, far beyond the {ws.limits.stats}-token limit: "
                         "shorten it")
    return text


def choose_mode(ws: Workspace, n_tokens: int, n_ctx: int | None = None) -> Mode:
    """The capture mode of a prompt (:func:`workbench.capture.resolve_mode` with the app's patterns limit).

    Raises:
        InputError: longer than the stats limit or the model's context.
    """
    limit = min(ws.limits.stats, n_ctx or ws.limits.stats)
    if n_tokens > limit:
        what = "the model's context" if limit == n_ctx and n_ctx < ws.limits.stats else "the app's limit"
        raise InputError(f"prompt is {n_tokens} tokens, longer than {what} of {limit} tokens: shorten it "
                         "(the batch CLI 'workbench analyze --mode stats --seq-len N' handles long files)")
    return resolve_mode("auto", n_tokens, ws.limits.patterns)


# ---------------------------------------------------------------- jobs
def start_example(ws: Workspace, model_name: str, dataset: str | None, index: int | None) -> str:
    """Job: the text of example ``index`` of a dataset the app may load (:func:`check_dataset`)."""
    model_name = ws.check_model(model_name)
    dataset = check_dataset(ws, dataset)
    index = parse_int(index, "example index", 0, MAX_EXAMPLE_INDEX)

    def job(ctx: JobContext) -> dict:
        ctx.progress(0.1, f"loading {model_name}")
        model = load_model(model_name)
        ctx.progress(0.5, f"reading {Path(dataset).name}")
        batch = load_dataset(dataset, model, n=index + 1)
        if index >= len(batch):
            raise InputError(f"{Path(dataset).name} has {len(batch)} examples: pick an index below {len(batch)}")
        return {"kind": "example", "text": example_text(model, batch, index)}

    return ws.jobs.submit("example", job, uses_model=False)


def example_text(model: HookedModel, batch: TokenBatch, index: int) -> str:
    """The prompt text of one dataset item (decoded from its tokens when it has none)."""
    meta = batch.meta[index]
    for key in ("prompt", "text"):
        if isinstance(meta.get(key), str):
            return meta[key]
    ids = batch.tokens[index][batch.mask[index]]
    return model.tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def start_analysis(ws: Workspace, model_name: str, prompt: str) -> str:
    """Validate, then queue :func:`analyse` as a job; returns the job id."""
    model_name = ws.check_model(model_name)
    check_prompt(ws, prompt)

    def job(ctx: JobContext) -> dict:
        key = analyse(ws, model_name, prompt, ctx)
        return {"kind": "analysis", "key": key, "model": model_name, "prompt": prompt}

    return ws.jobs.submit("analysis", job)


def analyse(ws: Workspace, model_name: str, prompt: str, ctx: JobContext) -> str:
    """Load, tokenize, then the one pipeline with every capture-based probe; returns the cache key."""
    ctx.progress(0.05, f"loading {model_name}")
    model = load_model(model_name)
    ctx.progress(0.3, "tokenizing")
    # count first so an over-long text gets the app's message (not the tokenizer's)
    choose_mode(ws, len(model.tokenizer(prompt, add_special_tokens=True)["input_ids"]), model.n_ctx)
    ids = model.encode(prompt)
    mode = choose_mode(ws, ids.numel(), model.n_ctx)
    batch = model.batch_from_ids([ids], meta=[{"prompt": prompt}])
    runnable, skipped = check_probes(model, batch, [cls.name for cls in PROBES.values() if cls.needs_capture])
    result = run_pipeline(model, batch, runnable, mode, ctx, 0.35, 0.6, keep=True)
    ctx.progress(0.96, "clean forward (logits for Compare)")
    start = time.perf_counter()
    logits = run(model, batch)
    forward_s = time.perf_counter() - start
    causal = model.causal and ids.numel() >= 2
    ctx.check()  # a cancelled job publishes nothing
    analysis = Analysis(model_name=model_name, prompt=prompt, batch=batch, capture=result.capture, mode=mode,
                        frame=result.table, notes={**skipped, **result.notes}, forward_s=forward_s,
                        clean_last_logits=logits[0, -1].float().cpu() if model.causal else None,
                        clean_loss=float(next_token_loss(logits, batch)) if causal else None)
    return ws.analyses.put(analysis)


def run_pipeline(model: HookedModel, batch: TokenBatch, probes, mode: Mode, ctx: JobContext, base: float,
                 span: float, *, keep: bool = False, interventions=None) -> AnalysisResult:
    """:func:`probes.pipeline.analyze` as a job step: progress mapped onto ``[base, base + span]``,
    Cancel checked at every layer of every forward; a probe that cannot run is noted, not fatal.

    With ``keep``, the capture keeps what the pattern viewer needs (maps in patterns mode, Q/K/LSE in stats mode).
    """
    def report(fraction: float, message: str) -> None:
        ctx.progress(base + span * fraction, message)
    return analyze(model, batch, probes=probes, mode=mode, keep_patterns=keep and mode == "patterns",
                   keep_qk=keep and mode == "stats", interventions=interventions, progress=report,
                   cancel=lambda: ctx.cancelled, on_error="note")


def check_probes(model: HookedModel, batch: TokenBatch, names) -> tuple[list[str], dict[str, str]]:
    """Each probe's own pre-check (:meth:`probes.base.Probe.check_run`) before anything runs:
    ``(names that can run, {name: why not})``."""
    runnable, skipped = [], {}
    for name in names:
        try:
            PROBES[name]().check_run(model, batch)
        except WorkbenchError as err:
            skipped[name] = str(err)
        else:
            runnable.append(name)
    return runnable, skipped


def get_analysis(ws: Workspace, session: dict | None) -> Analysis:
    """The session's current analysis.

    Raises:
        InputError: nothing run yet in this session, or evicted from the cache.
    """
    key = (session or {}).get("analysis")
    if not key:
        raise InputError("no prompt analysed yet: run one on the Model & prompt page")
    return ws.analyses.get(key)


def token_strip(analysis: Analysis) -> list[tuple[int, str]]:
    """``(position, token)`` pairs of the analysed prompt."""
    return list(enumerate(analysis.tokens))


def summary(analysis: Analysis) -> str:
    """One line describing the analysis (model, tokens, mode, heads)."""
    cap = analysis.capture
    text = (f"{analysis.model_name}: {analysis.n_tokens} tokens, {analysis.mode} mode, "
            f"{len(cap.layers)} layers × {len(cap.heads)} heads, "
            f"{analysis.frame['metric'].nunique()} metrics")
    if analysis.notes:
        text += "; skipped: " + "; ".join(f"{k} ({v})" for k, v in analysis.notes.items())
    return text
