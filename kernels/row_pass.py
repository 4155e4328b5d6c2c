"""Attention output, LSE, every docs/metrics.md §1 statistic and the received mass in one pass over
query blocks, on the CPU: the ``"row_pass"`` strategy of :func:`kernels.attention_with_stats`.

For a block of query rows (every head at once) the logits of the rows' whole visible key range
are one matmul, ``S = (scale·Q_b) K^T`` (``[B·Hkv, G·n, kend]``: at most 16M floats, never the
``[q, k]`` map). Holding whole rows, no online-softmax rescaling is needed: the compiled loop of
``csrc/row_softmax.c`` turns each row into ``e = exp(s - max)`` in place and returns its LSE,
``1/l``, the entropy, max weight and distance moment (and adds ``e/l`` to the received mass when
asked); then ``out = (e @ V) / l`` is a second matmul. Window and first-key masses come from the
band recompute (:mod:`.window_stats`) with the block's LSE. Asked with :class:`RowExtras`, the same
loop also gives the long-context rows (arg-max key, streaming mass, block-pooled mass) while the row
is in cache, so :func:`kernels.long_context.block_pass` need not recompute them.

Per logit that is two matmul terms and one exp, against three (the fused SDPA kernel's two and
the exact pass's one) plus a second exp when SDPA gives the output and the exact pass the
statistics; ``benchmarks/bench_long_context.py`` measures the difference.
"""

from __future__ import annotations

import threading

import torch

from . import cpu_fused, masks
from .long_context import BlockPass, RowExtras
from .parallel import run_blocks, worker_count
from .types import STAT_NAMES, AttentionStats, stats_from_stacked
from .validation import AttnDims
from .window_stats import WindowMasses, write_row_stats

_TILE_ELEMENTS = 16_000_000  # logits per block (64 MB): matmuls of fewer rows run at half speed on the CPU


def available(q: torch.Tensor) -> bool:
    """Whether this strategy can run here (CPU tensors and the compiled loop)."""
    return q.device.type == "cpu" and cpu_fused.row_softmax() is not None


