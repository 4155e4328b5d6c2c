"""Block budgets for HeSS-guided block-sparse attention (docs/metrics.md §6).

Budget rule (documented in ``docs/hess.md``): with sparsity ``s`` (fraction of visible key
blocks dropped) and block size ``B``, query block ``t`` of a causal layer sees ``n_t = t + 1``
key blocks (all ``n_kb`` blocks when bidirectional). Every head must keep its forced blocks
(first and diagonal: ``m_t = min(2, n_t)``, counted in its budget as :func:`kernels.select_blocks`
does). The layer's total for that query block is
``C_t = clamp(round(H·(1−s)·n_t), H·m_t, H·n_t)`` — the same for every allocation — and it is
split as ``c_h = m_t + water_fill(C_t − H·m_t, w, n_t − m_t)`` with weights ``w`` = 1 (uniform),
HeSS (guided) or HeSS permuted within the layer (random). Because of the forced blocks the
achieved sparsity is below ``s`` when ``(1−s)·n_t < m_t``; the run reports the achieved one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from workbench.errors import InputError

Allocation = Literal["uniform", "hess", "random"]


def water_fill(total: int, weights: Sequence[float], caps: Sequence[int]) -> np.ndarray:
    """Split ``total`` integer units over items in proportion to ``weights`` without exceeding ``caps``.

    Items whose proportional share reaches their cap are clamped there and the excess is handed
    to the others in proportion to their weights, until nothing overflows; the real-valued
    shares are then rounded by largest remainder. If every remaining weight is 0 the remainder
    is split equally. When ``total >= Σ caps`` (infeasible) the caps are returned.

    Returns:
        int64 ``[n]`` with ``0 <= out <= caps`` and ``out.sum() == min(total, Σ caps)``.
    """
    w = np.asarray(weights, dtype=float)
    cap = np.asarray(caps)
    if w.ndim != 1 or cap.shape != w.shape:
        raise InputError(f"water_fill needs 1-D weights and caps of the same length, got {w.shape} and {cap.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InputError("water_fill weights must be finite and >= 0")
    if np.any(cap < 0) or np.any(cap != np.round(cap)):
        raise InputError("water_fill caps must be integers >= 0")
    if int(total) != total or total < 0:
        raise InputError(f"water_fill total={total} must be an integer >= 0")
    cap = cap.astype(np.int64)
    total = int(total)
    if total >= cap.sum():
        return cap.copy()
    share = np.zeros(len(w))
    active = cap > 0
    remaining = float(total)
    while active.any():
        ww = w[active] if w[active].sum() > 0 else np.ones(int(active.sum()))
        proposal = remaining * ww / ww.sum()
        over = proposal >= cap[active]
        index = np.flatnonzero(active)
        if not over.any():
            share[index] = proposal
            break
        fixed = index[over]
        share[fixed] = cap[fixed]
        remaining -= cap[fixed].sum()
        active[fixed] = False
    return _round_largest_remainder(share, cap, total, w)


def _round_largest_remainder(share: np.ndarray, cap: np.ndarray, total: int, w: np.ndarray) -> np.ndarray:
    out = np.minimum(np.floor(share + 1e-9).astype(np.int64), cap)
    left = total - int(out.sum())
    frac = share - out
    if left > 0:
        order = np.lexsort((-w, -frac))  # largest remainder first, then larger weight
        order = [i for i in order if out[i] < cap[i]][:left]
        out[order] += 1
    elif left < 0:
        order = np.lexsort((w, frac))  # smallest remainder first
        order = [i for i in order if out[i] > 0][:-left]
        out[order] -= 1
    return out


def check_sparsity(sparsity: float) -> float:
    """Validate ``s`` in ``[0, 1)`` (fraction of key blocks dropped)."""
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise InputError(f"sparsity={sparsity!r} must lie in [0, 1) (fraction of key blocks dropped)")
    return float(sparsity)


def visible_blocks(n_tokens: int, block_size: int, causal: bool = True) -> np.ndarray:
    """``[nqb]`` number of key blocks query block ``t`` can see."""
    if block_size < 1 or n_tokens < 1:
        raise InputError(f"block_size={block_size} and n_tokens={n_tokens} must be >= 1")
    n_blocks = -(-n_tokens // block_size)
    return np.arange(1, n_blocks + 1) if causal else np.full(n_blocks, n_blocks)


def allocation_weights(kind: Allocation, hess: np.ndarray | None, *, seed: int = 0) -> np.ndarray:
    """``[L, H]`` weights for an allocation: ones, HeSS, or HeSS permuted within each layer."""
    if kind not in ("uniform", "hess", "random"):
        raise InputError(f"unknown allocation '{kind}': use uniform, hess or random")
    if hess is None:
        raise InputError("allocation weights need the HeSS table [L, H]: fit the hess probe first")
    hess = np.asarray(hess, dtype=float)
    if kind == "uniform":
        return np.ones_like(hess)
    weights = np.where(np.isfinite(hess), hess, 0.0)
    if kind == "random":
        rng = np.random.default_rng(seed)
        weights = np.stack([row[rng.permutation(len(row))] for row in weights])
    return weights


def block_budgets(weights: np.ndarray, sparsity: float, n_tokens: int, *, block_size: int = 64,
                  causal: bool = True) -> torch.Tensor:
    """Key blocks kept per (layer, head, query block) under the budget rule of this module.

    Args:
        weights: ``[L, H]`` non-negative allocation weights (e.g. HeSS).
        sparsity: fraction of visible key blocks dropped, in ``[0, 1)``.
        n_tokens: sequence length (query = key length).
    Returns:
        int64 ``[L, H, nqb]``.
    """
    sparsity = check_sparsity(sparsity)
    weights = np.asarray(weights, dtype=float)
    if weights.ndim != 2:
        raise InputError(f"weights must be [layers, heads], got shape {weights.shape}")
    n_layers, n_heads = weights.shape
    visible = visible_blocks(n_tokens, block_size, causal)
    forced = np.minimum(2, visible)
    out = np.zeros((n_layers, n_heads, len(visible)), dtype=np.int64)
    for t, (n_t, m_t) in enumerate(zip(visible, forced)):
        total = int(np.clip(round(n_heads * (1.0 - sparsity) * n_t), n_heads * m_t, n_heads * n_t))
        caps = np.full(n_heads, n_t - m_t)
        for layer in range(n_layers):
            out[layer, :, t] = m_t + water_fill(total - n_heads * m_t, weights[layer], caps)
    return torch.from_numpy(out)


def nominal_density(budgets: torch.Tensor, n_tokens: int, block_size: int, causal: bool = True) -> float:
    """Fraction of visible (query block, key block) pairs kept, over all layers and heads."""
    visible = int(visible_blocks(n_tokens, block_size, causal).sum())
    return int(budgets.sum()) / (visible * budgets.shape[0] * budgets.shape[1])
