"""Plain-torch ground truth: materialises the full ``[Nq, Nk]`` map. Small inputs only."""

from __future__ import annotations

import torch

from . import masks
from .types import AttentionStats, STAT_NAMES
from .validation import check_key_padding_mask, check_keep, check_lse, check_qk, check_qkv, resolve_scale


def _compute_dtype(q: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float, cd: torch.dtype) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1)
    return torch.matmul(q.to(cd), kk.to(cd).transpose(-1, -2)) * scale


def reference_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    keep: torch.Tensor | None = None,
    block_size: int = 64,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Materialise the attention map.

    Returns ``(A [B, Hq, Nq, Nk], lse [B, Hq, Nq], visible [B|1, Hq|1, Nq, Nk] bool)`` in
    ``compute_dtype`` (default fp32, fp64 for fp64 input). Rows that see nothing are all zero
    with ``lse = -inf``.
    """
    dims = check_qk(q, k, allow_float64=True)
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    scale = resolve_scale(scale, dims.head_dim)
    cd = _compute_dtype(q, compute_dtype)
    vis = masks.visibility(dims, causal, mask, (0, dims.len_q), (0, dims.len_k), q.device).unsqueeze(1)
    if keep is not None:
        keep = check_keep(keep, dims, block_size, q.device)
        vis = vis & masks.keep_elements(keep, block_size, (0, dims.len_q), (0, dims.len_k))
    s = _logits(q, k, scale, cd).masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.where(vis, torch.softmax(s, dim=-1), torch.zeros((), dtype=cd, device=q.device))
    return probs, lse, vis


def stats_from_probs(
    probs: torch.Tensor, visible: torch.Tensor, offset: int, local_window: int
) -> dict[str, torch.Tensor]:
    """All ``STAT_NAMES`` statistics ``[B, Hq, Nq]`` from a materialised map ``[B, Hq, Nq, Nk]``."""
    nq, nk = probs.shape[-2:]
    dev, cd = probs.device, probs.dtype
    pos = torch.arange(nq, device=dev) + offset
    dist = (pos[:, None] - torch.arange(nk, device=dev)[None, :]).abs().to(cd)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)
    n_vis = visible.sum(-1).expand(probs.shape[:-1]).to(cd)
    safe_log = torch.log(torch.clamp(n_vis, min=2.0))
    zero = torch.zeros((), dtype=cd, device=dev)
    idx = pos.expand(probs.shape[:-1]).unsqueeze(-1)
    prev = torch.where(pos >= 1, probs.gather(-1, (idx - 1).clamp(min=0)).squeeze(-1), zero)
    values = {
        "entropy": entropy,
        "entropy_normalized": torch.where(n_vis > 1, entropy / safe_log, zero),
        "max_weight": probs.amax(-1),
        "first1_mass": probs[..., 0],
        "first4_mass": probs[..., :4].sum(-1),
        "prev_token_mass": prev,
        "self_mass": probs.gather(-1, idx).squeeze(-1),
        "local_mass": (probs * (dist <= local_window)).sum(-1),
        "mean_distance": (probs * dist).sum(-1),
    }
    return {name: values[name] for name in STAT_NAMES}


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    local_window: int = 8,
    keep: torch.Tensor | None = None,
    block_size: int = 64,
    compute_dtype: torch.dtype | None = None,
) -> AttentionStats:
    """Ground-truth attention with statistics (optionally block-sparse through ``keep``).

    ``compute_dtype`` sets the precision of every step (default fp32; pass the input dtype to
    see what PyTorch itself makes at that precision, or fp64 for a truth). Output is in the
    input dtype; ``lse``/stats are fp32 (fp64 when computing in fp64).
    """
    dims = check_qkv(q, k, v, allow_float64=True)
    probs, lse, vis = reference_probs(
        q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
        keep=keep, block_size=block_size, compute_dtype=compute_dtype,
    )
    cd = probs.dtype
    out = torch.matmul(probs, v.repeat_interleave(dims.group, dim=1).to(cd)).to(q.dtype)
    stat_dtype = torch.promote_types(cd, torch.float32)
    stats = stats_from_probs(probs, vis, dims.offset, local_window)
    return AttentionStats(
        out=out, lse=lse.to(stat_dtype), stats={n: s.to(stat_dtype) for n, s in stats.items()}
    )


def recompute_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Materialise ``A_ij = exp(s_ij - lse_i)`` from a saved LSE (fp32, masked entries 0)."""
    dims = check_qk(q, k, allow_float64=True)
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    lse = check_lse(lse, dims, q.device)
    scale = resolve_scale(scale, dims.head_dim)
    vis = masks.visibility(dims, causal, mask, (0, dims.len_q), (0, dims.len_k), q.device).unsqueeze(1)
    vis = vis & torch.isfinite(lse).unsqueeze(-1)
    s = _logits(q, k, scale, torch.float32)
    return torch.where(vis, torch.exp(s - lse.unsqueeze(-1)), torch.zeros((), device=q.device))


def reference_received_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums ``c [B, Hq, Nk]`` and causal-normalised ``ĉ`` of the materialised map."""
    dims = check_qk(q, k, allow_float64=True)
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    probs = recompute_probs(q, k, lse, causal=causal, key_padding_mask=mask, scale=scale)
    col = probs.sum(-2)
    counts = masks.receiver_counts(dims, causal, mask, q.device).unsqueeze(1)
    return col, torch.where(counts > 0, col / counts.clamp(min=1.0), torch.zeros((), device=q.device))

