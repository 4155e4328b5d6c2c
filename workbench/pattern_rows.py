"""Per-row statistics of a materialised attention pattern (METRICS §1, §2).

These are the patterns-mode twins of what the recompute kernels stream in stats mode; both
modes must give the same numbers. Shapes: ``A [B, H, Nq, Nk]`` fp32 post-softmax; query row
``i`` sits at absolute position ``Nk - Nq + i``; ``key_mask [B, Nk]`` bool (True = real).
"""

from __future__ import annotations

import torch

STAT_NAMES = (
    "entropy", "entropy_normalized", "max_weight", "first1_mass", "first4_mass",
    "prev_token_mass", "self_mass", "local_mass", "mean_distance",
)
DETECTOR_ROWS = ("induction_mass", "duplicate_mass")


def visibility(key_mask: torch.Tensor, n_queries: int, causal: bool) -> torch.Tensor:
    """``[B, Nq, Nk]`` bool: which keys each query row may attend to."""
    n_keys = key_mask.shape[1]
    visible = key_mask[:, None, :].expand(-1, n_queries, -1)
    if causal:
        qpos = torch.arange(n_keys - n_queries, n_keys, device=key_mask.device)
        kpos = torch.arange(n_keys, device=key_mask.device)
        visible = visible & (kpos[None, None, :] <= qpos[None, :, None])
    return visible


def row_statistics(A: torch.Tensor, key_mask: torch.Tensor, *, causal: bool,
                   local_window: int = 8) -> dict[str, torch.Tensor]:
    """All METRICS §1 per-row statistics, each ``[B, H, Nq]`` (0 on padded query rows)."""
    A = A.float()
    _, _, n_q, n_k = A.shape
    device = A.device
    qpos = torch.arange(n_k - n_q, n_k, device=device)
    kpos = torch.arange(n_k, device=device)
    n_visible = visibility(key_mask, n_q, causal).sum(-1)[:, None, :].float()  # [B,1,Nq]
    plogp = torch.where(A > 0, A * torch.log(A.clamp_min(1e-30)), torch.zeros_like(A))
    entropy = -plogp.sum(-1)
    log_n = torch.log(n_visible.clamp_min(1.0))
    distance = (qpos[:, None] - kpos[None, :]).abs().float()  # [Nq, Nk]
    prev_idx = (qpos - 1).clamp_min(0)
    rows = torch.arange(n_q, device=device)
    stats = {
        "entropy": entropy,
        "entropy_normalized": torch.where(n_visible > 1, entropy / log_n, torch.zeros_like(entropy)),
        "max_weight": A.max(-1).values,
        "first1_mass": A[..., 0],
        "first4_mass": A[..., : min(4, n_k)].sum(-1),
        "prev_token_mass": torch.where(qpos > 0, A[..., rows, prev_idx], torch.zeros_like(A[..., 0])),
        "self_mass": A[..., rows, qpos],
        "local_mass": (A * (distance <= local_window)).sum(-1),
        "mean_distance": (A * distance).sum(-1),
    }
    real_rows = key_mask[:, None, n_k - n_q:]
    return {name: value.masked_fill(~real_rows, 0.0) for name, value in stats.items()}


def received_mass(A: torch.Tensor, key_mask: torch.Tensor, *, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums over real query rows ``c_j`` and causal-normalised ``ĉ_j``, each ``[B, H, Nk]``."""
    n_q, n_k = A.shape[-2:]
    real_rows = key_mask[:, n_k - n_q:]
    raw = (A.float() * real_rows[:, None, :, None]).sum(-2)
    seen_by = (visibility(key_mask, n_q, causal) & real_rows[:, :, None]).sum(-2)[:, None, :].float()
    normalized = torch.where(seen_by > 0, raw / seen_by.clamp_min(1.0), torch.zeros_like(raw))
    return raw, normalized


def detector_targets(tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Target key sets of the token-based detectors, each ``[B, N, N]`` bool.

    duplicate: earlier positions j < i holding the same token as i.
    induction: positions j <= i whose previous token j-1 (< i) equals token i (TransformerLens'
    induction pattern; on a repeated random block it is exactly ``i - L + 1``).
    """
    same = tokens[:, :, None] == tokens[:, None, :]
    real = mask[:, :, None] & mask[:, None, :]
    n = tokens.shape[1]
    strictly_before = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)
    duplicate = same & real & strictly_before
    induction = torch.zeros_like(duplicate)
    induction[:, :, 1:] = duplicate[:, :, :-1]  # j-1 is an earlier duplicate of i  =>  j <= i
    return {"duplicate_mass": duplicate, "induction_mass": induction}


def detector_rows(A: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-row mass on detector targets ``[B, H, N]``; NaN where a row has no target."""
    out = {}
    for name, target in detector_targets(tokens, mask).items():
        mass = (A.float() * target[:, None]).sum(-1)
        out[name] = mass.masked_fill(~target.any(-1)[:, None, :], float("nan"))
    return out
