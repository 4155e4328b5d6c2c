"""Stats-mode capture: per-head statistics from the recompute kernels, no ``[q, k]`` map.

The one forward (:func:`workbench.forward.run`) runs with the ``"stats"`` attention backend:
every attention call goes through :func:`kernels.attention_with_stats` with ``received=True``
(output, LSE, per-row statistics and received mass; on the CPU: the ``row_pass`` kernel, one
``QKᵀ``, one compiled softmax-and-statistics loop and ``e @ V`` per block of whole rows; heads with pattern-level interventions recomputed exactly in
row blocks, :mod:`workbench.head_edits`) and a recorder keeps, for the selected layers and heads only:

- the docs/metrics.md §1 row statistics from ``AttentionStats.stats`` (``[B, L, H, N]``, 0 on padding);
- received mass per key (``AttentionStats.received``, computed in the same attention call);
- the detector rows ``induction_mass`` / ``duplicate_mass``, gathered exactly at their target
  pairs from q, k and the LSE (:func:`workbench.recompute.detector_rows_from_qk`);
- with ``keep_qk``: ``q.L [B, H_sel, N, d]``, ``k.L [B, Hkv, N, d]``, ``lse.L [B, H_sel, N]`` fp32
  for exact tiles and thumbnails later (:mod:`workbench.recompute`).

Per-layer tensors are dropped as soon as the layer is recorded and the forward stops after the
last selected layer (no LM head).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.attention_backend import AttentionCall
from workbench.batch import TokenBatch
from workbench.capture_data import Capture
from workbench.errors import WorkbenchError
from workbench.forward import Hook, run
from workbench.pattern_rows import DETECTOR_ROWS, STAT_NAMES, detector_rows
from workbench.progress import Progress
from workbench.recompute import detector_rows_from_qk, token_groups


class StatsRecorder:
    """Kernel-forward recorder that writes one chunk of samples into preallocated outputs.

    Shapes: outputs ``[B, L_sel, H_sel, N]`` for the whole batch; :meth:`start` points the
    recorder at rows ``rows`` of width ``width`` before each chunk's forward.
    """

    def __init__(self, model, n_samples: int, width: int, layers: Sequence[int],
                 heads: Sequence[int], keep_qk: bool, detectors: bool = True, edits=None) -> None:
        B, N, L, H = n_samples, width, len(layers), len(heads)
        self.layer_pos = {layer: li for li, layer in enumerate(layers)}
        self.n_layers = model.n_layers
        self.last_layer = max(layers)
        self.heads = torch.tensor(list(heads))
        self.head_pos = {head: hi for hi, head in enumerate(heads)}
        self.all_heads = list(heads) == list(range(model.n_heads))
        self.group = model.n_heads // model.n_kv_heads
        self.kv_of_head = self.heads // self.group
        self.row_stats = {name: torch.zeros(B, L, H, N) for name in STAT_NAMES}
        self.detectors = detectors
        if detectors:
            self.row_stats |= {name: torch.full((B, L, H, N), float("nan")) for name in DETECTOR_ROWS}
        self.received = torch.zeros(B, L, H, N)
        self.received_normalized = torch.zeros(B, L, H, N)
        self.keep_qk = keep_qk
        self.extras: dict[str, torch.Tensor] = {}
        if keep_qk:
            for layer in layers:
                self.extras[f"q.{layer}"] = torch.zeros(B, H, N, model.d_head)
                self.extras[f"k.{layer}"] = torch.zeros(B, model.n_kv_heads, N, model.d_head)
                self.extras[f"lse.{layer}"] = torch.full((B, H, N), float("-inf"))
        self.scale: list[float | None] = [None] * L
        self.chunk: TokenBatch | None = None
        self.rows = slice(0, 0)
        self.groups: list = []
        self.tracker: Progress | None = None
        self.edited = edits.pattern if edits is not None else {}  # layer -> head -> pattern interventions

    def start(self, chunk: TokenBatch, first_row: int) -> None:
        """Point the recorder at the samples ``chunk`` (rows from ``first_row``)."""
        self.chunk = chunk
        self.rows = slice(first_row, first_row + len(chunk))
        self.groups = [token_groups(t[m]) for t, m in zip(chunk.tokens, chunk.mask)] if self.detectors else []

    def __call__(self, call: AttentionCall, result) -> None:
        li = self.layer_pos.get(call.layer)
        if li is None:
            return
        if result.stats is None or getattr(result, "received", None) is None:
            raise WorkbenchError("the attention function returned no statistics or received mass: stats capture "
                                 "needs kernels.attention_with_stats(..., received=True) (or a function returning "
                                 "its AttentionStats)")
        chunk, rows = self.chunk, self.rows
        width = chunk.tokens.shape[1]
        if call.query.shape[2] != width or call.key.shape[2] != width:
            raise WorkbenchError(f"stats capture expected {width} query/key positions at layer {call.layer}, "
                                 f"got {call.query.shape[2]}/{call.key.shape[2]} (a cached or generating forward?)")
        real = chunk.mask[:, None, :].to(call.query.device)  # [b, 1, N]
        for name in STAT_NAMES:
            value = result.stats[name][:, self.heads].float()
            self.row_stats[name][rows, li, :, :width] = value.masked_fill(~real, 0.0).cpu()
        q, k, lse = self._selected(call, result)
        self.scale[li] = call.scale
        self._received(li, result)
        if self.detectors:
            self._detectors(li, q, k, lse, call.scale)
            self._edited_detectors(li, call, result)
        if self.keep_qk:
            layer = call.layer
            self.extras[f"q.{layer}"][rows, :, :width] = q.cpu()
            self.extras[f"k.{layer}"][rows, :, :width] = call.key.float().cpu()
            self.extras[f"lse.{layer}"][rows, :, :width] = lse.cpu()
        if self.tracker is not None:
            self.tracker.step_info(f"layer {call.layer + 1}/{self.n_layers}")

    def _selected(self, call: AttentionCall, result) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 ``q [b, H_sel, N, d]``, ``k`` per selected head ``[b, H_sel, N, d]``, ``lse [b, H_sel, N]``."""
        if self.all_heads:  # no copy of q / lse when every head is selected
            return call.query.float(), call.key[:, self.kv_of_head].float(), result.lse.float()
        q = call.query[:, self.heads].float()
        k = call.key[:, self.kv_of_head].float()
        return q, k, result.lse[:, self.heads].float()

    def _received(self, li: int, result) -> None:
        """Received mass of the selected heads, computed in the attention call (``received=True``)."""
        raw, norm = result.received, result.received_normalized
        if not self.all_heads:
            raw, norm = raw[:, self.heads], norm[:, self.heads]
        width = raw.shape[-1]
        self.received[self.rows, li, :, :width] = raw.float().cpu()
        self.received_normalized[self.rows, li, :, :width] = norm.float().cpu()

    def _edited_detectors(self, li: int, call: AttentionCall, result) -> None:
        """Detector rows of heads with pattern-level interventions, from their edited probabilities."""
        from workbench.head_edits import edited_row_blocks

        chunk, first = self.chunk, self.rows.start
        for head, items in self.edited.get(call.layer, {}).items():
            if head not in self.head_pos:
                continue
            hi = self.head_pos[head]
            for r0, r1, probs, _ in edited_row_blocks(call, head, items, result.lse[:, head].float()):
                rows = detector_rows(probs[:, None].cpu(), chunk.tokens, chunk.mask, r0)
                for name, value in rows.items():
                    self.row_stats[name][first:first + len(chunk), li, hi, r0:r1] = value[:, 0]

    def _detectors(self, li: int, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> None:
        for b, groups in enumerate(self.groups):
            n = groups.length
            if groups.order.numel() == 0:
                continue
            rows = detector_rows_from_qk(q[b, :, :n], k[b, :, :n], lse[b, :, :n], groups, scale)
            for name, value in rows.items():
                self.row_stats[name][self.rows.start + b, li, :, :n] = value.cpu()


def capture_stats(model, batch: TokenBatch, *, layers: Sequence[int], heads: Sequence[int],
                  keep_qk: bool = False, batch_size: int = 8, local_window: int = 8,
                  fwd_hooks: Sequence[Hook] = (), edits=None, progress: Progress | None = None,
                  detectors: bool = True, recorders: Sequence = ()) -> Capture:
    """Stats-mode capture of ``batch`` (see the module docstring); same fields as patterns mode.

    Args:
        model: the loaded :class:`workbench.model.HookedModel`.
        batch: right-padded token batch.
        layers, heads: validated, sorted selections.
        keep_qk: keep fp32 Q/K/LSE of the selected heads for :mod:`workbench.recompute`.
        batch_size: samples per forward.
        local_window: ``w`` of the local-mass statistic.
        fwd_hooks: TransformerLens hooks active during the forward (``hook_pattern`` never fires here).
        edits: compiled interventions (:class:`workbench.head_edits.HeadEdits`) or None.
        progress: progress and cancellation (checked after every layer).
        detectors: gather the detector rows (``induction_mass`` / ``duplicate_mass``).
        recorders: more recorders fed the same attention results (each has ``start(chunk, first_row)``,
            e.g. :class:`workbench.long_context.LongContextRecorder`).
    """
    B, N = batch.tokens.shape
    recorder = StatsRecorder(model, B, N, layers, heads, keep_qk, detectors, edits)
    recorder.tracker = progress
    start = 0
    for chunk in batch.chunks(batch_size):
        recorder.start(chunk, start)
        for extra in recorders:
            extra.start(chunk, start)
        run(model, chunk, backend="stats", edits=edits, fwd_hooks=fwd_hooks, recorders=[recorder, *recorders],
            stop_after_layer=max(layers), local_window=local_window)
        start += len(chunk)
        if progress is not None:
            progress.advance(len(chunk))
    if progress is not None:
        progress.close()
    info = {"local_window": local_window, "scale": recorder.scale, "kv_group": recorder.group}
    return Capture.from_rows(model, batch, "stats", layers, heads, recorder.row_stats, recorder.received,
                             recorder.received_normalized, extras=recorder.extras, info=info)
