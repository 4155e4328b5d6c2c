"""Long-context head statistics from q, k and the saved LSE, one sample at a time, never storing the map.

One streaming pass over (query block x key tile) recomputes ``p_ij = exp(scale·q_i·k_j - lse_i)``
exactly (docs/metrics.md §8) and accumulates, per query head:

* the per-row arg-max key ``argmax_j p_ij`` and its probability (first index on ties, as
  ``torch.argmax``), for the retrieval score (docs/metrics.md §10);
* the streaming mass ``Σ p_ij`` over the first ``sinks`` keys plus the last ``window`` keys of the
  row (``p_i - window < j <= p_i``), counted once where they overlap;
* the block-pooled mass ``M[t, u] = Σ_{i in query block t, j in key block u} p_ij`` with blocks
  of ``block_size`` rows / keys (``[Hq, ceil(N/B), ceil(N/B)]``: 2.4M floats for 9 heads at 32k).

Only the per-row values and the pooled mass are kept; each tile of about 2.4M logits is dropped
after use. :func:`block_density`, :func:`antidiagonal_block_scores` and :func:`threshold_select`
turn the pooled mass and the cheap block scorers into the sparsity metrics.

Inputs are one sample without padding (the caller slices each right-padded sample to its real
length): ``q [Hq, N, D]``, ``k [Hkv, N, D]`` (GQA: ``Hq % Hkv == 0``), ``lse [Hq, N]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .parallel import run_blocks, worker_count
from .validation import check_block, check_int, resolve_scale

_TILE_ELEMENTS = 2_400_000  # logits per tile (about 10 MB fp32)


@dataclass(frozen=True)
class RowExtras:
    """Ask :func:`kernels.attention_with_stats` for the long-context rows in the same pass (row_pass
    backend): the arg-max key, the streaming mass (first ``sinks`` keys plus the row's last
    ``window``) and, when ``block_size`` is set, the block-pooled mass with blocks of that size.
    They come back as ``AttentionStats.rows``, a :class:`BlockPass` with a leading batch axis."""

    sinks: int = 4
    window: int = 256
    block_size: int | None = 64


@dataclass
class BlockPass:
    """Result of :func:`block_pass` (one sample).

    Shapes are per sample; ``AttentionStats.rows`` (:class:`RowExtras`) adds a leading batch axis.

    Attributes:
        argmax: int64 ``[Hq, N]`` key index of each row's largest probability (-1 for a row that sees no key).
        argmax_prob: fp32 ``[Hq, N]`` that probability.
        streaming: fp32 ``[Hq, N]`` mass on the first ``sinks`` keys plus the row's last ``window`` keys.
        block_mass: fp32 ``[Hq, nqb, nkb]`` block-pooled mass, or None when not asked for.
    """

    argmax: torch.Tensor
    argmax_prob: torch.Tensor
    streaming: torch.Tensor
    block_mass: torch.Tensor | None


def _check_sample(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor) -> tuple[int, int, int, int]:
    """``(Hq, Hkv, N, D)`` of a one-sample ``q [Hq, N, D]``, ``k [Hkv, N, D]``, ``lse [Hq, N]``."""
    if not all(isinstance(x, torch.Tensor) for x in (q, k, lse)):
        raise TypeError("q, k and lse must be tensors")
    if q.ndim != 3 or k.ndim != 3 or lse.ndim != 2:
        raise ValueError(f"expected q [Hq, N, D], k [Hkv, N, D], lse [Hq, N]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(lse.shape)}")
    hq, n, d = q.shape
    hkv = k.shape[0]
    if k.shape[1:] != (n, d) or hq % hkv or tuple(lse.shape) != (hq, n):
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, lse {tuple(lse.shape)} "
                         "(need the same N and D, and Hq a multiple of Hkv)")
    return hq, hkv, n, d


def _pool(p: torch.Tensor, bs: int) -> torch.Tensor:
    """Sum ``[H, n, nk]`` over ``bs x bs`` cells -> ``[H, ceil(n/bs), ceil(nk/bs)]`` (zero-padded at the end)."""
    h, n, nk = p.shape
    nb, kb = -(-n // bs), -(-nk // bs)
    if n % bs or nk % bs:
        p = F.pad(p, (0, kb * bs - nk, 0, nb * bs - n))
    rows = p.view(h * nb, bs, kb * bs).sum(1)  # sum the rows of each query block first (contiguous)
    return rows.view(h, nb, kb, bs).sum(-1)


def _streaming(out: torch.Tensor, p: torch.Tensor, ipos: torch.Tensor, j0: int, j1: int, sinks: int,
               window: int) -> None:
    """Add a tile's mass on the streaming keys to ``out [H, rows]``: keys ``j < sinks`` plus
    ``i - window < j <= i`` (each key once); only the columns that can hold such keys are read."""
    if j0 < sinks:
        out += p[..., : min(sinks, j1) - j0].sum(-1)
    i0, i1 = int(ipos[0, 0]), int(ipos[-1, 0]) + 1
    c0, c1 = max(j0, sinks, i0 - window + 1), min(j1, i1)
    if window == 0 or c0 >= c1:
        return
    jpos = torch.arange(c0, c1, device=p.device)[None, :]
    near = (ipos - jpos < window) & (jpos <= ipos)
    out += (p[..., c0 - j0 : c1 - j0] * near).sum(-1)


@torch.no_grad()
def block_pass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, causal: bool = True,
               scale: float | None = None, block_size: int = 64, blocks: bool = True, sinks: int = 4,
               window: int = 256, block_q: int | None = None, block_k: int | None = None) -> BlockPass:
    """Arg-max key, streaming mass and (optionally) block-pooled mass of one sample (module docstring).

    Args:
        q: ``[Hq, N, D]``; k: ``[Hkv, N, D]``; lse: ``[Hq, N]`` fp32 from the forward on the same
            q, k and scale (``-inf`` marks a row that sees no key).
        causal: row ``i`` sees keys ``j <= i``; else every key.
        block_size: ``B`` of the pooled mass (query and key blocks).
        blocks: also return the pooled mass.
        sinks / window: the streaming-mass keys (first ``sinks``, last ``window`` of each row).
        block_q / block_k: rows / keys per tile (multiples of ``block_size``; default about 2.4M logits a tile).
    """
    hq, hkv, n, d = _check_sample(q, k, lse)
    bs = check_block(block_size, "block_size")
    sinks = check_int(sinks, "sinks", low=0)
    window = check_int(window, "window", low=0)
    scale = resolve_scale(scale, d)
    g = hq // hkv
    bk = bs * max(1, (block_k or 1024) // bs)
    if block_q is None:
        bq = bs * max(1, _TILE_ELEMENTS // (hq * min(bk, n) * bs))
    else:
        bq = bs * max(1, block_q // bs)
    dev, f32 = q.device, torch.float32
    kf = k.to(f32)
    lse = lse.to(f32)
    live = torch.isfinite(lse)
    lse_safe = torch.where(live, lse, 0.0)
    best = torch.full((hq, n), float("-inf"), device=dev)
    arg = torch.full((hq, n), -1, dtype=torch.int64, device=dev)
    stream = torch.zeros(hq, n, device=dev)
    nb = -(-n // bs)
    mass = torch.zeros(hq, nb, nb, device=dev) if blocks else None
    all_live = bool(live.all())

    def query_block(i0: int) -> None:  # rows i0:i1; writes only their slices (disjoint across workers)
        i1 = min(n, i0 + bq)
        rows = i1 - i0
        qb = (q[:, i0:i1].to(f32) * scale).reshape(hkv, g * rows, d)
        lb = lse_safe[:, i0:i1].reshape(hkv, g * rows, 1)
        dead = None if all_live else ~live[:, i0:i1].reshape(hq, rows, 1)
        ipos = torch.arange(i0, i1, device=dev)[:, None]
        kstop = i1 if causal else n
        for j0 in range(0, kstop, bk):
            j1 = min(kstop, j0 + bk)
            t = torch.baddbmm(lb, qb, kf[:, j0:j1].transpose(1, 2), beta=-1.0).view(hq, rows, j1 - j0)
            if causal and j1 - 1 > i0:  # the tile reaches past some row's position
                t.masked_fill_(torch.arange(j0, j1, device=dev)[None, :] > ipos, float("-inf"))
            if dead is not None:
                t.masked_fill_(dead, float("-inf"))
            top, where = t.max(dim=-1)
            better = top > best[:, i0:i1]
            best[:, i0:i1] = torch.where(better, top, best[:, i0:i1])
            arg[:, i0:i1] = torch.where(better, where + j0, arg[:, i0:i1])
            p = t.exp_()
            _streaming(stream[:, i0:i1], p, ipos, j0, j1, sinks, window)
            if mass is not None:
                mass[:, i0 // bs:-(-i1 // bs), j0 // bs:-(-j1 // bs)] += _pool(p, bs)

    starts = list(range(0, n, bq))[::-1]  # causal: the costliest (last) blocks first
    run_blocks(query_block, starts, worker_count(dev, len(starts), 8 * hq * bq * bk))
    prob = torch.where(arg >= 0, best.exp(), torch.zeros((), device=dev))
    return BlockPass(argmax=arg, argmax_prob=prob, streaming=stream, block_mass=mass)


def visible_blocks(n: int, block_size: int, causal: bool = True) -> torch.Tensor:
    """int64 ``[ceil(n/B)]``: key blocks holding at least one key a row of query block ``t`` sees."""
    bs = check_block(block_size, "block_size")
    nb = -(-n // bs)
    if not causal:
        return torch.full((nb,), nb, dtype=torch.int64)
    last = torch.clamp((torch.arange(nb) + 1) * bs, max=n) - 1
    return last // bs + 1


def visible_block_mask(n: int, block_size: int, causal: bool = True) -> torch.Tensor:
    """bool ``[nqb, nkb]``: key block ``u`` is visible to query block ``t``."""
    counts = visible_blocks(n, block_size, causal)
    return torch.arange(counts.numel())[None, :] < counts[:, None]


def block_density(mass: torch.Tensor, visible: torch.Tensor, tau: float) -> torch.Tensor:
    """Per query block, the fewest key blocks whose pooled mass reaches ``tau`` of the block's total,
    over its visible key blocks: ``[..., nqb]`` (NaN for a query block with no mass).

    Args:
        mass: ``[..., nqb, nkb]`` block-pooled mass; visible: int ``[nqb]`` visible key blocks.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau={tau} must be in (0, 1]")
    total = mass.sum(-1, keepdim=True)
    ordered = mass.sort(dim=-1, descending=True).values.cumsum(-1)
    need = (ordered < tau * total).sum(-1) + 1
    vis = visible.to(mass.device)
    need = torch.minimum(need, vis.expand_as(need))
    dens = need.to(torch.float32) / vis.to(torch.float32)
    return torch.where(total[..., 0] > 0, dens, torch.full_like(dens, float("nan")))


