"""Per-row facts of a materialised attention map (docs/metrics.md §1, §2), for patterns mode.

The statistics themselves are the kernels' (:func:`kernels.reference.stats_from_probs`), so
both capture modes compute them with one implementation; this module adds the masking of a
padded batch, the received mass of a map, and the token-based detector rows. Shapes:
``A [B, H, Nq, Nk]`` fp32 post-softmax; query row ``i`` sits at absolute position
``Nk - Nq + i`` (or ``r0 + i`` for a row block); ``key_mask [B, Nk]`` bool (True = real).
"""

from __future__ import annotations

import torch

from kernels import STAT_NAMES
from kernels.reference import stats_from_probs

DETECTOR_ROWS = ("induction_mass", "duplicate_mass")

__all__ = ["DETECTOR_ROWS", "STAT_NAMES", "detector_rows", "detector_targets", "map_received_mass",
           "map_row_statistics", "visibility"]


def visibility(key_mask: torch.Tensor, n_queries: int, causal: bool) -> torch.Tensor:
    """``[B, Nq, Nk]`` bool: which keys each query row may attend to."""
    n_keys = key_mask.shape[1]
    visible = key_mask[:, None, :].expand(-1, n_queries, -1)
    if causal:
        qpos = torch.arange(n_keys - n_queries, n_keys, device=key_mask.device)
        kpos = torch.arange(n_keys, device=key_mask.device)
        visible = visible & (kpos[None, None, :] <= qpos[None, :, None])
    return visible


def map_row_statistics(A: torch.Tensor, key_mask: torch.Tensor, *, causal: bool,
                       local_window: int = 8) -> dict[str, torch.Tensor]:
    """All docs/metrics.md §1 per-row statistics of a map, each ``[B, H, Nq]`` (0 on padded query rows)."""
    n_q, n_k = A.shape[-2:]
    visible = visibility(key_mask, n_q, causal)[:, None]
    stats = stats_from_probs(A.float() * visible, visible, n_k - n_q, local_window)
    real_rows = key_mask[:, None, n_k - n_q:]
    return {name: value.masked_fill(~real_rows, 0.0) for name, value in stats.items()}


def map_received_mass(A: torch.Tensor, key_mask: torch.Tensor, *, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums over real query rows ``c_j`` and causal-normalised ``ĉ_j``, each ``[B, H, Nk]``."""
    n_q, n_k = A.shape[-2:]
    real_rows = key_mask[:, n_k - n_q:]
    raw = (A.float() * real_rows[:, None, :, None]).sum(-2)
    seen_by = (visibility(key_mask, n_q, causal) & real_rows[:, :, None]).sum(-2)[:, None, :].float()
    normalized = torch.where(seen_by > 0, raw / seen_by.clamp_min(1.0), torch.zeros_like(raw))
    return raw, normalized


def detector_targets(tokens: torch.Tensor, mask: torch.Tensor, rows: tuple[int, int] | None = None
                     ) -> dict[str, torch.Tensor]:
    """Target key sets of the token-based detectors, each ``[B, r, N]`` bool for query rows ``rows``.

    duplicate: earlier positions j < i holding the same token as i.
    induction: positions j <= i whose previous token j-1 (< i) equals token i (TransformerLens'
    induction pattern; on a repeated random block it is exactly ``i - L + 1``).
    """
    n = tokens.shape[1]
    r0, r1 = rows if rows is not None else (0, n)
    query = torch.arange(r0, r1, device=tokens.device)
    keys = torch.arange(n, device=tokens.device)
    same = tokens[:, r0:r1, None] == tokens[:, None, :]
    real = mask[:, r0:r1, None] & mask[:, None, :]
    duplicate = same & real & (keys[None, None, :] < query[None, :, None])
    induction = torch.zeros_like(duplicate)
    induction[:, :, 1:] = duplicate[:, :, :-1]  # j-1 is an earlier duplicate of i  =>  j <= i
    return {"duplicate_mass": duplicate, "induction_mass": induction}


def detector_rows(A: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, r0: int = 0) -> dict[str, torch.Tensor]:
    """Per-row mass on detector targets ``[B, H, r]`` for the map rows ``r0 : r0 + r``; NaN where a row has no target."""
    out = {}
    for name, target in detector_targets(tokens, mask, (r0, r0 + A.shape[-2])).items():
        mass = (A.float() * target[:, None]).sum(-1)
        out[name] = mass.masked_fill(~target.any(-1)[:, None, :], float("nan"))
    return out
