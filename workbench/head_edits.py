"""The exact rules of the per-head interventions, applied inside the attention call (docs/metrics.md §7).

One implementation for every attention backend (:mod:`workbench.attention_backend`):

- pattern-level kinds (``softpag``, ``redistribute``) edit the head's probabilities row by row
  (:func:`edit_rows`): on the materialised map (eager backend), or on exact row blocks
  ``A_ij = exp(scale q_i·k_j − LSE_i)`` recomputed for the edited heads only, from which the head's
  output ``z = A' V`` and, in stats mode, its statistics and received mass are recomputed, so the
  statistics always describe the pattern the head actually used;
- output-level kinds (``zero``, ``mean``, ``resample``, ``scale``) replace or scale the head's
  output ``z [B, Nq, Hq, d]`` before ``W_O`` (TransformerLens ``hook_z``).

On one head the pattern edits run first (the pattern exists before its output), each group in
list order; different heads are independent.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

SPAN_MASS_MIN = 0.2
"""VAR selection: a query is redistributed only when its mass on the target span is >= this."""
PATTERN_KINDS = ("softpag", "redistribute")
_ELEMENTS = 1 << 22  # logits per row block of a recomputed head (16 MB fp32)


def redistribute_delta(probs: torch.Tensor, is_sink: torch.Tensor, in_span: torch.Tensor,
                       keep: float, rho: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """VAR change of the attention on a set of columns (docs/metrics.md §3).

    Args:
        probs: ``[..., C]`` current probabilities of each query row on C columns.
        is_sink, in_span: ``[C]`` bool: the column is a sink / in the target span.
        keep: fraction p of the sink mass kept; rho: non-sink share threshold.
        valid: ``[...]`` rows that may be edited (real queries); None = all.
    Returns:
        ``[..., C]`` additive change: sinks lose ``(1-p)`` of their weight and the freed mass
        ``Ω`` goes to the non-sink span columns in proportion to their weights, for rows whose
        span mass is >= 0.2 and whose non-sink share of it is >= rho (zero elsewhere).
    """
    sink = probs * is_sink
    target = probs * (in_span & ~is_sink)
    span_mass = (probs * in_span).sum(-1, keepdim=True)
    target_mass = target.sum(-1, keepdim=True)
    selected = (span_mass >= SPAN_MASS_MIN) & (target_mass >= rho * span_mass) & (target_mass > 0)
    if valid is not None:
        selected = selected & valid[..., None]
    omega = (1.0 - keep) * sink.sum(-1, keepdim=True)
    delta = -(1.0 - keep) * sink + omega * target / target_mass.clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.where(selected, delta, torch.zeros_like(delta))


def edit_rows(items: Sequence, probs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pattern edits of one head on query rows at absolute ``positions [r]``.

    Args:
        items: the head's pattern-level interventions, in order.
        probs: ``[B, r, Nk]`` fp32 probabilities of those rows.
    Returns:
        ``[B, r, Nk]`` edited probabilities (SoftPAG: ``(1-u) A + u I``; redistribute: VAR).
    """
    columns = torch.arange(probs.shape[-1], device=probs.device)
    for item in items:
        if item.kind == "softpag":
            own = (columns[None, :] == positions[:, None]).to(probs.dtype)
            probs = (1 - item.u) * probs + item.u * own
        else:
            is_sink = torch.isin(columns, torch.tensor(item.sink_positions, device=columns.device))
            in_span = torch.ones_like(is_sink) if item.span is None else \
                (columns >= item.span[0]) & (columns < item.span[1])
            probs = probs + redistribute_delta(probs, is_sink, in_span, item.keep, item.rho)
    return probs


class HeadEdits:
    """Interventions compiled for one forward: what :func:`workbench.attention_backend.workbench_attention`
    applies to each layer.

    Args:
        items: the interventions (objects with ``layer, head, kind`` and their parameters).
        references: ``(layer, head) -> ReferenceZ`` clean outputs for ``mean`` / ``resample``.
    """

    def __init__(self, items: Sequence, references: dict | None = None) -> None:
        self.references = references or {}
        self.pattern: dict[int, dict[int, list]] = {}
        self.output: dict[int, list] = {}
        for item in items:
            if _is_identity(item):  # exact no-op: recomputing the head would only add rounding
                continue
            if item.kind in PATTERN_KINDS:
                self.pattern.setdefault(item.layer, {}).setdefault(item.head, []).append(item)
            else:
                self.output.setdefault(item.layer, []).append(item)

    @property
    def has_pattern_edits(self) -> bool:
        return bool(self.pattern)

    # ------------------------------------------------------------ pattern level
    def apply_pattern_edits_map(self, call, probs: torch.Tensor) -> torch.Tensor:
        """Eager backend: edit the materialised map ``[B, Hq, Nq, Nk]`` of this layer's heads."""
        heads = self.pattern.get(call.layer)
        if not heads:
            return probs
        probs = probs.clone()
        positions = call.query_positions
        for head, items in heads.items():
            probs[:, head] = edit_rows(items, probs[:, head].float(), positions).to(probs.dtype)
        return probs

    def apply_pattern_edits_out(self, call, result) -> None:
        """sdpa backend: recompute the edited heads' outputs in ``result.out`` (in place)."""
        for head, items in self.pattern.get(call.layer, {}).items():
            recomputed = _recompute_head(call, head, items, None, None)
            result.out[:, head] = recomputed["out"].to(result.out.dtype)

    def apply_pattern_edits_stats(self, call, result, local_window: int) -> None:
        """stats backend: recompute the edited heads' output, statistics and received mass (in place)."""
        for head, items in self.pattern.get(call.layer, {}).items():
            recomputed = _recompute_head(call, head, items, result.lse[:, head].float(), local_window)
            result.out[:, head] = recomputed["out"].to(result.out.dtype)
            for name, value in recomputed["stats"].items():
                result.stats[name][:, head] = value.to(result.stats[name].dtype)
            if result.received is not None:
                result.received[:, head] = recomputed["received"]
                result.received_normalized[:, head] = recomputed["received_normalized"]

    # ------------------------------------------------------------ output level
    def apply_output_edits(self, z: torch.Tensor, call) -> torch.Tensor:
        """Edit ``z [B, Nq, Hq, d]`` of this layer's heads (returns a new tensor when edited)."""
        items = self.output.get(call.layer)
        if not items:
            return z
        z = z.clone()
        positions = call.query_positions
        for item in items:
            z[:, :, item.head] = edit_output(item, z[:, :, item.head], positions,
                                             self.references.get((item.layer, item.head)))
        return z


def _is_identity(item) -> bool:
    """SoftPAG with u = 0, redistribute keeping every sink (keep = 1) and scale by 1 change nothing."""
    return (item.kind == "softpag" and item.u == 0) or (item.kind == "redistribute" and item.keep == 1) \
        or (item.kind == "scale" and item.alpha == 1)


def edit_output(item, z: torch.Tensor, positions: torch.Tensor, reference) -> torch.Tensor:
    """Apply an output-level edit to one head's ``z [B, n, d]`` at absolute ``positions [n]``."""
    if item.kind == "zero":
        return torch.zeros_like(z)
    if item.kind == "scale":
        return z * item.alpha
    if item.kind == "mean":
        return reference.mean_at(positions.cpu()).to(z)[None].expand_as(z)
    return reference.resample_at(z.shape[0], positions.cpu()).to(z)


