"""Validating launchers and thin wrappers for the Triton kernels.

Layering (as in Triton's fused-attention tutorial): ``@triton.jit`` kernel (triton_kernels.py)
→ validating launcher here (shapes, dtypes, device, strides, GQA mapping, grid) → thin wrapper
returning the public result types → public functions in ``dispatch.py``.
"""

from __future__ import annotations

import torch
import triton

from . import masks, triton_kernels as tk
from .types import STAT_NAMES, AttentionStats, stats_from_stacked
from .validation import (
    AttnDims,
    check_block,
    check_head_dim_for_triton,
    check_int,
    check_keep,
    check_key_padding_mask,
    check_lse,
    check_qk,
    check_qkv,
    check_triton_inputs,
    resolve_scale,
    triton_interpreting,
)

DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 32
MAX_SPARSE_BLOCK = 128  # block-sparse programs use BLOCK_M = BLOCK_N = block_size


def _check_int32_indexable(*tensors: torch.Tensor) -> None:
    """The kernels compute element offsets in int32."""
    for x in tensors:
        if x.numel() >= 2**31:
            raise ValueError(
                f"a tensor of shape {tuple(x.shape)} has >= 2**31 elements, too many for the Triton "
                "kernels' int32 offsets; split the batch or the heads into smaller calls"
            )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Coalesced loads need unit stride along the head dimension; copy only when it is not."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_arg(mask: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Key mask as contiguous int8 ``[B, Nk]`` (or a dummy pointer) and its batch stride."""
    if mask is None:
        return fallback, 0
    m = mask.to(torch.int8).contiguous()
    return m, m.stride(0)


def _upcast_dot(dtype: torch.dtype) -> bool:
    """The CPU interpreter mis-computes bf16 ``tl.dot``; feed it fp32 copies there."""
    return dtype == torch.bfloat16 and triton_interpreting()


def _num_warps(dtype: torch.dtype, head_dim: int, block_m: int, block_n: int) -> int:
    """Warps per program; chosen so ptxas (sm_90) reports no register spills for the defaults."""
    if dtype == torch.float32:
        return 8 if head_dim <= 64 else 4
    return 8 if head_dim > 64 or block_m * block_n >= 64 * 64 else 4


def _dot_precision(dtype: torch.dtype, head_dim: int) -> str | None:
    """fp32 dots at fp32 accuracy: exact FMA for small heads, 3xTF32 (fewer registers) for big ones."""
    if dtype != torch.float32:
        return None
    return "ieee" if head_dim <= 64 else "tf32x3"


