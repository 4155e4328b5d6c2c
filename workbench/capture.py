"""Capture: one forward over a batch that records only what the probes need.

Patterns mode hooks ``blocks.L.attn.hook_pattern`` (TransformerLens) on the selected layers,
reduces each pattern to per-row statistics and detector masses on the fly, and keeps the full
``[q, k]`` maps only when asked (short inputs). The result holds no reference to the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from workbench.atomic import atomic_dir
from workbench.batch import TokenBatch
from workbench.errors import InputError, WorkbenchError
from workbench.model import bind_hook, Hook, hook_name, HookedModel
from workbench.pattern_rows import DETECTOR_ROWS, STAT_NAMES, detector_rows, received_mass, row_statistics

CaptureMode = Literal["patterns", "stats"]
_FORMAT_VERSION = 1


@dataclass
class Capture:
    """What one capture recorded. Index order everywhere: ``[B, L_sel, H_sel, ...]``.

    Attributes:
        model_name: the model it came from.
        mode: ``"patterns"`` (materialised maps) or ``"stats"`` (recompute kernels).
        causal: causal (decoder) or bidirectional attention.
        tokens, mask: ``[B, N]`` ids (right-padded) and bool real-token mask.
        str_tokens: per sample, the readable tokens of its real positions.
        layers, heads: the captured subset (model indices).
        row_stats: METRICS §1 statistic -> ``[B, L, H, N]`` fp32 (0 on padding), plus the
            detector row masses ``induction_mass``/``duplicate_mass`` (NaN where undefined).
        received, received_normalized: per-key received mass ``[B, L, H, N]``.
        patterns: layer -> ``[B, H, N, N]`` fp32 maps, when kept.
        extras: mode-specific tensors (stats mode: ``q.L``, ``k.L``, ``lse.L`` for tiles).
        meta: per-sample metadata (dataset fields, spans).
        info: free-form run facts (dataset name, timings).
    """

    model_name: str
    mode: CaptureMode
    causal: bool
    tokens: torch.Tensor
    mask: torch.Tensor
    str_tokens: list[list[str]]
    layers: list[int]
    heads: list[int]
    row_stats: dict[str, torch.Tensor]
    received: torch.Tensor
    received_normalized: torch.Tensor
    patterns: dict[int, torch.Tensor] | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return self.tokens.shape[0]

    def lengths(self) -> torch.Tensor:
        """``[B]`` real length of each sample."""
        return self.mask.sum(1)

    def index_of(self, layer: int, head: int) -> tuple[int, int]:
        """Positions of a model (layer, head) in this capture's ``L``/``H`` axes."""
        if layer not in self.layers:
            raise InputError(f"layer {layer} was not captured (captured layers: {self.layers})")
        if head not in self.heads:
            raise InputError(f"head {head} was not captured (captured heads: {self.heads})")
        return self.layers.index(layer), self.heads.index(head)

    def _check_sample(self, batch_index: int) -> int:
        if not 0 <= batch_index < self.n_samples:
            raise InputError(f"batch index {batch_index} out of range: the capture has {self.n_samples} samples")
        return int(self.mask[batch_index].sum())

    def pattern(self, layer: int, head: int, batch_index: int = 0) -> torch.Tensor:
        """The exact ``[n, n]`` attention map of one head on one sample (real tokens only)."""
        n = self._check_sample(batch_index)
        _, h = self.index_of(layer, head)
        if self.patterns is not None and layer in self.patterns:
            return self.patterns[layer][batch_index, h, :n, :n]
        if f"lse.{layer}" in self.extras:
            from workbench.recompute import tile_from_capture

            return tile_from_capture(self, layer, head, batch_index, (0, n), (0, n))
        raise WorkbenchError("this capture kept neither patterns nor Q/K: capture again with keep_patterns=True "
                             "(patterns mode) or keep_qk=True (stats mode)")

    def tokens_of(self, batch_index: int = 0) -> list[str]:
        """Readable tokens of one sample."""
        self._check_sample(batch_index)
        return self.str_tokens[batch_index]

    # ------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``path/`` (``tensors.safetensors`` + ``capture.json``) atomically."""
        tensors = {"tokens": self.tokens, "mask": self.mask.to(torch.uint8),
                   "received": self.received, "received_normalized": self.received_normalized}
        tensors |= {f"row.{k}": v for k, v in self.row_stats.items()}
        tensors |= {f"pattern.{k}": v for k, v in (self.patterns or {}).items()}
        tensors |= {f"extra.{k}": v for k, v in self.extras.items()}
        header = {
            "format_version": _FORMAT_VERSION, "model_name": self.model_name, "mode": self.mode,
            "causal": self.causal, "str_tokens": self.str_tokens, "layers": self.layers,
            "heads": self.heads, "meta": self.meta, "info": self.info,
            "has_patterns": self.patterns is not None,
        }
        path = Path(path)
        with atomic_dir(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
            (tmp / "capture.json").write_text(json.dumps(header, default=_jsonable))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Capture":
        """Read a capture written by :meth:`save` (safetensors + JSON; nothing is unpickled)."""
        path = Path(path)
        try:
            header = json.loads((path / "capture.json").read_text())
            tensors = load_file(str(path / "tensors.safetensors"))
        except (OSError, ValueError) as err:
            raise InputError(f"cannot read capture folder {path} ({err}): give a folder written by Capture.save") from None
        if header.get("format_version") != _FORMAT_VERSION:
            raise InputError(f"capture {path} has format {header.get('format_version')}, expected {_FORMAT_VERSION}")
        prefixed = lambda p: {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}  # noqa: E731
        patterns = {int(k): v for k, v in prefixed("pattern.").items()} if header["has_patterns"] else None
        return cls(
            model_name=header["model_name"], mode=header["mode"], causal=header["causal"],
            tokens=tensors["tokens"], mask=tensors["mask"].bool(), str_tokens=header["str_tokens"],
            layers=header["layers"], heads=header["heads"], row_stats=prefixed("row."),
            received=tensors["received"], received_normalized=tensors["received_normalized"],
            patterns=patterns, extras=prefixed("extra."), meta=header["meta"], info=header["info"],
        )


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def as_batch(model: HookedModel, inputs: TokenBatch | Sequence[str] | str, max_tokens: int | None = None) -> TokenBatch:
    """Accept a batch, one prompt, or a list of prompts."""
    if isinstance(inputs, TokenBatch):
        if len(inputs) == 0:
            raise InputError("empty dataset: it has no sequences")
        return inputs
    return model.tokenize([inputs] if isinstance(inputs, str) else list(inputs), max_tokens=max_tokens)


def capture(model: HookedModel, inputs: TokenBatch | Sequence[str] | str, *,
            layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
            mode: CaptureMode = "patterns", keep_patterns: bool = False, keep_qk: bool = False,
            batch_size: int = 8, local_window: int = 8, fwd_hooks: Sequence[Hook] = (),
            interventions=None, progress: bool = True, max_tokens: int | None = None,
            detectors: bool = True) -> Capture:
    """Run ``inputs`` through ``model`` once and record per-head attention facts.

    Args:
        model: a loaded :class:`HookedModel`.
        inputs: a :class:`TokenBatch`, a prompt, or a list of prompts (padding handled).
        layers, heads: subset to record (default all); validated against the model.
        mode: ``"patterns"`` (eager maps reduced on the fly) or ``"stats"`` (recompute kernels,
            no ``[q, k]`` map is ever built).
        keep_patterns: keep the full maps (patterns mode; short inputs only).
        keep_qk: keep Q/K/LSE for exact tiles later (stats mode).
        batch_size: samples per forward.
        local_window: ``w`` of the local-mass statistic.
        fwd_hooks: extra TransformerLens hooks active during the capture (patterns mode only).
        interventions: a :class:`workbench.interventions.InterventionSet` active during the
            capture, in either mode (bridge hooks in patterns mode, z editors in stats mode).
        progress: show a tqdm bar over batches.
        detectors: also record the detector rows ``induction_mass`` / ``duplicate_mass``
            (METRICS §2). ``False`` skips them (in stats mode their exact gather is about 8% of a
            long capture); the :class:`probes.Detectors` induction/duplicate scores then refuse it.
    """
    if mode not in ("patterns", "stats"):
        raise InputError(f"unknown capture mode '{mode}': use 'patterns' or 'stats'")
    layers, heads = model.check_heads(layers, heads)
    batch = as_batch(model, inputs, max_tokens)
    if mode == "stats":
        from workbench.capture_stats import capture_stats

        return capture_stats(model, batch, layers=layers, heads=heads, keep_qk=keep_qk,
                             batch_size=batch_size, local_window=local_window,
                             fwd_hooks=fwd_hooks, progress=progress, interventions=interventions,
                             detectors=detectors)
    if interventions is not None:
        interventions.validate(model, batch)
    B, N = batch.tokens.shape
    L, H = len(layers), len(heads)
    detector_names = DETECTOR_ROWS if detectors else ()
    row_stats = {name: torch.zeros(B, L, H, N) for name in STAT_NAMES + detector_names}
    received = torch.zeros(B, L, H, N)
    received_norm = torch.zeros(B, L, H, N)
    patterns = {layer: torch.zeros(B, H, N, N) for layer in layers} if keep_patterns else None
    head_index = torch.tensor(heads)
    start = 0
    for chunk in tqdm(batch.chunks(batch_size), desc="capture", unit="batch", disable=not progress):
        rows, width = slice(start, start + len(chunk)), chunk.tokens.shape[1]

        def record(pattern: torch.Tensor, hook, *, li: int, layer: int, chunk=chunk, rows=rows, width=width):
            A = pattern.detach()[:, head_index].float()
            for name, value in row_statistics(A, chunk.mask, causal=model.causal, local_window=local_window).items():
                row_stats[name][rows, li, :, :width] = value
            if detectors:
                for name, value in detector_rows(A, chunk.tokens, chunk.mask).items():
                    row_stats[name][rows, li, :, :width] = value
            raw, norm = received_mass(A, chunk.mask, causal=model.causal)
            received[rows, li, :, :width], received_norm[rows, li, :, :width] = raw, norm
            if patterns is not None:
                patterns[layer][rows, :, :width, :width] = A * chunk.mask[:, None, :, None]
            return pattern

        edits = interventions.hooks(model, chunk) if interventions is not None else []
        hooks = list(fwd_hooks) + edits + [
            (hook_name(layer, "pattern"), bind_hook(record, li=li, layer=layer)) for li, layer in enumerate(layers)
        ]
        model.run(chunk, fwd_hooks=hooks)
        start += len(chunk)
    for name in detector_names:  # rows beyond each sample's length have no target
        row_stats[name].masked_fill_(~batch.mask[:, None, None, :], float("nan"))
    return Capture(
        model_name=model.name, mode="patterns", causal=model.causal, tokens=batch.tokens, mask=batch.mask,
        str_tokens=[model.str_tokens(t[m]) for t, m in zip(batch.tokens, batch.mask)],
        layers=layers, heads=heads, row_stats=row_stats, received=received,
        received_normalized=received_norm, patterns=patterns, meta=batch.meta,
        info={"local_window": local_window},
    )

