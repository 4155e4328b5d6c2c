"""Exact pieces of attention maps recomputed from saved Q, K and LSE (docs/metrics.md §8).

``A_ij = exp(scale · q_i·k_j − LSE_i)``: nothing here ever builds a full ``[q, k]`` map.

- :func:`detector_rows_from_qk`: the induction / duplicate-token row masses of
  :func:`workbench.pattern_rows.detector_rows`, gathered only at the target ``(i, j)`` pairs
  (grouped by token, so the work is ``Σ_t c_t²`` for a token seen ``c_t`` times).
- :func:`tile_from_capture` / :func:`thumbnail_from_capture`: exact tiles and pooled
  thumbnails of one head of a stats-mode capture kept with ``keep_qk=True``.

Stats-mode captures store, per captured layer ``L``: ``extras["q.L"] [B, H_sel, N, d]`` (the
captured query heads), ``extras["k.L"] [B, Hkv, N, d]`` (every key/value head) and
``extras["lse.L"] [B, H_sel, N]``, all fp32; ``info["kv_group"]`` maps query head ``h`` to
key head ``h // kv_group`` and ``info["scale"]`` holds the softmax scale of each captured layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from workbench.errors import InputError, check_int

_ELEMENTS = 1 << 22  # logits per step of the detector gather and of region thumbnails (16 MB fp32)
_ROWS = 128  # query rows per step of the detector gather
_EXP_FLOOR = -80.0  # logits - LSE are clamped here before exp (see detector_rows_from_qk)


@dataclass(frozen=True)
class TokenGroups:
    """Positions of the tokens that occur twice or more in one sequence, grouped by token.

    Attributes:
        order: ``[m]`` positions sorted by (token, position): each token's positions are contiguous.
        start: ``[m]`` index into ``order`` where each element's token group starts.
        length: the sequence length ``n``.
    """

    order: torch.Tensor
    start: torch.Tensor
    length: int


def token_groups(tokens: torch.Tensor) -> TokenGroups:
    """Group the positions of a 1-D token sequence ``[n]`` by token (singletons dropped)."""
    n = int(tokens.numel())
    values, pos = torch.sort(tokens.cpu(), stable=True)  # positions ascend within each token
    first = torch.ones(n, dtype=torch.bool)
    first[1:] = values[1:] != values[:-1]
    gid = torch.cumsum(first, 0) - 1
    keep = torch.bincount(gid)[gid] >= 2
    order, first = pos[keep], first[keep]
    index = torch.arange(order.numel())
    start = torch.cummax(torch.where(first, index, torch.zeros_like(index)), 0).values
    return TokenGroups(order, start, n)


def detector_rows_from_qk(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, groups: TokenGroups,
                          scale: float) -> dict[str, torch.Tensor]:
    """Induction and duplicate-token row masses of one sequence, exact, without the map.

    In token-sorted order the targets of a row are the earlier members of its own contiguous
    group, so each step multiplies ``_ROWS`` rows by the keys from their group starts: the work
    is about ``Σ_t c_t² / 2 + m · _ROWS`` logits per head (``c_t`` = count of token ``t``).

    Args:
        q: ``[H, n, d]`` queries of the heads (real tokens only).
        k: ``[H, n, d]`` the key of each of those heads (GQA already mapped).
        lse: ``[H, n]`` saved log-sum-exp of each row.
        groups: :func:`token_groups` of the sequence.
        scale: softmax scale.
    Returns:
        ``{"duplicate_mass", "induction_mass"}`` each ``[H, n]`` fp32, NaN where a row has no target
        (duplicate: earlier ``j`` with the same token; induction: ``j`` whose previous token is an
        earlier occurrence of token ``i``; see :func:`workbench.pattern_rows.detector_targets`).
    """
    H, n, _ = q.shape
    dev = q.device
    dup = torch.full((H, n), float("nan"), device=dev)
    ind = torch.full((H, n), float("nan"), device=dev)
    m = groups.order.numel()
    if m == 0:
        return {"duplicate_mass": dup, "induction_mass": ind}
    order, start = groups.order.to(dev), groups.start.to(dev)
    # logits minus LSE straight from the matmul: [scale·q, -lse] · [k, 1]
    qs = torch.cat([q.index_select(1, order).float() * scale, -lse.index_select(1, order).float()[..., None]], -1)
    keys = torch.empty(H, 2, m, q.shape[-1] + 1, device=dev)
    keys[..., -1] = 1.0
    keys[:, 0, :, :-1] = k.index_select(1, order)
    keys[:, 1, :, :-1] = k.index_select(1, (order + 1).clamp(max=n - 1))
    index = torch.arange(m, device=dev)
    acc = torch.zeros(H, 2, m, device=dev)
    first_key = start.tolist()

    def block(a0: int) -> None:  # rows a0 : a0 + _ROWS
        a1 = min(m, a0 + _ROWS)
        rows = slice(a0, a1)
        step = max(1, _ELEMENTS // (2 * H * (a1 - a0)))
        for c0 in range(first_key[a0], a1, step):
            c1 = min(a1, c0 + step)
            other = (start[c0:c1][None, :] != start[rows][:, None]) | (index[c0:c1][None, :] >= index[rows][:, None])
            logits = torch.matmul(qs[:, None, rows], keys[:, :, c0:c1].transpose(-1, -2))  # [H, 2, r, w]
            # floor at -80 instead of -inf: torch's vectorised exp is ~15x slower below about -88,
            # and exp(-80) = 1.8e-35 per non-target key is far below fp32 resolution of any mass
            acc[:, :, rows] += logits.clamp_min_(_EXP_FLOOR).masked_fill_(other, _EXP_FLOOR).exp_().sum(-1)

    _run_blocks(block, range(0, m, _ROWS), dev)
    has_target = index > start
    where = order[has_target]
    dup[:, where], ind[:, where] = acc[:, 0, has_target], acc[:, 1, has_target]
    return {"duplicate_mass": dup, "induction_mass": ind}


def _run_blocks(fn, items, device: torch.device) -> None:
    """Call ``fn`` on every item with torch's intra-op threads at 1 on the CPU.

    The blocks are small: one parallel region per torch op stalls at OpenMP barriers whenever a
    core is busy elsewhere (measured here: 25x slower on a loaded 2-core machine), and a thread
    pool over blocks was no faster (the ops are too short to leave the GIL for long).
    """
    from kernels.parallel import single_intra_op_thread

    with single_intra_op_thread() if device.type == "cpu" else contextlib.nullcontext():
        for item in items:
            fn(item)


# ---------------------------------------------------------------------- tiles and thumbnails
def head_qk(capture, layer: int, head: int, batch_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Saved ``q [1, 1, n, d]``, ``k [1, 1, n, d]``, ``lse [1, 1, n]`` and scale of one head/sample.

    Raises:
        InputError: the capture kept no Q/K (not stats mode with ``keep_qk=True``), or the
            layer/head/sample is outside it.
    """
    n = capture._check_sample(batch_index)
    _, hi = capture.index_of(layer, head)
    li = capture.layers.index(layer)
    key = f"lse.{layer}"
    if key not in capture.extras:
        raise InputError(f"this capture kept no Q/K/LSE for layer {layer}: capture again with "
                         "mode='stats', keep_qk=True to recompute tiles and thumbnails")
    if [layer, head] in capture.info.get("pattern_edited_heads", []):
        raise InputError(f"L{layer}H{head} was captured with a pattern-level intervention: its saved Q/K/LSE "
                         "describe the unedited map, so no tile is recomputed; capture it in patterns mode "
                         "(keep_patterns=True) to see the edited map")
    group = int(capture.info.get("kv_group", 1))
    q = capture.extras[f"q.{layer}"][batch_index, hi, :n]
    k = capture.extras[f"k.{layer}"][batch_index, head // group, :n]
    lse = capture.extras[key][batch_index, hi, :n]
    scale = float(capture.info["scale"][li])
    return q[None, None], k[None, None], lse[None, None], scale


def _check_range(rng, n: int, name: str) -> tuple[int, int]:
    try:
        start, stop = (int(v) for v in rng)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a pair (start, stop) of token positions, got {rng!r}") from None
    if not 0 <= start < stop <= n:
        raise InputError(f"{name}=({start}, {stop}) is outside the sample: need 0 <= start < stop <= {n}")
    return start, stop


def tile_from_capture(capture, layer: int, head: int, batch_index: int,
                      q_range: tuple[int, int], k_range: tuple[int, int]) -> torch.Tensor:
    """Exact attention tile ``[q1 - q0, k1 - k0]`` of one head on one sample (real tokens only).

    Equal to ``pattern[q0:q1, k0:k1]`` of the materialised map; costs ``O(tile · d)``.
    """
    from kernels import attention_tile

    q, k, lse, scale = head_qk(capture, layer, head, batch_index)
    n = q.shape[2]
    q_range, k_range = _check_range(q_range, n, "q_range"), _check_range(k_range, n, "k_range")
    return attention_tile(q, k, lse, head=0, batch_index=0, q_range=q_range, k_range=k_range,
                          causal=capture.causal, key_padding_mask=None, scale=scale)


def thumbnail_from_capture(capture, layer: int, head: int, batch_index: int, size: int = 256, *,
                           q_range: tuple[int, int] | None = None,
                           k_range: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled thumbnail ``(max_pool, mean_pool)``, each at most ``[size, size]``, of one head's map.

    Without ranges it covers the whole ``[n, n]`` map of the sample; with ``q_range``/``k_range``
    it covers only that region (zoom). Bins follow ``kernels``' thumbnail edges
    (``floor(t · n / bins)``); each cell pools the exact map over its bin (mean counts masked
    entries as 0), recomputed tile by tile and never stored whole.
    """
    from kernels import attention_thumbnail

    check_int("thumbnail size", size)
    q, k, lse, scale = head_qk(capture, layer, head, batch_index)
    n = q.shape[2]
    rows = (0, n) if q_range is None else _check_range(q_range, n, "q_range")
    cols = (0, n) if k_range is None else _check_range(k_range, n, "k_range")
    if rows == (0, n) and cols == (0, n):
        return attention_thumbnail(q, k, lse, head=0, batch_index=0, size=size, causal=capture.causal,
                                   key_padding_mask=None, scale=scale)
    return _region_thumbnail(q, k, lse, scale, capture.causal, rows, cols, size)


def _edges(n: int, size: int) -> torch.Tensor:
    bins = min(size, n)
    return torch.tensor([t * n // bins for t in range(bins + 1)])


def _region_thumbnail(q, k, lse, scale: float, causal: bool, rows: tuple[int, int], cols: tuple[int, int],
                      size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max/mean pools of the region ``rows x cols`` from exact tiles of at most ``_ELEMENTS`` entries."""
    from kernels import attention_tile

    re, ce = _edges(rows[1] - rows[0], size), _edges(cols[1] - cols[0], size)
    rbin = torch.bucketize(torch.arange(rows[1] - rows[0]), re[1:], right=True)
    cbin = torch.bucketize(torch.arange(cols[1] - cols[0]), ce[1:], right=True)
    nr, nc = len(re) - 1, len(ce) - 1
    mx, sm = torch.zeros(nr, nc), torch.zeros(nr, nc)
    step = max(1, _ELEMENTS // (cols[1] - cols[0]))
    for r0 in range(rows[0], rows[1], step):
        r1 = min(rows[1], r0 + step)
        if causal and cols[0] > r1 - 1:
            continue  # the whole strip lies in the future of its rows
        p = attention_tile(q, k, lse, head=0, batch_index=0, q_range=(r0, r1), k_range=cols, causal=causal,
                           key_padding_mask=None, scale=scale).cpu()
        rid = rbin[r0 - rows[0]:r1 - rows[0]]
        col_max = torch.zeros(p.shape[0], nc).scatter_reduce_(1, cbin.expand_as(p), p, "amax")
        col_sum = torch.zeros(p.shape[0], nc).index_add_(1, cbin, p)
        mx.scatter_reduce_(0, rid[:, None].expand(-1, nc), col_max, "amax")
        sm.index_add_(0, rid, col_sum)
    area = re.diff().float()[:, None] * ce.diff().float()[None, :]
    return mx, sm / area