def sparse_block_lists(
    keep: torch.Tensor, dims: AttnDims, block_size: int, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept key-block indices per (batch, head, query block), ascending, and their counts.

    Returns ``(idx int32 [B, Hq, nqb, nkb], cnt int32 [B, Hq, nqb])``; only the first ``cnt``
    entries of each ``idx`` row are meaningful. Causally invisible blocks are dropped here.
    """
    nqb, nkb = keep.shape[-2:]
    if causal:
        dev = keep.device
        last_pos = torch.clamp((torch.arange(nqb, device=dev) + 1) * block_size, max=dims.len_q) - 1 + dims.offset
        visible = torch.arange(nkb, device=dev)[None, :] * block_size <= last_pos[:, None]
        keep = keep & visible
    cnt = keep.sum(-1).to(torch.int32).contiguous()
    idx = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
    return idx, cnt


def launch_stats_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
    local_window: int,
    block_m: int | None = None,
    block_n: int | None = None,
    keep: torch.Tensor | None = None,
    block_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and launch ``_stats_fwd_kernel``.

    Returns ``(out [B, Hq, Nq, D] input dtype, lse [B, Hq, Nq] fp32, stats [9, B, Hq, Nq] fp32)``.
    With ``keep`` (block layout ``[B, Hq, nqb, nkb]``) the kernel visits only kept key blocks and
    uses ``block_m = block_n = block_size``.
    """
    dims = check_qkv(q, k, v)
    check_triton_inputs(q, k, v)
    check_head_dim_for_triton(dims.head_dim)
    _check_int32_indexable(q, k, v)
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    qk_scale = resolve_scale(scale, dims.head_dim) * tk.LOG2E
    local_window = check_int(local_window, "local_window", low=0)
    if keep is not None:
        block_size = check_block(block_size, "block_size", power_of_two=True)
        if block_size > MAX_SPARSE_BLOCK:
            raise ValueError(
                f"block_size={block_size} is too large for the Triton block-sparse kernel "
                f"(max {MAX_SPARSE_BLOCK}); use a smaller block or backend='chunked'"
            )
        keep = check_keep(keep, dims, block_size, q.device)
        block_m = block_n = block_size
    bm = check_block(block_m or DEFAULT_BLOCK_M, "block_q", power_of_two=True)
    bn = check_block(block_n or DEFAULT_BLOCK_N, "block_k", power_of_two=True)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    B, Hq, Nq, D = q.shape
    out = torch.empty(B, Hq, Nq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    stats = torch.empty(len(STAT_NAMES), B, Hq, Nq, dtype=torch.float32, device=q.device)
    mask_t, stride_mb = _mask_arg(mask, lse)
    if keep is not None:
        idx, cnt = sparse_block_lists(keep, dims, block_size, causal)
        idx_strides, cnt_strides = idx.stride()[:3], cnt.stride()[:2]
    else:
        idx, cnt, idx_strides, cnt_strides = lse, lse, (0, 0, 0), (0, 0)
    grid = (triton.cdiv(Nq, bm), B * Hq)
    tk._stats_fwd_kernel[grid](
        q, k, v, out, lse, stats, mask_t, idx, cnt,
        qk_scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        stride_mb, *idx_strides, *cnt_strides,
        Hq, dims.group, Nq, dims.len_k, D, local_window, B * Hq * Nq,
        CAUSAL=bool(causal),
        HAS_MASK=mask is not None,
        SPARSE=keep is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=triton.next_power_of_2(D),
        DOT_PRECISION=_dot_precision(q.dtype, D),
        UPCAST_DOT=_upcast_dot(q.dtype),
        num_warps=_num_warps(q.dtype, D, bm, bn),
    )
    return out, lse, stats


def launch_received_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    scale: float | None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Validate and launch ``_received_mass_kernel``; returns column sums ``[B, Hq, Nk]`` fp32."""
    dims = check_qk(q, k)
    check_triton_inputs(q, k)
    check_head_dim_for_triton(dims.head_dim)
    _check_int32_indexable(q, k)
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    lse = check_lse(lse, dims, q.device).contiguous()
    qk_scale = resolve_scale(scale, dims.head_dim) * tk.LOG2E
    bm = check_block(block_m or DEFAULT_BLOCK_M, "block_q", power_of_two=True)
    bn = check_block(block_n or DEFAULT_BLOCK_N, "block_k", power_of_two=True)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    B, Hq, Nq, D = q.shape
    col = torch.empty(B, Hq, dims.len_k, dtype=torch.float32, device=q.device)
    mask_t, stride_mb = _mask_arg(mask, lse)
    grid = (triton.cdiv(dims.len_k, bn), B * Hq)
    tk._received_mass_kernel[grid](
        q, k, lse, col, mask_t,
        qk_scale,
        *q.stride(), *k.stride(),
        stride_mb,
        Hq, dims.group, Nq, dims.len_k, D,
        CAUSAL=bool(causal),
        HAS_MASK=mask is not None,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=triton.next_power_of_2(D),
        DOT_PRECISION=_dot_precision(q.dtype, D),
        UPCAST_DOT=_upcast_dot(q.dtype),
        num_warps=_num_warps(q.dtype, D, bm, bn),
    )
    return col


# ---- thin wrappers -------------------------------------------------------------------------------
@torch.no_grad()
def triton_attention(
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
    block_q: int | None = None,
    block_k: int | None = None,
) -> AttentionStats:
    """Triton stats forward (dense, or block-sparse with ``keep``) as an ``AttentionStats``."""
    out, lse, stats = launch_stats_forward(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
        local_window=local_window, block_m=block_q, block_n=block_k, keep=keep, block_size=block_size,
    )
    return AttentionStats(out=out, lse=lse, stats=stats_from_stacked(stats))


@torch.no_grad()
def triton_received_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Received mass ``(c, ĉ)`` ``[B, Hq, Nk]`` from the Triton second pass."""
    col = launch_received_mass(q, k, lse, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    dims = check_qk(q, k)
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    counts = masks.receiver_counts(dims, causal, mask, q.device).unsqueeze(1)
    return col, torch.where(counts > 0, col / counts.clamp(min=1.0), torch.zeros((), device=q.device))