def threshold_select(scores: torch.Tensor, tau: float, *, visible: torch.Tensor | None = None,
                     force_first: bool = True, force_diagonal: bool = True) -> torch.Tensor:
    """Keep, per query block, the smallest set of key blocks whose normalised score reaches ``tau``.

    Args:
        scores: ``[..., nqb, nkb]`` non-negative block scores.
        visible: bool ``[nqb, nkb]`` visible blocks (default: where the score is positive).
    Returns:
        bool like ``scores``. Blocks are taken in descending score; the first key block and the
        last visible one (the causal diagonal) are forced in first and count toward ``tau``.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau={tau} must be in (0, 1]")
    nkb = scores.shape[-1]
    visible = scores > 0 if visible is None else visible.to(scores.device).expand_as(scores)
    scores = scores.masked_fill(~visible, 0.0)
    idx = torch.arange(nkb, device=scores.device)
    forced = torch.zeros_like(visible)
    if force_first:
        forced[..., 0] = True
    if force_diagonal:
        last = torch.where(visible, idx, -1).amax(-1, keepdim=True).clamp(min=0)
        forced.scatter_(-1, last, True)
    forced &= visible
    priority = scores.masked_fill(forced, float("inf"))
    order = priority.argsort(dim=-1, descending=True, stable=True)
    ordered = scores.gather(-1, order).cumsum(-1)
    total = scores.sum(-1, keepdim=True)
    n_keep = torch.maximum((ordered < tau * total).sum(-1) + 1, forced.sum(-1))
    n_keep = torch.minimum(n_keep, visible.sum(-1))
    rank = torch.empty_like(order).scatter_(-1, order, idx.expand_as(order).contiguous())
    return (rank < n_keep.unsqueeze(-1)) & visible


@torch.no_grad()
def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, *, stride: int = 8, block_size: int = 64,
                              causal: bool = True, scale: float | None = None,
                              chunk: int = 256) -> torch.Tensor:
    """XAttention's antidiagonal block scores ``[Hq, nqb, nkb]`` fp32 of one sample.

    The sequence is cut into cells of ``stride`` positions; cell logit
    ``s~[a, b] = scale/S · Σ_{r<S} q_{aS+S-1-r} · k_{bS+r}`` (the antidiagonal of the S x S cell;
    positions past N count as zero vectors), causal cells ``b > a`` masked, a softmax over ``b`` per
    cell row, then the softmax mass summed over the ``B/S x B/S`` cells of each block. Each query
    block's scores sum to its number of cell rows.
    """
    hq, hkv, n, d = _check_sample(q, k, torch.zeros(q.shape[0], q.shape[1], device=q.device))
    bs = check_block(block_size, "block_size")
    stride = check_int(stride, "stride", low=1)
    if bs % stride:
        raise ValueError(f"stride={stride} must divide block_size={bs}")
    scale = resolve_scale(scale, d)
    g, cells = hq // hkv, -(-n // stride)
    pad = cells * stride - n
    qp = F.pad(q.to(torch.float32), (0, 0, 0, pad)).view(hq, cells, stride, d).flip(2).reshape(hq, cells, stride * d)
    kp = F.pad(k.to(torch.float32), (0, 0, 0, pad)).view(hkv, cells, stride * d)
    per = bs // stride
    nb = -(-n // bs)
    out = torch.zeros(hq, nb, nb, device=q.device)
    step = per * max(1, chunk // per)
    for a0 in range(0, cells, step):
        a1 = min(cells, a0 + step)
        s = torch.matmul(qp[:, a0:a1].reshape(hkv, g * (a1 - a0), stride * d), kp.transpose(1, 2))
        s = s.view(hq, a1 - a0, cells) * (scale / stride)
        if causal:
            future = torch.arange(cells, device=q.device)[None, :] > torch.arange(a0, a1, device=q.device)[:, None]
            s.masked_fill_(future, float("-inf"))
        w = torch.softmax(s, dim=-1)
        out[:, a0 // per:-(-a1 // per)] = _pool(w, per)
    return out


@torch.no_grad()
def mean_pooled_block_probs(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, causal: bool = True,
                            scale: float | None = None) -> torch.Tensor:
    """The HeSS mean-pooled scorer (:func:`kernels.block_sparse.block_scores`) as a softmax over
    each query block's visible key blocks: ``[Hq, nqb, nkb]`` fp32 (0 = not visible)."""
    from .block_sparse import block_scores

    _check_sample(q, k, torch.zeros(q.shape[0], q.shape[1], device=q.device))
    scores = block_scores(q[None], k[None], block_size=block_size, causal=causal, scale=scale)[0]
    return torch.softmax(scores, dim=-1)


def selected_recall(mass: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Share of each query block's true pooled mass inside the kept blocks: ``[..., nqb]`` (NaN without mass)."""
    total = mass.sum(-1)
    inside = (mass * keep).sum(-1)
    return torch.where(total > 0, inside / total.clamp(min=1e-30), torch.full_like(total, float("nan")))