def _block_rows(dims: AttnDims, multiple: int = 16) -> int:
    """Query rows per head in one block: a multiple of ``multiple`` (16, or the pooled-mass block size,
    so no two blocks add into one pooled row), about ``_TILE_ELEMENTS`` logits, at most 512 when it can."""
    rows = _TILE_ELEMENTS // (dims.batch * dims.heads_q * dims.len_k)
    rows = max(16, min(512, rows // 16 * 16))
    return min(dims.len_q, -(-rows // multiple) * multiple)


class _RowPass:
    """State shared by the query blocks of one call."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: AttnDims, causal: bool,
                 mask: torch.Tensor | None, scale: float, local_window: int, received: bool, block_q: int,
                 extras: RowExtras | None) -> None:
        f32, dev = torch.float32, q.device
        B, Hkv, G, Nq, Nk, D = dims.batch, dims.heads_kv, dims.group, dims.len_q, dims.len_k, dims.head_dim
        self.d, self.causal, self.mask, self.scale, self.received, self.bq = dims, causal, mask, scale, received, block_q
        self.bh = B * Hkv
        self.q5 = q.reshape(B, Hkv, G, Nq, D)
        self.kf = k.reshape(self.bh, Nk, D).to(f32)
        self.vf = v.reshape(self.bh, Nk, D).to(f32)
        self.window = WindowMasses(self.kf, dims, causal, mask, None, 1, local_window)
        self.counts = masks.visible_counts(dims, causal, mask, dev).view(B, 1, 1, Nq)
        self.live = (self.counts > 0).expand(B, Hkv, G, Nq)
        self.all_live = bool(self.live.all())
        self.keymask = None if mask is None or bool(mask.all()) else mask.to(f32).contiguous()
        self.jpos = torch.arange(Nk, dtype=f32, device=dev)
        self.fn = cpu_fused.row_softmax()
        self.out = torch.empty(B, Hkv, G, Nq, D, dtype=q.dtype, device=dev)
        self.lse = torch.empty(B, Hkv, G, Nq, dtype=f32, device=dev)
        self.stats = torch.empty(len(STAT_NAMES), B, Hkv, G, Nq, dtype=f32, device=dev)
        self.columns: list[torch.Tensor] = []  # per-worker received-mass accumulators [B*Hkv*G, Nk]
        self.extras = extras
        self.block_mass: torch.Tensor | None = None  # [B*Hkv*G, nqb, nkb] pooled mass when asked for
        self.nb = 0
        if extras is not None:
            self.argmax = torch.empty(B, Hkv, G, Nq, dtype=torch.int64, device=dev)
            self.streaming = torch.empty(B, Hkv, G, Nq, dtype=f32, device=dev)
            bs = extras.block_size
            if bs:
                self.nb = -(-Nk // bs)
                self.block_mass = torch.zeros(B * Hkv * G, self.nb, self.nb, dtype=f32, device=dev)
        self._local = threading.local()
        self._lock = threading.Lock()

    def scratch_bytes(self) -> int:
        d = self.d
        return 4 * self.bh * d.group * (self.bq * d.len_k + (d.len_k if self.received else 0))

    def _scratch(self) -> threading.local:
        local = self._local
        if not hasattr(local, "sbuf"):
            d = self.d
            local.sbuf = torch.empty(self.bh * d.group * self.bq * d.len_k)
            if self.received:
                local.col = torch.zeros(self.bh * d.group, d.len_k)
                with self._lock:
                    self.columns.append(local.col)
        return local

    def run_block(self, i0: int, i1: int) -> None:
        d = self.d
        B, Hkv, G, D = d.batch, d.heads_kv, d.group, d.head_dim
        n, bh, rows = i1 - i0, self.bh, d.group * (i1 - i0)
        p0 = d.offset + i0
        kend = min(d.len_k, p0 + n) if self.causal else d.len_k
        scratch = self._scratch()
        qb = (self.q5[:, :, :, i0:i1].to(torch.float32) * self.scale).reshape(bh, rows, D)
        s = scratch.sbuf[: bh * rows * kend].view(bh, rows, kend)
        torch.bmm(qb, self.kf[:, :kend].transpose(1, 2), out=s)
        live = None if self.all_live else self.live[..., i0:i1].to(torch.uint8).contiguous()
        sums = torch.empty(6, bh * rows)  # lse, 1/l, max weight, entropy, distance moment, streaming mass
        ex = self.extras
        amax = torch.empty(bh * rows, dtype=torch.int64) if ex is not None else None
        bmass = self.block_mass
        self.fn(s.data_ptr(), bh * G, n, kend, p0 + 1 if self.causal else -1,
                None if self.keymask is None else self.keymask.data_ptr(), d.len_k, Hkv * G,
                cpu_fused.ptr(live), self.jpos.data_ptr(), float(p0), int(not self.causal),
                *(sums[i].data_ptr() for i in range(5)),
                scratch.col.data_ptr() if self.received else None, d.len_k,
                None if amax is None else amax.data_ptr(), sums[5].data_ptr(), ex.sinks if ex else 0,
                ex.window if ex else 0, None if bmass is None else bmass.data_ptr(),
                ex.block_size if bmass is not None else 1, i0 // ex.block_size if bmass is not None else 0,
                self.nb, self.nb)
        lse, inv_l, pmax, ent, dist, streaming = sums.view(6, bh, rows).unbind(0)
        out = torch.bmm(s, self.vf[:, :kend]).mul_(inv_l.unsqueeze(-1))  # [bh, G*n, D]; dead rows: 0
        shape5 = (B, Hkv, G, n)
        self.out[:, :, :, i0:i1] = out.view(*shape5, D)
        self.lse[..., i0:i1] = lse.view(shape5)
        if amax is not None:
            self.argmax[..., i0:i1] = amax.view(shape5)
            self.streaming[..., i0:i1] = streaming.view(shape5)
        write_row_stats(self.stats, self.window, qb, torch.where(torch.isfinite(lse), lse, float("inf")), i0, i1,
                        self.counts[..., i0:i1], self.live[..., i0:i1], ent.view(shape5), pmax.view(shape5),
                        dist.view(shape5))


@torch.no_grad()
def row_pass_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: AttnDims, causal: bool,
                       mask: torch.Tensor | None, scale: float, local_window: int, received: bool,
                       block_q: int | None = None, extras: RowExtras | None = None) -> AttentionStats:
    """``AttentionStats`` for validated CPU inputs (see :func:`kernels.attention_with_stats`).

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]``; mask: bool ``[B, Nk]`` or None.
        block_q: query rows per head in one block (default: about 16M logits a block).
        extras: also the long-context rows (``result.rows``, see :class:`RowExtras`); needs ``Nq == Nk``.
    Returns:
        out ``[B, Hq, Nq, D]`` (input dtype), lse ``[B, Hq, Nq]`` fp32 (``-inf`` on rows that see no
        key), the §1 statistics and, when ``received``, ``c`` and ``ĉ`` ``[B, Hq, Nk]``.
    """
    multiple = extras.block_size if extras is not None and extras.block_size else 1
    if extras is not None and dims.offset:
        raise ValueError("the long-context rows need one query row per key (Nq == Nk); drop row_extras")
    bq = _block_rows(dims, max(16, multiple)) if block_q is None else min(dims.len_q, block_q)
    if bq % multiple and bq < dims.len_q:
        raise ValueError(f"block_q={block_q} must be a multiple of the pooled-mass block size {multiple}")
    run = _RowPass(q, k, v, dims, causal, mask, scale, local_window, received, bq, extras)
    starts = list(range(0, dims.len_q, bq))[::-1]  # causal: the costliest (last) blocks first
    run_blocks(lambda i0: run.run_block(i0, min(dims.len_q, i0 + bq)), starts,
               worker_count(q.device, len(starts), run.scratch_bytes()))
    B, Hq, Nq, Nk = dims.batch, dims.heads_q, dims.len_q, dims.len_k
    result = AttentionStats(out=run.out.view(B, Hq, Nq, dims.head_dim), lse=run.lse.view(B, Hq, Nq),
                            stats=stats_from_stacked(run.stats.view(len(STAT_NAMES), B, Hq, Nq)))
    if received:
        col = (torch.stack(run.columns).sum(0) if len(run.columns) > 1 else run.columns[0]).view(B, Hq, Nk)
        counts = masks.receiver_counts(dims, causal, mask, q.device).unsqueeze(1)
        result.received = col
        result.received_normalized = torch.where(counts > 0, col / counts.clamp(min=1.0), 0.0)
    if extras is not None:
        pmax = result.stats["max_weight"]
        mass = None if run.block_mass is None else run.block_mass.view(B, Hq, run.nb, run.nb)
        result.rows = BlockPass(argmax=run.argmax.view(B, Hq, Nq), argmax_prob=pmax.clone(),
                                streaming=run.streaming.view(B, Hq, Nq), block_mass=mass)
    return result