def edited_row_blocks(call, head: int, items: Sequence, lse: torch.Tensor | None = None
                      ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Exact edited probabilities of one head, a block of query rows at a time (never the whole map).

    Args:
        call: the attention call (:class:`workbench.attention_backend.AttentionCall`).
        head: query head; items: its pattern-level interventions.
        lse: ``[B, Nq]`` saved log-sum-exp of the head, or None (computed here per block).
    Yields:
        ``(r0, r1, probs [B, r, Nk] fp32, visible [B, r, Nk] bool)`` for query rows ``r0:r1``;
        padded query rows are all zero.
    """
    q = call.query[:, head].float()
    k = call.key[:, head // call.kv_group].float()
    B, n_q, _ = q.shape
    n_k = k.shape[1]
    positions = call.query_positions
    keys = torch.arange(n_k, device=q.device)
    key_real = call.key_padding_mask if call.key_padding_mask is not None else \
        torch.ones(B, n_k, dtype=torch.bool, device=q.device)
    row_real = key_real[:, positions]  # a query row is real when the key at its position is
    rows = max(1, _ELEMENTS // max(1, B * n_k))
    for r0 in range(0, n_q, rows):
        r1 = min(n_q, r0 + rows)
        pos = positions[r0:r1]
        visible = key_real[:, None, :] & row_real[:, r0:r1, None]  # [B, r, Nk]
        if call.causal:
            visible = visible & (keys[None, None, :] <= pos[None, :, None])
        logits = call.scale * torch.einsum("brd,bkd->brk", q[:, r0:r1], k).masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(logits, -1) if lse is None else lse[:, r0:r1]
        probs = torch.where(visible, torch.exp(logits - row_lse[..., None]), torch.zeros((), device=q.device))
        yield r0, r1, edit_rows(items, probs, pos) * row_real[:, r0:r1, None], visible


def _recompute_head(call, head: int, items: Sequence, lse: torch.Tensor | None,
                    local_window: int | None) -> dict:
    """Output (and with ``local_window``, statistics and received mass) of one edited head.

    Returns:
        ``{"out": [B, Nq, d]}`` fp32, plus with statistics ``"stats"`` ({name: [B, Nq]}),
        ``"received"`` and ``"received_normalized"`` (``[B, Nk]``).
    """
    from kernels.reference import stats_from_probs

    v = call.value[:, head // call.kv_group].float()
    B, n_k, d = v.shape
    n_q = call.query.shape[2]
    positions = call.query_positions
    out = torch.zeros(B, n_q, d, device=v.device)
    want_stats = local_window is not None
    stats: dict[str, list[torch.Tensor]] = {}
    received = torch.zeros(B, n_k, device=v.device)
    seen_by = torch.zeros(B, n_k, device=v.device)
    row_real = torch.zeros(B, n_q, dtype=torch.bool, device=v.device)
    for r0, r1, probs, visible in edited_row_blocks(call, head, items, lse):
        out[:, r0:r1] = probs @ v
        if want_stats:
            row_real[:, r0:r1] = visible.any(-1)
            for name, value in stats_from_probs(probs[:, None], visible[:, None], int(positions[r0]),
                                                local_window).items():
                stats.setdefault(name, []).append(value[:, 0])
            received += probs.sum(1)
            seen_by += visible.sum(1)
    result = {"out": out}
    if want_stats:
        result["stats"] = {name: torch.cat(parts, 1) * row_real for name, parts in stats.items()}
        result["received"] = received
        result["received_normalized"] = torch.where(seen_by > 0, received / seen_by.clamp_min(1),
                                                    torch.zeros_like(received))
    return result


class OutputEdits(HeadEdits):
    """Output-level edits given as functions ``(z [B, Nq, Hq, d], call) -> z``, applied at the same
    site as :class:`HeadEdits` (batched ablation engines: many copies of a batch, each with its
    own heads replaced; gradients with respect to per-head gates)."""

    def __init__(self, functions: Sequence) -> None:
        super().__init__(())
        self.functions = tuple(functions)

    def apply_output_edits(self, z: torch.Tensor, call) -> torch.Tensor:
        for function in self.functions:
            z = function(z, call)
        return z
