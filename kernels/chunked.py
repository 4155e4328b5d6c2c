"""Chunked torch attention with per-row statistics (the fast CPU path).

FlashAttention-style: query blocks x key blocks with an online softmax; the ``[Nq, Nk]`` map is
never stored. Per logits element the loop does one QKᵀ matmul, a row max, one subtract, one exp,
one P@V_aug matmul and one fused multiply-sum for the entropy; everything else is per row:

* ``V_aug = [V, 1, j - c, 0-pad]``: the same ``P @ V_aug`` matmul yields the output, the row sum
  ``l`` and ``Σ_j p_ij (j - c)`` (mean distance; ``c`` = last position of the query block, so the
  numbers stay small for local heads).
* entropy ``H = log l - E / l`` with ``E = Σ_j p_ij (s_ij - m_i)``, rescaled online like the output.
* ``max_weight = 1 / l`` (the row max has ``p = 1``).
* self / previous-token / local mass and first-1/first-4 mass are recomputed after the key loop as
  ``exp(q_i·k_j - lse_i)`` for the few keys ``j`` in the ``|i - j| <= w`` window and ``j < 4``.
* GQA: q is regrouped to ``[B*Hkv, G*bq, D]`` so all query heads of a kv head share one matmul
  and K/V are never copied per query head. Causal tiles left of the diagonal need no mask; only the
  diagonal tile gets a (precomputed) triangular bias; tiles right of it are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import masks
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

NEG = -1.0e30
"""Finite 'minus infinity' for masked logits: exp underflows to 0 and 0 * NEG stays 0 (no NaN)."""

_TILE_ELEMENTS = 1_200_000  # logits per tile; ~5 MB fp32 keeps a tile near the L2 cache
_WINDOW_ELEMENTS = 4_000_000  # cap on the gathered window keys per step


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


def _even_chunks(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """Split ``[start, stop)`` into near-equal chunks of at most ``size``."""
    if stop <= start:
        return []
    n = -(-(stop - start) // size)
    edges = [start + (stop - start) * t // n for t in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


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
        self.w, self.keep, self.bs, self.bq, self.bk = local_window, keep, block_size, block_q, block_k
        B, Hkv, G, Nk, D = dims.batch, dims.heads_kv, dims.group, dims.len_k, dims.head_dim
        self.bh = B * Hkv
        self.q5 = q.reshape(B, Hkv, G, dims.len_q, D)
        self.kf = k.reshape(self.bh, Nk, D).to(f32)
        self.daug = -(-(D + 2) // 16) * 16  # a multiple of 16 keeps the matmul on its fast path
        self.vaug = torch.zeros(self.bh, Nk, self.daug, dtype=f32, device=dev)
        self.vaug[..., :D] = v.reshape(self.bh, Nk, D)
        self.vaug[..., D] = 1.0
        self.jpos = torch.arange(Nk, dtype=f32, device=dev)
        self.kbias = None if mask is None else torch.zeros(B, Nk, device=dev).masked_fill_(~mask, NEG)
        ar = torch.arange(block_q, device=dev)
        self.tri = torch.zeros(block_q, block_q, device=dev).masked_fill_(ar[None, :] > ar[:, None], NEG)
        self.upper = (ar[None, :] - ar[:, None]).clamp(min=0).to(f32)
        width = max(block_k, block_q)
        self.sbuf = torch.empty(self.bh * G * block_q * width, dtype=f32, device=dev)
        self.pbuf = torch.empty_like(self.sbuf)
        self.obuf = torch.empty(self.bh * G * block_q * self.daug, dtype=f32, device=dev)
        self.wl = max(local_window, 1)  # window reaches back at least to the previous token
        self.wr = 0 if causal else local_window
        self.kpad = F.pad(self.kf, (0, 0, self.wl, self.wr))
        if keep is not None:
            self.counts = masks.sparse_visible_counts(dims, causal, mask, keep, block_size)
        else:
            self.counts = masks.visible_counts(dims, causal, mask, dev)[:, None, :].expand(-1, dims.heads_q, -1)
        self.counts = self.counts.reshape(B, Hkv, G, dims.len_q)
        self.out = torch.empty(B, Hkv, G, dims.len_q, D, dtype=q.dtype, device=dev)
        self.lse = torch.empty(B, Hkv, G, dims.len_q, dtype=f32, device=dev)
        self.stats = torch.empty(len(STAT_NAMES), B, Hkv, G, dims.len_q, dtype=f32, device=dev)

    # ---- tiles -------------------------------------------------------------------------------
    def _tiles(self, p0: int, p1: int) -> list[tuple[int, int, str]]:
        tiles = [(a, b, "left") for a, b in _even_chunks(0, p0, self.bk)]
        tiles.append((p0, p1, "diag"))
        if not self.causal:
            tiles += [(a, b, "right") for a, b in _even_chunks(p1, self.d.len_k, self.bk)]
        return tiles

    def _masked_logits(self, qb: torch.Tensor, i0: int, i1: int, j0: int, j1: int, kind: str) -> torch.Tensor | None:
        """Scaled logits ``[B*Hkv, G*n, nk]`` with masked entries at NEG; None if nothing is kept."""
        d, n, nk = self.d, i1 - i0, j1 - j0
        keep_tile = None
        if self.keep is not None:
            keep_tile = masks.keep_elements(self.keep, self.bs, (i0, i1), (j0, j1))
            if not bool(keep_tile.any()):
                return None
        s = torch.bmm(qb, self.kf[:, j0:j1].transpose(1, 2), out=_view(self.sbuf, (self.bh, d.group * n, nk)))
        if kind == "diag" and self.causal:
            s.view(self.bh, d.group, n, nk).add_(self.tri[:n, :nk])
        if self.mask is not None and not bool(self.mask[:, j0:j1].all()):
            s.view(d.batch, -1, nk).add_(self.kbias[:, None, j0:j1])
        if keep_tile is not None:
            s.view(d.batch, d.heads_q, n, nk).masked_fill_(~keep_tile, NEG)
        return s

    def _tile(self, st: dict, qb: torch.Tensor, i0: int, i1: int, j0: int, j1: int, kind: str) -> None:
        s = self._masked_logits(qb, i0, i1, j0, j1, kind)
        if s is None:
            return
        D, n, nk = self.d.head_dim, i1 - i0, j1 - j0
        m_new = torch.maximum(st["m"], s.amax(-1))
        delta = m_new - st["m"]
        alpha = torch.exp(-delta)
        s.sub_(m_new.unsqueeze(-1))
        p = torch.exp(s, out=_view(self.pbuf, tuple(s.shape)))
        o = torch.bmm(p, self.vaug[:, j0:j1], out=_view(self.obuf, (self.bh, s.shape[1], self.daug)))
        acc = st["acc"]
        st["E"].sub_(delta * acc[..., D]).mul_(alpha)  # re-base Σ p (s - m) on the new max
        if not self.causal:
            st["corr"].mul_(alpha)
            if kind == "diag":
                st["corr"].add_((p.view(self.bh, self.d.group, n, nk) * self.upper[:n, :nk]).sum(-1).view_as(alpha))
            elif kind == "right":
                st["corr"].add_(o[..., D + 1] - st["rel"] * o[..., D])
        acc.mul_(alpha.unsqueeze(-1)).add_(o)
        st["E"].add_(s.mul_(p).sum(-1))
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
        self.vaug[:, :kmax, D + 1] = self.jpos[:kmax] - c
        rel = (torch.arange(p0, p1, device=dev, dtype=torch.float32) - c).repeat(G)  # p - c per row
        st = {
            "m": torch.full((self.bh, G * n), NEG, device=dev),
            "acc": torch.zeros(self.bh, G * n, self.daug, device=dev),
            "E": torch.zeros(self.bh, G * n, device=dev),
            "corr": torch.zeros(self.bh, G * n, device=dev),
            "rel": rel,
        }
        for j0, j1, kind in self._tiles(p0, p1):
            self._tile(st, qb, i0, i1, j0, j1, kind)

        cnt = self.counts[..., i0:i1]  # [B, Hkv, G, n]
        dead = (cnt == 0).reshape(self.bh, G * n)
        acc = st["acc"]
        l_safe = torch.where(dead, 1.0, acc[..., D])
        inv = 1.0 / l_safe
        logl = torch.log(l_safe)
        lse = torch.where(dead, float("-inf"), st["m"] + logl)
        dist = rel - acc[..., D + 1] * inv
        if not self.causal:
            dist = dist + 2.0 * st["corr"] * inv
        local, self_m, prev, first1, first4 = self._recomputed(qb, torch.where(dead, float("inf"), lse), i0, i1)
        ent = logl - st["E"] * inv
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

    # ---- statistics recomputed from the final LSE --------------------------------------------
    def _keep_at(self, i0: int, i1: int, cols: torch.Tensor) -> torch.Tensor:
        """keep ``[B, Hq, n, ...]`` for rows ``i0:i1`` and key indices ``cols [n, m]`` (clamped)."""
        qb = (torch.arange(i0, i1, device=cols.device) // self.bs)[:, None]
        return self.keep[:, :, qb, cols // self.bs]

    def _recomputed(
        self, qb: torch.Tensor, lse: torch.Tensor, i0: int, i1: int
    ) -> tuple[torch.Tensor, ...]:
        """local/self/prev/first1/first4 mass ``[B, Hkv, G, n]`` via ``exp(q·k - lse)``."""
        d, dev = self.d, qb.device
        B, Hkv, G, D, Nk = d.batch, d.heads_kv, d.group, d.head_dim, d.len_k
        n, p0 = i1 - i0, d.offset + i0
        pos = torch.arange(i0, i1, device=dev) + d.offset
        wl, nw = self.wl, self.wl + self.wr + 1
        u = torch.arange(nw, device=dev)
        jw = pos[:, None] - wl + u[None, :]  # [n, nw] key index of each window slot
        valid = ((jw >= 0) & (jw < Nk)).unsqueeze(0)
        if self.causal:
            valid = valid & (u <= wl)
        jc = jw.clamp(0, Nk - 1)
        if self.mask is not None:
            valid = valid & self.mask[:, jc]
        valid = valid.view(-1, 1, 1, n, nw)  # [B|1, 1, 1, n, nw]
        if self.keep is not None:
            valid = valid & self._keep_at(i0, i1, jc).view(B, Hkv, G, n, nw)
        q4 = qb.view(self.bh, G, n, D).transpose(1, 2)  # [Bh, n, G, D]
        lse4 = lse.view(self.bh, G, n).transpose(1, 2)  # [Bh, n, G]
        step = max(1, _WINDOW_ELEMENTS // max(1, self.bh * nw * D))
        parts = []
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            win = self.kpad[:, p0 + r0 : p0 + r1 - 1 + nw].unfold(1, nw, 1)  # [Bh, r, D, nw]
            logit = torch.matmul(q4[:, r0:r1], win)  # [Bh, r, G, nw]
            parts.append(torch.exp(logit - lse4[:, r0:r1].unsqueeze(-1)))
        a_w = torch.cat(parts, 1).view(B, Hkv, n, G, nw).transpose(2, 3)  # [B, Hkv, G, n, nw]
        a_w = torch.where(valid, a_w, torch.zeros((), device=dev))
        band = ((u - wl).abs() <= self.w).to(torch.float32)
        local = (a_w * band).sum(-1)
        self_m, prev = a_w[..., wl], a_w[..., wl - 1]

        nf = min(4, Nk)
        lf = torch.bmm(qb, self.kf[:, :nf].transpose(1, 2)) - lse.unsqueeze(-1)  # [Bh, G*n, nf]
        jf = torch.arange(nf, device=dev)
        vf = (jf[None, :] <= pos[:, None]) if self.causal else torch.ones(n, nf, dtype=torch.bool, device=dev)
        vf = vf.unsqueeze(0)
        if self.mask is not None:
            vf = vf & self.mask[:, None, :nf]
        vf = vf.view(-1, 1, 1, n, nf)
        if self.keep is not None:
            vf = vf & self._keep_at(i0, i1, jf.expand(n, nf)).view(B, Hkv, G, n, nf)
        a_f = torch.where(vf, torch.exp(lf).view(B, Hkv, G, n, nf), torch.zeros((), device=dev))
        return local, self_m, prev, a_f[..., 0], a_f.sum(-1)


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
    for i0 in range(0, dims.len_q, bq):
        fwd.run_block(i0, min(dims.len_q, i0 + bq))
    B, Hq, Nq = dims.batch, dims.heads_q, dims.len_q
    return AttentionStats(
        out=fwd.out.view(B, Hq, Nq, dims.head_dim),
        lse=fwd.lse.view(B, Hq, Nq),
        stats=stats_from_stacked(fwd.stats.view(len(STAT_NAMES), B, Hq, Nq)),
    )
