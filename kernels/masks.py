"""Positions, visibility and visible-key counts (torch, any device).

Query row ``i`` sits at absolute position ``p_i = Nk - Nq + i``. Key ``j`` is visible to row
``i`` when ``j <= p_i`` (causal only), key ``j`` is real, and row ``i`` itself is real
(its position ``p_i`` is a real token). A block-sparse ``keep`` layout can drop more keys.
"""

from __future__ import annotations

import torch

from .validation import AttnDims


def query_real(mask: torch.Tensor | None, dims: AttnDims) -> torch.Tensor | None:
    """Bool ``[B, Nq]``: True where the query row is a real token (None = all real)."""
    return None if mask is None else mask[:, dims.offset :]


def visibility(
    dims: AttnDims,
    causal: bool,
    mask: torch.Tensor | None,
    rows: tuple[int, int],
    cols: tuple[int, int],
    device: torch.device,
) -> torch.Tensor:
    """Bool ``[B or 1, r, c]`` visibility of keys ``cols`` for query rows ``rows``."""
    r = torch.arange(rows[0], rows[1], device=device) + dims.offset
    c = torch.arange(cols[0], cols[1], device=device)
    vis = (c[None, :] <= r[:, None]) if causal else torch.ones(r.numel(), c.numel(), dtype=torch.bool, device=device)
    vis = vis.unsqueeze(0)
    if mask is not None:
        qr = mask[:, dims.offset + rows[0] : dims.offset + rows[1]]
        vis = vis & mask[:, None, cols[0] : cols[1]] & qr[:, :, None]
    return vis


def keep_elements(
    keep: torch.Tensor, block_size: int, rows: tuple[int, int], cols: tuple[int, int]
) -> torch.Tensor:
    """Expand a block layout ``[B, Hq, nqb, nkb]`` to bool ``[B, Hq, r, c]`` for a tile."""
    dev = keep.device
    qb = torch.arange(rows[0], rows[1], device=dev) // block_size
    kb = torch.arange(cols[0], cols[1], device=dev) // block_size
    return keep[:, :, qb][:, :, :, kb]


def visible_counts(dims: AttnDims, causal: bool, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Float ``[B, Nq]``: number of keys each query row sees (0 for padded rows)."""
    pos = torch.arange(dims.len_q, device=device) + dims.offset
    if mask is None:
        counts = (pos + 1) if causal else torch.full_like(pos, dims.len_k)
        return counts.to(torch.float32).expand(dims.batch, -1).contiguous()
    cum = mask.to(torch.int64).cumsum(-1)
    counts = cum[:, pos] if causal else cum[:, -1:].expand(-1, dims.len_q)
    return (counts * mask[:, dims.offset :]).to(torch.float32)


def receiver_counts(dims: AttnDims, causal: bool, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Float ``[B, Nk]``: number of real query rows that can see key ``j`` (0 for padded keys)."""
    real_at = torch.zeros(dims.batch, dims.len_k, dtype=torch.int64, device=device)
    real_at[:, dims.offset :] = 1
    if mask is not None:
        real_at = real_at * mask
    if causal:
        counts = real_at.flip(-1).cumsum(-1).flip(-1)
    else:
        counts = real_at.sum(-1, keepdim=True).expand(-1, dims.len_k)
    if mask is not None:
        counts = counts * mask
    return counts.to(torch.float32)


def sparse_visible_counts(
    dims: AttnDims, causal: bool, mask: torch.Tensor | None, keep: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Float ``[B, Hq, Nq]``: keys each row sees under a block layout ``keep [B, Hq, nqb, nkb]``."""
    dev = keep.device
    nkb = keep.shape[-1]
    pos = torch.arange(dims.len_q, device=dev) + dims.offset  # [Nq]
    lo = torch.arange(nkb, device=dev) * block_size  # [nkb]
    hi = torch.clamp(lo + block_size, max=dims.len_k)
    hi_eff = torch.minimum(hi[None, :], pos[:, None] + 1) if causal else hi[None, :].expand(dims.len_q, -1)
    hi_eff = torch.maximum(hi_eff, lo[None, :])  # [Nq, nkb]
    if mask is None:
        per_block = (hi_eff - lo[None, :]).to(torch.float32).unsqueeze(0)  # [1, Nq, nkb]
    else:
        cum = torch.nn.functional.pad(mask.to(torch.int64).cumsum(-1), (1, 0))  # [B, Nk+1]
        per_block = (cum[:, hi_eff] - cum[:, lo][:, None, :]).to(torch.float32)  # [B, Nq, nkb]
    rows_keep = keep[:, :, torch.arange(dims.len_q, device=dev) // block_size].to(torch.float32)
    counts = (rows_keep * per_block.unsqueeze(1)).sum(-1)  # [B, Hq, Nq]
    if mask is not None:
        counts = counts * mask[:, None, dims.offset :]
    return counts
