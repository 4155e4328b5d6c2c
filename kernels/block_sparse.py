"""Block scores and block selection for block-sparse attention (HeSS, docs/metrics.md §6).

Blocks: query block ``t`` = query rows ``[t*bs, (t+1)*bs)``; key block ``u`` = key positions
``[u*bs, (u+1)*bs)`` (the last block of each may be shorter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import block_counts, check_block, check_qk, resolve_scale


def _mean_pool(x: torch.Tensor, block_size: int, n_blocks: int) -> torch.Tensor:
    """Mean over consecutive blocks of the sequence axis: ``[B, H, N, D] -> [B, H, n_blocks, D]`` fp32."""
    n = x.shape[2]
    padded = F.pad(x.to(torch.float32), (0, 0, 0, n_blocks * block_size - n))
    sums = padded.view(*x.shape[:2], n_blocks, block_size, x.shape[3]).sum(3)
    lengths = torch.clamp(n - torch.arange(n_blocks, device=x.device) * block_size, max=block_size)
    return sums / lengths[:, None].to(torch.float32)


@torch.no_grad()
def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 64,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Mean-pooled Q·K block scores ``[B, Hq, n_q_blocks, n_k_blocks]`` fp32.

    ``score[t, u] = scale · mean(q in block t) · mean(k in block u)``; with ``causal`` the key
    blocks that lie entirely in the future of every row of query block ``t`` are ``-inf``.
    """
    dims = check_qk(q, k)
    block_size = check_block(block_size, "block_size")
    scale = resolve_scale(scale, dims.head_dim)
    nqb, nkb = block_counts(dims, block_size)
    qm = _mean_pool(q, block_size, nqb)
    km = _mean_pool(k, block_size, nkb).repeat_interleave(dims.group, dim=1)
    scores = torch.matmul(qm, km.transpose(-1, -2)) * scale
    if causal:
        dev = q.device
        last = torch.clamp((torch.arange(nqb, device=dev) + 1) * block_size, max=dims.len_q) - 1 + dims.offset
        future = torch.arange(nkb, device=dev)[None, :] * block_size > last[:, None]
        scores = scores.masked_fill(future, float("-inf"))
    return scores


def _budget(keep_per_head: torch.Tensor | int, heads: int, device: torch.device) -> torch.Tensor:
    if isinstance(keep_per_head, bool):
        raise TypeError("keep_per_head must be an int or an integer tensor [Hq], got a bool")
    if isinstance(keep_per_head, int):
        budget = torch.full((heads,), keep_per_head, dtype=torch.int64, device=device)
    elif isinstance(keep_per_head, torch.Tensor):
        if keep_per_head.shape != (heads,):
            raise ValueError(f"keep_per_head must have shape [Hq] = ({heads},), got {tuple(keep_per_head.shape)}")
        if keep_per_head.is_floating_point():
            if not bool((keep_per_head == keep_per_head.round()).all()):
                raise ValueError("keep_per_head holds fractional block counts; round the allocation first")
        elif keep_per_head.dtype == torch.bool or keep_per_head.is_complex():
            raise TypeError(f"keep_per_head must hold integers, got {keep_per_head.dtype}")
        budget = keep_per_head.to(device=device, dtype=torch.int64)
    else:
        raise TypeError(f"keep_per_head must be an int or a tensor [Hq], got {type(keep_per_head).__name__}")
    if bool((budget < 0).any()):
        raise ValueError("keep_per_head must be >= 0")
    return budget


@torch.no_grad()
def select_blocks(
    scores: torch.Tensor,
    keep_per_head: torch.Tensor | int,
    *,
    always_keep_first: bool = True,
    always_keep_diagonal: bool = True,
) -> torch.Tensor:
    """Top-``c_h`` key blocks per (batch, head, query block) as a bool mask like ``scores``.

    Args:
        scores: ``[B, Hq, nqb, nkb]`` from ``block_scores`` (``-inf`` = not visible).
        keep_per_head: blocks per query block, an int or an integer tensor ``[Hq]``.
    The first block and the diagonal block (the last visible key block of a causal row; the block
    aligned with the query block, ``t + nkb - nqb``, for a bidirectional row) are always kept and
    count toward the budget; the budget is clamped to the number of visible blocks.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 4 or not scores.is_floating_point():
        raise TypeError("scores must be a float tensor [B, Hq, n_q_blocks, n_k_blocks] from block_scores")
    B, H, nqb, nkb = scores.shape
    dev = scores.device
    budget = _budget(keep_per_head, H, dev)[None, :, None]
    finite = torch.isfinite(scores)
    idx = torch.arange(nkb, device=dev)
    last_visible = torch.where(finite, idx, -1).amax(-1)
    aligned = torch.clamp(torch.arange(nqb, device=dev) + (nkb - nqb), 0, nkb - 1).expand_as(last_visible)
    diag = torch.where(finite.all(-1), aligned, last_visible).clamp(min=0)
    forced = torch.zeros_like(finite)
    if always_keep_first:
        forced[..., 0] = True
    if always_keep_diagonal:
        forced.scatter_(-1, diag.unsqueeze(-1), True)
    forced &= finite
    n_keep = torch.minimum(torch.maximum(budget, forced.sum(-1)), finite.sum(-1))
    priority = scores.masked_fill(~finite, float("-inf")).masked_fill(forced, float("inf"))
    order = torch.argsort(priority, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, idx.expand_as(order).contiguous())
    return (rank < n_keep.unsqueeze(-1)) & finite
