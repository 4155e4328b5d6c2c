"""Every docs/metrics.md §1 row statistic and the received mass in one pass, given the final LSE.

With ``lse`` known, each probability is exact where it is computed: ``p_ij = exp(t_ij)`` with
``t_ij = scale·q_i·k_j - lse_i`` (one matmul against ``[K | 1]`` with ``-lse`` appended to the
queries). One pass over query blocks × key tiles then accumulates, without storing the map:

* entropy ``H_i = -Σ_j p_ij t_ij``; max weight ``max_j p_ij``;
* mean distance from ``S = p @ (j - c)`` (``c`` = the block's last position, so the sums stay
  small): left of the row ``Σ p (p_i - j) = (p_i - c) L - S`` with ``L = Σ p``, right of it
  ``S - (p_i - c) L``; causal rows have ``L = 1`` (to rounding, times ``|p_i - c| < block_q``);
  bidirectional diagonal tiles multiply by ``|p_i - j|``;
* received mass ``c_j = Σ_i p_ij`` per head, accumulated per worker;
* window and first-key masses from the band recompute (:mod:`.window_stats`).

Per logit that is one matmul and an exp: no online-softmax rescaling and no ``P @ V``. After each
tile's matmul the sums come from the compiled C loop of :mod:`.cpu_fused` on the CPU (each ``p``
formed once, never written), or from torch ops elsewhere (exp, a ``ones @ p`` and a ``p @ (j - c)``
matmul, a row max and the entropy product). Tiles hold about 1.2M logits: smaller ones are no
faster on one thread and lose to per-op overhead on two. With ``lse`` from PyTorch's fused SDPA
kernel (:mod:`.sdpa_lse`) this is the fastest exact CPU path (the ``"sdpa_recompute"`` backend).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from . import cpu_fused, masks
from .chunked import EXP_FLOOR, _view, key_tiles
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
from .window_stats import WindowMasses, write_row_stats

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


@dataclass
class _Block:
    """Per-query-block values shared by its tiles."""

    n: int  # query rows per head
    live: torch.Tensor  # bool [B, Hkv, G, n]: rows that see a key
    all_live: bool
    jrel: torch.Tensor  # [Nk] j - c
    relrow: torch.Tensor  # [n] p_r - c
    ones: torch.Tensor | None = None  # [B*Hkv*G, 1, n] (torch path: column sums as a matmul)
    live_u8: torch.Tensor | None = None  # uint8 [B*Hkv*G*n] or None when all rows are live (C path)


class _RowSums:
    """Per-row accumulators ``[B*Hkv, G*n]`` of one query block."""

    def __init__(self, bh: int, rows: int, device: torch.device) -> None:
        def zeros() -> torch.Tensor:
            return torch.zeros(bh, rows, device=device)

        self.pmax, self.plogp = zeros(), zeros()  # max p; Σ p t (entropy = -Σ p t)
        self.moment_left, self.mass_left = zeros(), zeros()  # Σ p (j - c), Σ p over keys j <= p_i
        self.moment_right, self.mass_right = zeros(), zeros()  # the same over keys j > p_i (bidirectional)
        self.diag_dist = zeros()  # Σ p |p_i - j| on the bidirectional diagonal tile
        self.spare = zeros()  # row mass of that tile (not needed)


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
        self.fused = cpu_fused.tile_stats() if dev.type == "cpu" else None
        self.keymask = None if mask is None else mask.to(f32).contiguous()  # [B, Nk] for the C loop
        self.tile_elems = self.bh * G * block_q * max(block_k, block_q)
        self.stats = torch.empty(len(STAT_NAMES), B, Hkv, G, Nq, dtype=f32, device=dev)
        self._local = threading.local()
        self.columns: list[torch.Tensor] = []  # per-worker received-mass accumulators [B*Hkv*G, 1, Nk]
        self._lock = threading.Lock()

    def scratch_bytes(self) -> int:
        """Scratch memory of one worker: one or two tiles and a column accumulator."""
        tiles = 1 if self.fused else 2
        return 4 * (tiles * self.tile_elems + (self.bh * self.d.group * self.d.len_k if self.received else 0))

    def _scratch(self) -> threading.local:
        local = self._local
        if not hasattr(local, "tbuf"):
            dev = self.kaug.device
            local.tbuf = torch.empty(self.tile_elems, device=dev)
            local.pbuf = None if self.fused else torch.empty_like(local.tbuf)
            local.wbuf = torch.empty(max(self.bk, self.bq), device=dev)
            if self.received:
                local.col = torch.zeros(self.bh * self.d.group, 1, self.d.len_k, device=dev)
                with self._lock:
                    self.columns.append(local.col)
        return local

    def run_block(self, i0: int, i1: int) -> None:
        d, dev = self.d, self.kaug.device
        G, D = d.group, d.head_dim
        n, bh, rows = i1 - i0, self.bh, d.group * (i1 - i0)
        p0, p1 = d.offset + i0, d.offset + i1
        c = p1 - 1
        scratch = self._scratch()
        qb = (self.q5[:, :, :, i0:i1].to(torch.float32) * self.scale).reshape(bh, rows, D)
        lse_b = self.lse[..., i0:i1].reshape(bh, rows)
        qaug = torch.cat([qb, -lse_b.unsqueeze(-1)], dim=-1)  # q·k - lse in the matmul
        live = self.live[..., i0:i1]
        tiles = key_tiles(p0, p1, d.len_k, self.bk, self.causal)
        acc = _RowSums(bh, rows, dev)
        block = _Block(n=n, live=live, all_live=self.all_live or bool(live.all()),
                       jrel=self.jpos - c,  # j - c: small next to the positions, so the moments keep their precision
                       relrow=torch.arange(p0, p1, device=dev, dtype=torch.float32) - c)  # p_r - c
        if self.fused is None:
            clamps = self._clamps(qb, lse_b, tiles)
            block.ones = torch.ones(bh * G, 1, n, device=dev)
        else:
            clamps = [False] * len(tiles)  # the C loop clamps every logit itself
            block.live_u8 = None if block.all_live else live.to(torch.uint8).contiguous()
        for (j0, j1, kind), clamp in zip(tiles, clamps):
            t = torch.bmm(qaug, self.kaug[:, j0:j1].transpose(1, 2), out=_view(scratch.tbuf, (bh, rows, j1 - j0)))
            if self.fused is None:
                self._tile_torch(t, scratch, block, acc, j0, j1, kind, clamp)
            else:
                self._tile_fused(t, scratch, block, acc, j0, j1, kind)
        rel = block.relrow.repeat(G)  # per row of [bh, G*n]
        if self.causal:  # Σ p (p_i - j) = (p_i - c) Σp - Σ p (j - c), and Σp = 1 to rounding
            dist = rel - acc.moment_left
        else:  # left: (p_i - c) L - S; right: S - (p_i - c) L; diagonal: Σ p |p_i - j|
            dist = rel * (acc.mass_left - acc.mass_right) - acc.moment_left + acc.moment_right + acc.diag_dist
        self._finish(qb, lse_b, i0, i1, -acc.plogp, acc.pmax, dist)

    def _clamps(self, qb: torch.Tensor, lse_b: torch.Tensor, tiles: list[tuple[int, int, str]]) -> list[bool]:
        """Which tiles the torch path must clamp at EXP_FLOOR before exp.

        Cauchy-Schwarz: ``t_ij = s_ij - lse_i >= -|q_i| max_tile |k_j| - lse_i``; a tile whose bound
        stays above EXP_FLOOR needs no clamp (most tiles of real models: their logits are far from -80).
        """
        qnorm = torch.linalg.vector_norm(qb, dim=-1)  # [bh, rows]
        kmax = torch.stack([self.knorm[:, j0:j1].amax(-1) for j0, j1, _ in tiles], dim=-1)  # [bh, tiles]
        bound = (qnorm.unsqueeze(-1) * kmax.unsqueeze(1) + lse_b.unsqueeze(-1)).amax(dim=(0, 1))
        return (bound > -EXP_FLOOR).tolist()

    def _tile_torch(self, t: torch.Tensor, scratch: threading.local, block: _Block, acc: _RowSums,
                    j0: int, j1: int, kind: str, clamp: bool) -> None:
        """One tile in torch ops (any device): p = exp(t), masked, then the row and column sums."""
        d = self.d
        B, Hkv, G = d.batch, d.heads_kv, d.group
        n, bh, nk = block.n, self.bh, j1 - j0
        if clamp:
            t.clamp_(min=EXP_FLOOR)  # keeps exp on its fast path; exp(-80) vanishes next to any mass
        p = torch.exp(t, out=_view(scratch.pbuf, tuple(t.shape)))
        if kind == "diag" and self.causal:
            p.view(bh, G, n, nk).masked_fill_(self.future[:n, :nk], 0.0)
        if self.mask is not None and not bool(self.mask[:, j0:j1].all()):
            p.view(B, -1, nk).masked_fill_(~self.mask[:, None, j0:j1], 0.0)
        if not block.all_live:  # masked_fill, not a product: a dead row's t may overflow exp to inf
            p.view(B, Hkv, G, n, nk).masked_fill_(~block.live.unsqueeze(-1), 0.0)
        if self.received:
            scratch.col[:, :, j0:j1] += torch.bmm(block.ones, p.view(bh * G, n, nk))
        torch.maximum(acc.pmax, p.amax(-1), out=acc.pmax)
        if kind == "diag" and not self.causal:
            acc.diag_dist += (p.view(bh, G, n, nk) * self.absdiff[:n, :nk]).sum(-1).view_as(acc.diag_dist)
        elif kind == "right":
            acc.moment_right += torch.matmul(p, block.jrel[j0:j1])
            acc.mass_right += p.sum(-1)
        else:
            acc.moment_left += torch.matmul(p, block.jrel[j0:j1])
            if not self.causal:
                acc.mass_left += p.sum(-1)
        acc.plogp += t.mul_(p).sum(-1)

    def _tile_fused(self, t: torch.Tensor, scratch: threading.local, block: _Block, acc: _RowSums,
                    j0: int, j1: int, kind: str) -> None:
        """One tile in the compiled C loop (CPU): the same sums, one pass over the logits."""
        d = self.d
        absmode = kind == "diag" and not self.causal
        if absmode:
            moment, mass = acc.diag_dist, acc.spare
        elif kind == "right":
            moment, mass = acc.moment_right, acc.mass_right
        else:
            moment, mass = acc.moment_left, acc.mass_left
        keymask = None
        if self.keymask is not None and not bool(self.mask[:, j0:j1].all()):
            keymask = self.keymask.data_ptr() + 4 * j0
        col = scratch.col.data_ptr() + 4 * j0 if self.received else None
        self.fused(
            t.data_ptr(), self.bh * d.group, block.n, j1 - j0, block.jrel.data_ptr() + 4 * j0,
            block.relrow.data_ptr(), int(absmode), 1 if kind == "diag" and self.causal else -1,
            keymask, d.len_k, d.heads_kv * d.group, cpu_fused.ptr(block.live_u8),
            acc.pmax.data_ptr(), acc.plogp.data_ptr(), moment.data_ptr(), mass.data_ptr(),
            col, d.len_k, scratch.wbuf.data_ptr(),
        )

    def _finish(self, qb: torch.Tensor, lse_b: torch.Tensor, i0: int, i1: int, ent: torch.Tensor,
                pmax: torch.Tensor, dist: torch.Tensor) -> None:
        """Window masses and the final per-row values of rows ``i0:i1``."""
        d = self.d
        shape5 = (d.batch, d.heads_kv, d.group, i1 - i0)
        live = self.live[..., i0:i1]
        inf_dead = torch.where(live.reshape_as(lse_b), lse_b, float("inf"))
        write_row_stats(self.stats, self.window, qb, inf_dead, i0, i1, self.counts[..., i0:i1], live,
                        ent.view(shape5), pmax.view(shape5), dist.view(shape5))


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
    """All docs/metrics.md §1 row statistics (and received mass) from q, k and the final LSE, in one pass.

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
