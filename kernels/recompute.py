"""Recompute exact pieces of the attention map from saved Q, K and LSE (torch, any device).

``A_ij = exp(scale·q_i·k_j - lse_i)`` block by block: column sums (received mass), one tile,
or a max/mean-pooled thumbnail of the whole map, never holding the whole map at once.
"""

from __future__ import annotations

import threading

import torch

from . import masks
from .chunked import EXP_FLOOR, _chunks, _view, default_blocks
from .parallel import run_blocks, worker_count
from .validation import (
    AttnDims,
    check_int,
    check_key_padding_mask,
    check_lse,
    check_qk,
    check_range,
    resolve_scale,
)


def _safe_lse(lse: torch.Tensor, mask: torch.Tensor | None, dims: AttnDims) -> torch.Tensor:
    """LSE with rows that see nothing (non-finite LSE or padded query) set to +inf, so exp(s - lse) = 0."""
    out = torch.where(torch.isfinite(lse), lse, float("inf"))
    if mask is not None:
        out = out.masked_fill(~mask[:, None, dims.offset :], float("inf"))
    return out


@torch.no_grad()
def chunked_received_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Received mass from a second pass over key blocks.

    Returns ``(c, ĉ)``, both fp32 ``[B, Hq, Nk]``: ``c_j = Σ_i A_ij`` and ``ĉ_j = c_j / n_j`` with
    ``n_j`` the number of real query rows that can see key ``j`` (0 where ``n_j = 0``).
    """
    dims = check_qk(q, k)
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    lse = check_lse(lse, dims, q.device)
    scale = resolve_scale(scale, dims.head_dim)
    bq, bk = default_blocks(dims, block_q, block_k)
    B, Hkv, G, Nq, Nk, D = dims.batch, dims.heads_kv, dims.group, dims.len_q, dims.len_k, dims.head_dim
    bh, dev = B * Hkv, q.device
    q5 = q.reshape(B, Hkv, G, Nq, D)
    kf = k.reshape(bh, Nk, D).to(torch.float32)
    lse5 = _safe_lse(lse, mask, dims).view(B, Hkv, G, Nq)
    live = torch.isfinite(lse5)  # rows that see at least one key
    ar = torch.arange(bq, device=dev)
    future = ar[None, :] > ar[:, None]  # diagonal tile: key after query
    tile_elems = bh * G * bq * max(bq, bk)
    partials: list[torch.Tensor] = []
    local = threading.local()

    def block(i0: int) -> None:
        if not hasattr(local, "col"):  # per-worker scratch and column accumulator
            local.sbuf = torch.empty(tile_elems, device=dev)
            local.col = torch.zeros(B, Hkv, G, Nk, device=dev)
            partials.append(local.col)
        i1 = min(Nq, i0 + bq)
        n, p0, p1 = i1 - i0, dims.offset + i0, dims.offset + i1
        qb = (q5[:, :, :, i0:i1].to(torch.float32) * scale).reshape(bh, G * n, D)
        lb = lse5[..., i0:i1].reshape(bh, G * n, 1)
        live_b = live[..., i0:i1]
        all_live = bool(live_b.all())
        tiles = _chunks(0, p0, bk) + [(p0, p1)] if causal else _chunks(0, Nk, bk)
        for j0, j1 in tiles:
            nk = j1 - j0
            s = torch.bmm(qb, kf[:, j0:j1].transpose(1, 2), out=_view(local.sbuf, (bh, G * n, nk)))
            # masked entries are zeroed exactly after exp; the clamp keeps exp on its fast path
            s.sub_(lb).clamp_(min=EXP_FLOOR, max=-EXP_FLOOR).exp_()
            if causal and j0 == p0:
                s.view(bh, G, n, nk).masked_fill_(future[:n, :nk], 0.0)
            if mask is not None and not bool(mask[:, j0:j1].all()):
                s.view(B, -1, nk).masked_fill_(~mask[:, None, j0:j1], 0.0)
            if not all_live:
                s.view(B, Hkv, G, n, nk).mul_(live_b.unsqueeze(-1))
            local.col[..., j0:j1] += s.view(B, Hkv, G, n, nk).sum(3)

    starts = list(range(0, Nq, bq))[::-1]
    run_blocks(block, starts, worker_count(dev, len(starts), 4 * (tile_elems + B * Hkv * G * Nk)))
    col = partials[0] if len(partials) == 1 else torch.stack(partials).sum(0)
    col = col.view(B, dims.heads_q, Nk)
    counts = masks.receiver_counts(dims, causal, mask, dev).unsqueeze(1)
    return col, torch.where(counts > 0, col / counts.clamp(min=1.0), torch.zeros((), device=dev))


def _tile_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    dims: AttnDims,
    mask: torch.Tensor | None,
    scale: float,
    b: int,
    head: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    causal: bool,
) -> torch.Tensor:
    """fp32 ``[r, c]`` probabilities of one head's tile (validated inputs)."""
    qs = q[b, head, rows[0] : rows[1]].to(torch.float32) * scale
    ks = k[b, head // dims.group, cols[0] : cols[1]].to(torch.float32)
    lse_rows = lse[b, head, rows[0] : rows[1]]
    vis = masks.visibility(dims, causal, None if mask is None else mask[b : b + 1], rows, cols, q.device)[0]
    vis = vis & torch.isfinite(lse_rows)[:, None]
    probs = torch.exp(qs @ ks.T - lse_rows[:, None])
    return torch.where(vis, probs, torch.zeros((), device=q.device))


def _check_head(dims: AttnDims, head: object, batch_index: object) -> tuple[int, int]:
    h = check_int(head, "head", low=0, high=dims.heads_q - 1)
    b = check_int(batch_index, "batch_index", low=0, high=dims.batch - 1)
    return h, b


@torch.no_grad()
def chunked_tile(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    head: int,
    batch_index: int = 0,
    q_range: tuple[int, int],
    k_range: tuple[int, int],
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact probabilities ``[q1-q0, k1-k0]`` (fp32, masked entries 0) of one head's tile."""
    dims = check_qk(q, k)
    h, b = _check_head(dims, head, batch_index)
    rows = check_range(q_range, dims.len_q, "q_range")
    cols = check_range(k_range, dims.len_k, "k_range")
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    lse = check_lse(lse, dims, q.device)
    scale = resolve_scale(scale, dims.head_dim)
    return _tile_probs(q, k, lse, dims, mask, scale, b, h, rows, cols, causal)


def thumbnail_edges(n: int, size: int) -> list[int]:
    """Bin edges (``min(size, n) + 1`` ints) splitting ``range(n)`` into contiguous non-empty bins.

    Edge ``t`` is ``floor(t * n / bins)``; bin ``t`` holds indices ``[edge[t], edge[t+1])``.
    """
    bins = min(size, n)
    return [t * n // bins for t in range(bins + 1)]


def _group_bins(edges: list[int], target: int) -> list[tuple[int, int]]:
    """Consecutive bin ranges ``(first_bin, stop_bin)`` covering at least ``target`` indices each."""
    groups, start = [], 0
    for t in range(1, len(edges)):
        if edges[t] - edges[start] >= target or t == len(edges) - 1:
            groups.append((start, t))
            start = t
    return groups


@torch.no_grad()
def chunked_thumbnail(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    head: int,
    batch_index: int = 0,
    size: int = 256,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    block_q: int = 256,
    block_k: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max- and mean-pooled views ``[min(size, Nq), min(size, Nk)]`` of one head's full map.

    Bins are ``thumbnail_edges(Nq, size)`` x ``thumbnail_edges(Nk, size)``; the map is streamed in
    tiles of about ``block_q x block_k`` aligned to the bins, and causally empty tiles are skipped.
    The mean counts masked entries as zeros (it is the mean of the materialised map over the bin).
    """
    dims = check_qk(q, k)
    h, b = _check_head(dims, head, batch_index)
    size = check_int(size, "size", low=1)
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    lse = check_lse(lse, dims, q.device)
    scale = resolve_scale(scale, dims.head_dim)
    re, ce = thumbnail_edges(dims.len_q, size), thumbnail_edges(dims.len_k, size)
    dev = q.device
    rbin = torch.bucketize(torch.arange(dims.len_q, device=dev), torch.tensor(re[1:], device=dev), right=True)
    cbin = torch.bucketize(torch.arange(dims.len_k, device=dev), torch.tensor(ce[1:], device=dev), right=True)
    mx = torch.zeros(len(re) - 1, len(ce) - 1, device=dev)
    sm = torch.zeros_like(mx)
    for ra, rb in _group_bins(re, block_q):
        rows = (re[ra], re[rb])
        for ca, cb in _group_bins(ce, block_k):
            cols = (ce[ca], ce[cb])
            if causal and cols[0] > dims.offset + rows[1] - 1:
                continue  # entirely in the future of every row: all zeros
            p = _tile_probs(q, k, lse, dims, mask, scale, b, h, rows, cols, causal)
            rid = (rbin[rows[0] : rows[1]] - ra)[:, None]
            cid = (cbin[cols[0] : cols[1]] - ca)[None, :]
            nr, nc = rb - ra, cb - ca
            colmax = torch.zeros(p.shape[0], nc, device=dev).scatter_reduce_(1, cid.expand_as(p), p, "amax")
            mx[ra:rb, ca:cb] = torch.zeros(nr, nc, device=dev).scatter_reduce_(0, rid.expand(-1, nc), colmax, "amax")
            colsum = torch.zeros(p.shape[0], nc, device=dev).index_add_(1, cid[0], p)
            sm[ra:rb, ca:cb] = torch.zeros(nr, nc, device=dev).index_add_(0, rid[:, 0], colsum)
    rlen = torch.tensor(re, device=dev, dtype=torch.float32).diff()
    clen = torch.tensor(ce, device=dev, dtype=torch.float32).diff()
    return mx, sm / (rlen[:, None] * clen[None, :])
