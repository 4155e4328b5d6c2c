"""Attention output and LSE from PyTorch's fused CPU flash-attention kernel.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` is the kernel behind
``scaled_dot_product_attention`` on the CPU; it also returns the per-row log-sum-exp. It computes
the output (``P @ V``) faster than any composition of torch ops, so the ``"sdpa_recompute"`` backend
takes ``out`` and ``lse`` from it and every statistic from one exact pass
(:func:`kernels.exact_pass.exact_stats`).

It takes equal head counts (K/V are repeated per query head, ``[B, Hq, Nk, D]``: small next to
the activations) and aligns the causal mask top-left, so it is used only where that is our
convention too (``Nq == Nk``, or bidirectional).
"""

from __future__ import annotations

import torch

from . import masks
from .validation import AttnDims


def _op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def unsupported_reason(q: torch.Tensor, dims: AttnDims, causal: bool) -> str | None:
    """Why the fused CPU kernel cannot serve this call, or None when it can."""
    if q.device.type != "cpu":
        return f"it runs on the CPU only (tensors are on {q.device})"
    if q.dtype != torch.float32:
        return f"it is used for fp32 inputs only (got {q.dtype}); the chunked backend computes half inputs in fp32"
    if causal and dims.len_q != dims.len_k:
        return "its causal mask is aligned top-left, so it needs Nq == Nk when causal"
    if _op() is None:
        return "this torch build has no aten._scaled_dot_product_flash_attention_for_cpu"
    return None


@torch.no_grad()
def sdpa_out_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: AttnDims, causal: bool,
                 mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``out [B, Hq, Nq, D]`` (input dtype) and ``lse [B, Hq, Nq]`` fp32 for validated inputs.

    Rows that see no key (padded queries, or only padded keys before them) get ``out = 0`` and
    ``lse = -inf``, as in every backend.
    """
    if dims.group > 1:
        k = k.repeat_interleave(dims.group, dim=1)
        v = v.repeat_interleave(dims.group, dim=1)
    attn_mask = None
    if mask is not None and not bool(mask.all()):
        attn_mask = torch.zeros(dims.batch, 1, 1, dims.len_k, dtype=q.dtype, device=q.device)
        attn_mask.masked_fill_(~mask[:, None, None, :], float("-inf"))
    out, lse = _op()(q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale)
    lse = lse.to(torch.float32)
    if mask is not None:
        dead = (masks.visible_counts(dims, causal, mask, q.device) == 0)[:, None, :]  # [B, 1, Nq]
        out = out.masked_fill(dead.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse
