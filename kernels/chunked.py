"""Chunked torch attention with per-row statistics (the fast CPU path).

FlashAttention-style: query blocks x key blocks with an online softmax; the ``[Nq, Nk]`` map is
never stored. Per logits element the loop does one QKᵀ matmul, a row max, a subtract, an exp, one
``P @ V_aug`` matmul and a multiply + row sum for the entropy; everything else is per row:

* ``V_aug = [V, 1, j - c, 0, 0, pad]`` (width rounded to 16): the same ``baddbmm`` accumulates the
  output, the row sum ``l`` and ``Σ_j p_ij (j - c)`` (mean distance; ``c`` = last position of the
  query block, so the numbers stay small for local heads). Two spare accumulator columns hold the
  entropy numerator ``E = Σ_j p_ij (s_ij - m_i)`` and the bidirectional ``|i - j|`` correction,
  so one ``mul_`` rescales every accumulator when a row max moves.
* entropy ``H = log l - E / l``; ``max_weight = 1 / l`` (the row max has ``p = 1``).
* self / previous-token / local mass and first-1/first-4 mass are recomputed after the key loop as
  ``exp(q_i·k_j - lse_i)`` for the keys with ``|i - j| <= w`` (a narrow band matmul read along its
  diagonal) and ``j < 4``.
* GQA: q is regrouped to ``[B*Hkv, G*bq, D]`` so all query heads of a kv head share one matmul and
  K/V are never copied per query head. Causal tiles left of the diagonal need no mask; only the
  diagonal tile gets a precomputed triangular bias; tiles right of it are skipped.
* On the CPU whole query blocks run on a thread pool of single-threaded ops (``parallel.py``).
"""

from __future__ import annotations

import threading

import torch

from . import masks
from .parallel import run_blocks, worker_count
from .types import STAT_NAMES, AttentionStats, stats_from_stacked
from .validation import (
    AttnDims,
    check_block,
    check_int,
    check_keep,
    check_key_padding_mask,
    check_qkv,
    resolve_scale,
)
from .window_stats import WindowMasses

NEG = -1.0e30
"""Finite 'minus infinity' for masked logits: exp underflows to 0 and 0 * NEG stays 0 (no NaN)."""


EXP_FLOOR = -80.0
"""``s - m`` is clamped here before ``exp`` where it may be far below 0: torch's vectorised CPU exp
leaves its fast path (about 50x slower) below about -88; ``exp(-80) = 1.8e-35`` vanishes next to a
row sum >= 1."""

_TILE_ELEMENTS = 1_200_000  # logits per tile; ~5 MB fp32 keeps a tile near the L2 cache


def default_blocks(dims: AttnDims, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """Pick (query rows per head, keys) per tile so one logits tile holds about 1.2M elements."""
    bk = 512 if block_k is None else check_block(block_k, "block_k")
    if block_q is None:
        rows = max(1, _TILE_ELEMENTS // (dims.batch * dims.heads_kv * bk * dims.group))
        bq = 1 << (max(32, min(1024, rows)).bit_length() - 1)
    else:
        bq = check_block(block_q, "block_q")
    return min(bq, dims.len_q), bk


def _view(buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous view of the first elements of a preallocated buffer."""
    n = 1
    for s in shape:
        n *= s
    return buf[:n].view(shape)


def _chunks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """Split ``[start, stop)`` into chunks of ``size`` (the last one may be shorter)."""
    return [(a, min(stop, a + size)) for a in range(start, stop, size)]


def key_tiles(p0: int, p1: int, len_k: int, block_k: int, causal: bool) -> list[tuple[int, int, str]]:
    """Key tiles ``(j0, j1, kind)`` of the query block at positions ``[p0, p1)``: ``"left"`` tiles of
    ``block_k`` keys before it, the square ``"diag"`` tile at its own positions, and (bidirectional
    only) ``"right"`` tiles after it."""
    tiles = [(a, b, "left") for a, b in _chunks(0, p0, block_k)]
    tiles.append((p0, p1, "diag"))
    if not causal:
        tiles += [(a, b, "right") for a, b in _chunks(p1, len_k, block_k)]
    return tiles


class _Forward:
    """State shared by all query blocks of one chunked forward call."""

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dims: AttnDims,
        causal: bool,
        mask: torch.Tensor | None,
        scale: float,
        local_window: int,
        keep: torch.Tensor | None,
        block_size: int,
        block_q: int,
        block_k: int,
    ) -> None:
        f32, dev = torch.float32, q.device
        self.d, self.causal, self.mask, self.scale = dims, causal, mask, scale
        self.keep, self.bs, self.bq, self.bk = keep, block_size, block_q, block_k
        B, Hkv, G, Nk, D = dims.batch, dims.heads_kv, dims.group, dims.len_k, dims.head_dim
        self.bh = B * Hkv
        self.q5 = q.reshape(B, Hkv, G, dims.len_q, D)
        self.kf = k.reshape(self.bh, Nk, D).to(f32)
        # accumulator columns: [out (D) | l | Σp(j-c) | E | corr | 0-pad]; V_aug has [V | 1 | j-c | 0...]
        self.col_l, self.col_j, self.col_e, self.col_c = D, D + 1, D + 2, D + 3
        self.daug = -(-(D + 4) // 16) * 16  # a multiple of 16 keeps the matmul on its fast path
        self.vaug = torch.zeros(self.bh, Nk, self.daug, dtype=f32, device=dev)
        self.vaug[..., :D] = v.reshape(self.bh, Nk, D)
        self.vaug[..., self.col_l] = 1.0
        self.jpos = torch.arange(Nk, dtype=f32, device=dev)
        self.kbias = None if mask is None else torch.zeros(B, Nk, device=dev).masked_fill_(~mask, NEG)
        ar = torch.arange(block_q, device=dev)
        self.tri = torch.zeros(block_q, block_q, device=dev).masked_fill_(ar[None, :] > ar[:, None], NEG)
        self.upper = (ar[None, :] - ar[:, None]).clamp(min=0).to(f32)
        self.tile_elems = self.bh * G * block_q * max(block_k, block_q)
        self._local = threading.local()  # per-worker scratch: logits/probability tiles, V_aug copy
        self._base_vaug_taken = False
        self._lock = threading.Lock()
        self.kmax = torch.linalg.vector_norm(self.kf, dim=-1).amax()  # for the exp-underflow bound
        self.window = WindowMasses(self.kf, dims, causal, mask, keep, block_size, local_window)
        if keep is not None:
            self.counts = masks.sparse_visible_counts(dims, causal, mask, keep, block_size)
        else:
            self.counts = masks.visible_counts(dims, causal, mask, dev)[:, None, :].expand(-1, dims.heads_q, -1)
        self.counts = self.counts.reshape(B, Hkv, G, dims.len_q)
        self.out = torch.empty(B, Hkv, G, dims.len_q, D, dtype=q.dtype, device=dev)
        self.lse = torch.empty(B, Hkv, G, dims.len_q, dtype=f32, device=dev)
        self.stats = torch.empty(len(STAT_NAMES), B, Hkv, G, dims.len_q, dtype=f32, device=dev)

    def scratch_bytes(self) -> int:
        """Scratch memory of one worker (two logits tiles and a V_aug copy)."""
        return 4 * (2 * self.tile_elems + self.vaug.numel())

    def _scratch(self) -> threading.local:
        """This thread's buffers; the first worker reuses V_aug, the others copy it (the j - c
        column is rewritten for every query block)."""
        local = self._local
        if not hasattr(local, "sbuf"):
            local.sbuf = torch.empty(self.tile_elems, dtype=torch.float32, device=self.vaug.device)
            local.pbuf = torch.empty_like(local.sbuf)
            with self._lock:
                first, self._base_vaug_taken = not self._base_vaug_taken, True
            local.vaug = self.vaug if first else self.vaug.clone()
        return local

    # ---- tiles -------------------------------------------------------------------------------

    def _masked_logits(
        self, qb: torch.Tensor, i0: int, i1: int, j0: int, j1: int, kind: str
    ) -> tuple[torch.Tensor | None, bool]:
        """Scaled logits ``[B*Hkv, G*n, nk]`` (masked entries near NEG) and whether any mask was
        applied; ``(None, False)`` when the block layout keeps nothing of this tile."""
        d, n, nk = self.d, i1 - i0, j1 - j0
        keep_tile = None
        if self.keep is not None:
            keep_tile = masks.keep_elements(self.keep, self.bs, (i0, i1), (j0, j1))
            if not bool(keep_tile.any()):
                return None, False
        sbuf = self._scratch().sbuf
        s = torch.bmm(qb, self.kf[:, j0:j1].transpose(1, 2), out=_view(sbuf, (self.bh, d.group * n, nk)))
        masked = keep_tile is not None
        if kind == "diag" and self.causal:
            s.view(self.bh, d.group, n, nk).add_(self.tri[:n, :nk])
            masked = True
        if self.mask is not None and not bool(self.mask[:, j0:j1].all()):
            s.view(d.batch, -1, nk).add_(self.kbias[:, None, j0:j1])
            masked = True
        if keep_tile is not None:
            s.view(d.batch, d.heads_q, n, nk).masked_fill_(~keep_tile, NEG)
        return s, masked

    def _tile(self, st: dict, qb: torch.Tensor, i0: int, i1: int, j0: int, j1: int, kind: str) -> None:
        s, masked = self._masked_logits(qb, i0, i1, j0, j1, kind)
        if s is None:
            return
        n, nk = i1 - i0, j1 - j0
        m_old, acc = st["m"], st["acc"]
        scratch = self._scratch()
        p = _view(scratch.pbuf, tuple(s.shape))
        m_new = torch.maximum(m_old, s.amax(-1))
        s.sub_(m_new.unsqueeze(-1))
        if masked or st["may_underflow"]:
            s.clamp_(min=EXP_FLOOR)
        torch.exp(s, out=p)
        if bool((m_new > m_old).any()):  # a row max moved: re-base every accumulator on it
            delta = m_new - m_old
            acc[..., self.col_e].sub_(delta * acc[..., self.col_l])  # Σ p (s - m) under the new m
            acc.mul_(torch.exp(-delta).unsqueeze(-1))
        if not self.causal and kind == "diag":
            corr = (p.view(self.bh, self.d.group, n, nk) * self.upper[:n, :nk]).sum(-1)
            acc[..., self.col_c].add_(corr.view_as(m_new))
        before = acc[..., self.col_l : self.col_j + 1].clone() if kind == "right" else None
        acc.baddbmm_(p, scratch.vaug[:, j0:j1])
        if before is not None:  # keys right of every row: Σ p (j - i) = Σ p (j - c) - (i - c) Σ p
            added = acc[..., self.col_l : self.col_j + 1] - before
            acc[..., self.col_c].add_(added[..., 1] - st["rel"] * added[..., 0])
        acc[..., self.col_e].add_(s.mul_(p).sum(-1))  # Σ p (s - m): the entropy numerator
        st["m"] = m_new

    # ---- one query block ---------------------------------------------------------------------
    def run_block(self, i0: int, i1: int) -> None:
        d, dev = self.d, self.q5.device
        B, Hkv, G, D = d.batch, d.heads_kv, d.group, d.head_dim
        n = i1 - i0
        p0, p1 = d.offset + i0, d.offset + i1
        c = p1 - 1
        qb = (self.q5[:, :, :, i0:i1].to(torch.float32) * self.scale).reshape(self.bh, G * n, D)
        kmax = p1 if self.causal else d.len_k
        self._scratch().vaug[:, :kmax, self.col_j] = self.jpos[:kmax] - c
        rel = (torch.arange(p0, p1, device=dev, dtype=torch.float32) - c).repeat(G)  # p - c per row
        # Cauchy-Schwarz: |s_ij| <= |q_i| max|k| =: R, so s - m >= -2R; below 80 exp never needs the clamp
        reach = torch.linalg.vector_norm(qb, dim=-1).amax() * self.kmax
        st = {
            "m": torch.full((self.bh, G * n), NEG, device=dev),
            "acc": torch.zeros(self.bh, G * n, self.daug, device=dev),
            "rel": rel,
            "may_underflow": bool(2.0 * reach > -EXP_FLOOR),
        }
        for j0, j1, kind in key_tiles(p0, p1, self.d.len_k, self.bk, self.causal):
            self._tile(st, qb, i0, i1, j0, j1, kind)

        cnt = self.counts[..., i0:i1]  # [B, Hkv, G, n]
        dead = (cnt == 0).reshape(self.bh, G * n)
        acc = st["acc"]
        l_safe = torch.where(dead, 1.0, acc[..., self.col_l])
        inv = 1.0 / l_safe
        logl = torch.log(l_safe)
        lse = torch.where(dead, float("-inf"), st["m"] + logl)
        dist = rel - acc[..., self.col_j] * inv
        if not self.causal:
            dist = dist + 2.0 * acc[..., self.col_c] * inv
        local, self_m, prev, first1, first4 = self.window(qb, torch.where(dead, float("inf"), lse), i0, i1)
        ent = logl - acc[..., self.col_e] * inv
        per_row = {
            "entropy": ent,
            "max_weight": inv,
            "mean_distance": dist,
        }
        shape5 = (B, Hkv, G, n)
        sl = (slice(None),) * 3 + (slice(i0, i1),)
        zero = torch.zeros((), device=dev)
        self.out[sl] = torch.where(dead.unsqueeze(-1), zero, acc[..., :D] * inv.unsqueeze(-1)).view(*shape5, D)
        self.lse[sl] = lse.view(shape5)
        ent5 = torch.where(dead, zero, ent).view(shape5)
        values = {
            "entropy_normalized": torch.where(cnt > 1, ent5 / torch.log(cnt.clamp(min=2.0)), zero),
            "local_mass": local,
            "self_mass": self_m,
            "prev_token_mass": prev,
            "first1_mass": first1,
            "first4_mass": first4,
        }
        for name, val in per_row.items():
            values[name] = torch.where(dead, zero, val).view(shape5)
        for idx, name in enumerate(STAT_NAMES):
            self.stats[(idx,) + sl] = values[name]


@torch.no_grad()
def chunked_attention(
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
    """Attention output, LSE and all statistics without materialising the map (torch, any device).

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` (fp32/bf16/fp16; computed in fp32).
        keep: optional block layout ``[B, Hq, ceil(Nq/block_size), ceil(Nk/block_size)]``;
            dropped blocks contribute nothing (block-sparse attention).
        block_q / block_k: query rows per head / keys per tile (default: about 1.2M logits a tile).
    Returns:
        ``AttentionStats`` with ``out [B, Hq, Nq, D]``, ``lse`` and ``stats`` ``[B, Hq, Nq]``.
    """
    dims = check_qkv(q, k, v)
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    scale = resolve_scale(scale, dims.head_dim)
    local_window = check_int(local_window, "local_window", low=0)
    if keep is not None:
        block_size = check_block(block_size, "block_size")
        keep = check_keep(keep, dims, block_size, q.device)
    bq, bk = default_blocks(dims, block_q, block_k)
    fwd = _Forward(q, k, v, dims, causal, mask, scale, local_window, keep, block_size, bq, bk)
    starts = list(range(0, dims.len_q, bq))[::-1]  # causal: the costliest (last) blocks first
    workers = worker_count(q.device, len(starts), fwd.scratch_bytes())
    run_blocks(lambda i0: fwd.run_block(i0, min(dims.len_q, i0 + bq)), starts, workers)
    B, Hq, Nq = dims.batch, dims.heads_q, dims.len_q
    return AttentionStats(
        out=fwd.out.view(B, Hq, Nq, dims.head_dim),
        lse=fwd.lse.view(B, Hq, Nq),
        stats=stats_from_stacked(fwd.stats.view(len(STAT_NAMES), B, Hq, Nq)),
    )
