"""Every METRICS §1 row statistic and the received mass in one pass, given the final LSE (torch).

With ``lse`` known, each probability is exact where it is computed: ``p_ij = exp(t_ij)`` with
``t_ij = scale·q_i·k_j - lse_i`` (one matmul against ``[K | 1]`` with ``-lse`` appended to the
queries). One pass over query blocks × key tiles then accumulates, without storing the map:

* entropy ``H_i = -Σ_j p_ij t_ij``; max weight ``max_j p_ij``;
* mean distance from ``S = p @ (j - c)`` (``c`` = the block's last position, so the sums stay
  small): left of the row ``Σ p (p_i - j) = (p_i - c) L - S`` with ``L = Σ p``, right of it
  ``S - (p_i - c) L``; causal rows have ``L = 1`` (to rounding, times ``|p_i - c| < block_q``);
  bidirectional diagonal tiles multiply by ``|p_i - j|``;
* received mass ``c_j = Σ_i p_ij`` (a ``ones @ p`` per head, accumulated per worker);
* window and first-key masses from the band recompute (:mod:`.window_stats`).

Per logit that is one matmul, an exp, two matrix-vector products, a row max and the entropy
product: no online-softmax rescaling and no ``P @ V``. Tiles hold about 1.2M logits: smaller ones
are no faster on one thread and lose to per-op overhead on two. With ``lse`` from PyTorch's fused SDPA kernel
(:mod:`.sdpa_lse`) this is the fastest exact CPU path (the ``"sdpa_recompute"`` backend).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from . import masks
from .chunked import EXP_FLOOR, _chunks, _view
from .parallel import run_blocks, worker_count
from .types import STAT_NAMES, stats_from_stacked
from .validation import (
    AttnDims,
    check_block,
    check_int,
    check_key_padding_mask,
    check_lse,
    check_qk,
    resolve_scale,
)
from .window_stats import WindowMasses

_TILE_ELEMENTS = 1_200_000  # logits per tile: large enough that two threads are not held back by per-op overhead


@dataclass
class ExactStats:
    """Result of :func:`exact_stats`.

    Attributes:
        stats: ``{name: [B, Hq, Nq]}`` fp32 for every name in ``STAT_NAMES`` (0 for rows that see no key).
        received, received_normalized: ``[B, Hq, Nk]`` fp32 (``c`` and ``ĉ``), or None when not asked for.
    """

    stats: dict[str, torch.Tensor]
    received: torch.Tensor | None
    received_normalized: torch.Tensor | None


def _blocks(dims: AttnDims, block_q: int | None, block_k: int | None) -> tuple[int, int]:
    """(query rows per head, keys) per tile: about ``_TILE_ELEMENTS`` logits a tile."""
    bk = 1024 if block_k is None else check_block(block_k, "block_k")
    if block_q is None:
        rows = max(1, _TILE_ELEMENTS // (dims.batch * dims.heads_kv * dims.group * bk))
        bq = 1 << (max(16, min(512, rows)).bit_length() - 1)
    else:
        bq = check_block(block_q, "block_q")
    return min(bq, dims.len_q), bk


class _Pass:
    """State shared by the query blocks of one exact pass."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, dims: AttnDims, causal: bool,
                 mask: torch.Tensor | None, scale: float, local_window: int, received: bool,
                 block_q: int, block_k: int) -> None:
        f32, dev = torch.float32, q.device
        B, Hkv, G, Nq, Nk, D = dims.batch, dims.heads_kv, dims.group, dims.len_q, dims.len_k, dims.head_dim
        self.d, self.causal, self.mask, self.scale, self.received = dims, causal, mask, scale, received
        self.bq, self.bk, self.bh = block_q, block_k, B * Hkv
        self.q5 = q.reshape(B, Hkv, G, Nq, D)
        kf = k.reshape(self.bh, Nk, D).to(f32)
        self.kaug = torch.cat([kf, torch.ones(self.bh, Nk, 1, dtype=f32, device=dev)], dim=-1)  # [K | 1]
        self.window = WindowMasses(kf, dims, causal, mask, None, 1, local_window)
        self.counts = masks.visible_counts(dims, causal, mask, dev).view(B, 1, 1, Nq)
        lse5 = lse.to(f32).reshape(B, Hkv, G, Nq)
        self.live = (self.counts > 0) & torch.isfinite(lse5)  # rows that see at least one key
        self.lse = torch.where(self.live, lse5, 0.0)  # dead rows: any finite value, their p is zeroed
        self.all_live = bool(self.live.all())
        self.jpos = torch.arange(Nk, dtype=f32, device=dev)
        ar = torch.arange(block_q, device=dev)
        self.future = ar[None, :] > ar[:, None]  # diagonal tile: key after query
        self.absdiff = (ar[None, :] - ar[:, None]).abs().to(f32)
        self.knorm = torch.linalg.vector_norm(kf, dim=-1)  # [B*Hkv, Nk], for the exp-underflow bound
        self.tile_elems = self.bh * G * block_q * max(block_k, block_q)
        self.stats = torch.empty(len(STAT_NAMES), B, Hkv, G, Nq, dtype=f32, device=dev)
        self._local = threading.local()
        self.columns: list[torch.Tensor] = []  # per-worker received-mass accumulators [B*Hkv*G, 1, Nk]
        self._lock = threading.Lock()

    def scratch_bytes(self) -> int:
        """Scratch memory of one worker: two tiles and a column accumulator."""
        return 4 * (2 * self.tile_elems + (self.bh * self.d.group * self.d.len_k if self.received else 0))

    def _scratch(self) -> threading.local:
        local = self._local
        if not hasattr(local, "tbuf"):
            local.tbuf = torch.empty(self.tile_elems, device=self.kaug.device)
            local.pbuf = torch.empty_like(local.tbuf)
            if self.received:
                local.col = torch.zeros(self.bh * self.d.group, 1, self.d.len_k, device=self.kaug.device)
                with self._lock:
                    self.columns.append(local.col)
        return local

    def _tiles(self, p0: int, p1: int) -> list[tuple[int, int, str]]:
        tiles = [(a, b, "left") for a, b in _chunks(0, p0, self.bk)]
        tiles.append((p0, p1, "diag"))
        if not self.causal:
            tiles += [(a, b, "right") for a, b in _chunks(p1, self.d.len_k, self.bk)]
        return tiles

    def run_block(self, i0: int, i1: int) -> None:
        d, dev = self.d, self.kaug.device
        B, Hkv, G, D = d.batch, d.heads_kv, d.group, d.head_dim
        n, bh, rows = i1 - i0, self.bh, d.group * (i1 - i0)
        p0, p1 = d.offset + i0, d.offset + i1
        c = p1 - 1
        scratch = self._scratch()
        qb = (self.q5[:, :, :, i0:i1].to(torch.float32) * self.scale).reshape(bh, rows, D)
        lse_b = self.lse[..., i0:i1].reshape(bh, rows)
        qaug = torch.cat([qb, -lse_b.unsqueeze(-1)], dim=-1)  # q·k - lse in the matmul
        live = self.live[..., i0:i1]
        all_live = self.all_live or bool(live.all())
        tiles = self._tiles(p0, p1)
        # Cauchy-Schwarz: t_ij = s_ij - lse_i >= -|q_i| max_tile |k_j| - lse_i; a tile whose bound stays
        # above EXP_FLOOR needs no clamp (most tiles of real models: their logits are far from -80)
        qnorm = torch.linalg.vector_norm(qb, dim=-1)  # [bh, rows]
        kmax = torch.stack([self.knorm[:, j0:j1].amax(-1) for j0, j1, _ in tiles], dim=-1)  # [bh, tiles]
        bound = (qnorm.unsqueeze(-1) * kmax.unsqueeze(1) + lse_b.unsqueeze(-1)).amax(dim=(0, 1))
        may_underflow = (bound > -EXP_FLOOR).tolist()
        jrel = self.jpos - c  # j - c: small next to the positions, so the moments keep their precision
        ones = torch.ones(bh * G, 1, n, device=dev)
        ent = torch.zeros(bh, rows, device=dev)
        pmax = torch.zeros(bh, rows, device=dev)
        moment = torch.zeros(bh, rows, device=dev)  # Σ p (j - c) left of / at the row
        right_moment = torch.zeros(bh, rows, device=dev) if not self.causal else None
        mass = torch.zeros(bh, rows, device=dev) if not self.causal else None  # Σ p left, minus right
        diag_dist = None
        for (j0, j1, kind), clamp in zip(tiles, may_underflow):
            nk = j1 - j0
            t = torch.bmm(qaug, self.kaug[:, j0:j1].transpose(1, 2), out=_view(scratch.tbuf, (bh, rows, nk)))
            if clamp:
                t.clamp_(min=EXP_FLOOR)  # keeps exp on its fast path; exp(-80) vanishes next to any mass
            p = torch.exp(t, out=_view(scratch.pbuf, (bh, rows, nk)))
            if kind == "diag" and self.causal:
                p.view(bh, G, n, nk).masked_fill_(self.future[:n, :nk], 0.0)
            if self.mask is not None and not bool(self.mask[:, j0:j1].all()):
                p.view(B, -1, nk).masked_fill_(~self.mask[:, None, j0:j1], 0.0)
            if not all_live:  # masked_fill, not a product: a dead row's t may overflow exp to inf
                p.view(B, Hkv, G, n, nk).masked_fill_(~live.unsqueeze(-1), 0.0)
            if self.received:
                scratch.col[:, :, j0:j1] += torch.bmm(ones, p.view(bh * G, n, nk))
            torch.maximum(pmax, p.amax(-1), out=pmax)
            if kind == "diag" and not self.causal:
                diag_dist = (p.view(bh, G, n, nk) * self.absdiff[:n, :nk]).sum(-1).view(bh, rows)
            elif kind == "right":
                right_moment += torch.matmul(p, jrel[j0:j1])
                mass -= p.sum(-1)
            else:
                moment += torch.matmul(p, jrel[j0:j1])
                if mass is not None:
                    mass += p.sum(-1)
            ent -= t.mul_(p).sum(-1)
        rel = (torch.arange(p0, p1, device=dev, dtype=torch.float32) - c).repeat(G)  # p_i - c per row
        if self.causal:  # Σ p (p_i - j) = (p_i - c) Σp - Σ p (j - c), and Σp = 1 to rounding
            dist = rel - moment
        else:  # left: (p_i - c) L - S; right: S - (p_i - c) L; diagonal: Σ p |p_i - j|
            dist = rel * mass - moment + right_moment + diag_dist
        self._finish(qb, lse_b, i0, i1, ent, pmax, dist)

    def _finish(self, qb: torch.Tensor, lse_b: torch.Tensor, i0: int, i1: int, ent: torch.Tensor,
                pmax: torch.Tensor, dist: torch.Tensor) -> None:
        """Window masses and the final per-row values of rows ``i0:i1``."""
        d = self.d
        shape5 = (d.batch, d.heads_kv, d.group, i1 - i0)
        live = self.live[..., i0:i1]
        inf_dead = torch.where(live.reshape_as(lse_b), lse_b, float("inf"))
        local, self_m, prev, first1, first4 = self.window(qb, inf_dead, i0, i1)
        cnt = self.counts[..., i0:i1]
        zero = torch.zeros((), device=qb.device)
        ent5 = ent.view(shape5)
        values = {
            "entropy": ent5,
            "entropy_normalized": torch.where(cnt > 1, ent5 / torch.log(cnt.clamp(min=2.0)), zero),
            "max_weight": pmax.view(shape5),
            "first1_mass": first1,
            "first4_mass": first4,
            "prev_token_mass": prev,
            "self_mass": self_m,
            "local_mass": local,
            "mean_distance": dist.view(shape5),
        }
        for idx, name in enumerate(STAT_NAMES):
            self.stats[idx, ..., i0:i1] = torch.where(live, values[name], zero)


