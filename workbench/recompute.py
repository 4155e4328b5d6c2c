"""Exact pieces of attention maps recomputed from saved Q, K and LSE (METRICS §8).

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

from dataclasses import dataclass

import torch

from workbench.errors import InputError

_ELEMENTS = 1 << 22  # logits per step of the detector gather (16 MB fp32)


@dataclass(frozen=True)
class TokenGroups:
    """Positions of repeated tokens in one sequence, bucketed by group size.

    Attributes:
        buckets: ``(idx [G, C] long, valid [G, C] bool)`` per bucket: row ``g`` lists the
            ascending positions of one token seen ``2..C`` times (padded with 0 where invalid).
        length: the sequence length ``n``.
    """

    buckets: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    length: int


def token_groups(tokens: torch.Tensor) -> TokenGroups:
    """Group the positions of a 1-D token sequence ``[n]`` by token (tokens seen twice or more)."""
    n = int(tokens.numel())
    if n < 2:
        return TokenGroups((), n)
    values, pos = torch.sort(tokens, stable=True)  # positions ascend within each token
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.nonzero(values[1:] != values[:-1]).flatten() + 1])
    sizes = torch.diff(torch.cat([starts, torch.tensor([n])]))
    buckets = []
    size = 2
    while True:
        sel = (sizes <= size) & (sizes > size // 2) & (sizes >= 2)
        if bool(sel.any()):
            rank = torch.arange(size)
            valid = rank[None, :] < sizes[sel][:, None]
            idx = pos[(starts[sel][:, None] + rank[None, :]).clamp(max=n - 1)].masked_fill(~valid, 0)
            buckets.append((idx, valid))
        if size >= n:
            break
        size *= 2
    return TokenGroups(tuple(buckets), n)


def detector_rows_from_qk(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, groups: TokenGroups,
                          scale: float) -> dict[str, torch.Tensor]:
    """Induction and duplicate-token row masses of one sequence, exact, without the map.

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
    dup = torch.full((H, n), float("nan"), device=q.device)
    ind = torch.full((H, n), float("nan"), device=q.device)
    for idx, valid in groups.buckets:
        idx, valid = idx.to(q.device), valid.to(q.device)
        G, C = idx.shape
        g_step = max(1, _ELEMENTS // (H * C * max(C, q.shape[-1])))
        r_step = C if H * C * C <= _ELEMENTS else max(1, _ELEMENTS // (H * C))
        rank = torch.arange(C, device=q.device)
        for g0 in range(0, G, g_step):
            ig, vg = idx[g0:g0 + g_step], valid[g0:g0 + g_step]
            qg, lg = q[:, ig] * scale, lse[:, ig]  # [H, g, C, d], [H, g, C]
            kg, kn = k[:, ig], k[:, (ig + 1).clamp(max=n - 1)]
            for r0 in range(0, C, r_step):
                r1 = min(C, r0 + r_step)
                earlier = (rank[None, :r1] < rank[r0:r1, None])[None] & vg[:, None, :r1]  # [g, r, r1]
                rows = vg[:, r0:r1] & (rank[r0:r1] >= 1)[None]  # rows with at least one target
                if not bool(rows.any()):
                    continue
                qr, lr = qg[:, :, r0:r1], lg[:, :, r0:r1, None]
                target = ig[:, r0:r1][rows]
                for out, keys in ((dup, kg), (ind, kn)):
                    p = torch.exp(torch.matmul(qr, keys[:, :, :r1].transpose(-1, -2)) - lr)
                    mass = torch.where(earlier, p, torch.zeros((), device=q.device)).sum(-1)  # [H, g, r]
                    out[:, target] = mass[:, rows]
    return {"duplicate_mass": dup, "induction_mass": ind}


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

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"thumbnail size must be a positive int, got {size!r}")
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
