"""Window and first-key masses recomputed from the final LSE (torch, any device).

``local_mass``, ``self_mass``, ``prev_token_mass``, ``first1_mass`` and ``first4_mass`` (docs/metrics.md §1)
need only the keys within ``w`` of each row and the first four keys, so they are recomputed as
``exp(q_i·k_j - lse_i)`` at those keys once a row's LSE is final: a narrow band matmul read along
its diagonal plus one ``[rows, 4]`` matmul. Shared by the one-pass chunked forward and the exact pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import STAT_NAMES
from .validation import AttnDims

_WINDOW_ELEMENTS = 4_000_000  # cap on the logits of one band matmul


class WindowMasses:
    """Band masses for query blocks of one attention call.

    Args:
        kf: fp32 keys ``[B*Hkv, Nk, D]``.
        dims, causal, mask: the call's validated shape, causality and key padding mask ``[B, Nk]``.
        keep, block_size: optional block-sparse layout ``[B, Hq, nqb, nkb]`` (dropped keys count 0).
        local_window: ``w`` of ``local_mass = Σ_{|p_i-j|<=w} A_ij``.
    """

    def __init__(self, kf: torch.Tensor, dims: AttnDims, causal: bool, mask: torch.Tensor | None,
                 keep: torch.Tensor | None, block_size: int, local_window: int) -> None:
        self.d, self.causal, self.mask, self.keep, self.bs, self.w = dims, causal, mask, keep, block_size, local_window
        self.bh = dims.batch * dims.heads_kv
        self.kf = kf
        Nk = dims.len_k
        self.wl = min(max(local_window, 1), Nk)  # the window reaches back at least to the previous token
        self.wr = 0 if causal else min(local_window, Nk)
        self.kpad = F.pad(kf, (0, 0, self.wl, self.wr))

    def _keep_at(self, i0: int, i1: int, cols: torch.Tensor) -> torch.Tensor:
        """keep ``[B, Hq, n, ...]`` for rows ``i0:i1`` and key indices ``cols [n, m]`` (clamped)."""
        qb = (torch.arange(i0, i1, device=cols.device) // self.bs)[:, None]
        return self.keep[:, :, qb, cols // self.bs]

    def _band_logits(self, qb: torch.Tensor, lse: torch.Tensor, p0: int, n: int) -> torch.Tensor:
        """``q_i·k_j - lse_i`` for the window keys ``j = p_i - wl + u``, ``[B*Hkv, G, n, nw]``.

        One matmul per row chunk against the contiguous key band; the window entries are the
        band's shifted diagonal, read through a strided view (no gather).
        """
        G, D = self.d.group, self.d.head_dim
        wl, wr = self.wl, self.wr
        nw = wl + wr + 1
        q4 = qb.view(self.bh, G, n, D)
        lse4 = lse.view(self.bh, G, n, 1)
        # rows per matmul: the band of r rows spans r + wl + wr keys, so short row chunks waste less
        step = max(64, 2 * (wl + wr))
        step = max(1, min(n, step, _WINDOW_ELEMENTS // max(1, self.bh * G * (step + wl + wr))))
        parts = []
        for r0 in range(0, n, step):
            r = min(n, r0 + step) - r0
            width = r + wl + wr
            keys = self.kpad[:, p0 + r0 : p0 + r0 + width]  # padded index of key j is j + wl
            rows = q4[:, :, r0 : r0 + r].reshape(self.bh, G * r, D)
            band = torch.bmm(rows, keys.transpose(1, 2))  # [Bh, G*r, width]
            diag = band.as_strided((self.bh, G, r, nw), (G * r * width, r * width, width + 1, 1))
            parts.append(diag - lse4[:, :, r0 : r0 + r])
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def __call__(self, qb: torch.Tensor, lse: torch.Tensor, i0: int, i1: int) -> tuple[torch.Tensor, ...]:
        """``(local, self, prev, first1, first4)`` masses, each ``[B, Hkv, G, n]``.

        Args:
            qb: scaled fp32 queries of rows ``i0:i1``, ``[B*Hkv, G*n, D]`` (head-major within a kv head).
            lse: their LSE ``[B*Hkv, G*n]``, ``+inf`` for rows that see no key (their masses are 0).
        """
        d, dev = self.d, qb.device
        B, Hkv, G, Nk = d.batch, d.heads_kv, d.group, d.len_k
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
        a_w = torch.exp(self._band_logits(qb, lse, p0, n)).view(B, Hkv, G, n, nw)
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


def write_row_stats(stats: torch.Tensor, window: WindowMasses, qb: torch.Tensor, lse: torch.Tensor, i0: int, i1: int,
                    counts: torch.Tensor, live: torch.Tensor, ent: torch.Tensor, pmax: torch.Tensor,
                    dist: torch.Tensor) -> None:
    """Write every docs/metrics.md §1 statistic of rows ``i0:i1`` into ``stats``.

    Args:
        stats: ``[len(STAT_NAMES), B, Hkv, G, Nq]`` output (rows that see no key get 0).
        window, qb, lse: the band recompute, the rows' scaled queries ``[B*Hkv, G*n, D]`` and
            their LSE ``[B*Hkv, G*n]`` (``+inf`` on rows that see no key).
        counts: visible keys per row ``[B, 1, 1, n]``; live: ``[B, Hkv, G, n]`` rows that see a key.
        ent, pmax, dist: the rows' entropy, max weight and mean distance, ``[B, Hkv, G, n]``.
    """
    local, self_m, prev, first1, first4 = window(qb, lse, i0, i1)
    zero = torch.zeros((), device=qb.device)
    values = {
        "entropy": ent,
        "entropy_normalized": torch.where(counts > 1, ent / torch.log(counts.clamp(min=2.0)), zero),
        "max_weight": pmax,
        "first1_mass": first1,
        "first4_mass": first4,
        "prev_token_mass": prev,
        "self_mass": self_m,
        "local_mass": local,
        "mean_distance": dist,
    }
    for idx, name in enumerate(STAT_NAMES):
        stats[idx, ..., i0:i1] = torch.where(live, values[name], zero)