@torch.no_grad()
def exact_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    local_window: int = 8,
    received: bool = True,
    block_q: int | None = None,
    block_k: int | None = None,
) -> ExactStats:
    """All METRICS §1 row statistics (and received mass) from q, k and the final LSE, in one pass.

    Args:
        q: ``[B, Hq, Nq, D]``; k: ``[B, Hkv, Nk, D]``; lse: ``[B, Hq, Nq]`` from a forward on the
            same inputs (any backend, or PyTorch's fused SDPA kernel).
        received: also return the received mass ``c``, ``ĉ`` ``[B, Hq, Nk]``.
        block_q / block_k: query rows per head / keys per tile (default about 1.2M logits a tile).
    """
    dims = check_qk(q, k)
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    lse = check_lse(lse, dims, q.device)
    scale = resolve_scale(scale, dims.head_dim)
    local_window = check_int(local_window, "local_window", low=0)
    bq, bk = _blocks(dims, block_q, block_k)
    run = _Pass(q, k, lse, dims, causal, mask, scale, local_window, bool(received), bq, bk)
    starts = list(range(0, dims.len_q, bq))[::-1]  # causal: the costliest (last) blocks first
    run_blocks(lambda i0: run.run_block(i0, min(dims.len_q, i0 + bq)), starts,
               worker_count(q.device, len(starts), run.scratch_bytes()))
    B, Hq, Nq, Nk = dims.batch, dims.heads_q, dims.len_q, dims.len_k
    stats = stats_from_stacked(run.stats.view(len(STAT_NAMES), B, Hq, Nq))
    if not received:
        return ExactStats(stats, None, None)
    col = torch.stack(run.columns).sum(0) if len(run.columns) > 1 else run.columns[0]
    col = col.view(B, Hq, Nk)
    counts = masks.receiver_counts(dims, causal, mask, q.device).unsqueeze(1)
    return ExactStats(stats, col, torch.where(counts > 0, col / counts.clamp(min=1.0), torch.zeros((), device=q.device)))
