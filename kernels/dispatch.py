"""Public entry points: one dispatch per operation over the reference / chunked / sdpa_recompute /
Triton backends.

``backend="auto"`` picks ``"triton"`` for CUDA tensors when triton is importable; on the CPU it
picks ``"row_pass"`` for :func:`attention_with_stats` where its compiled loop builds, else
``"sdpa_recompute"`` where PyTorch's fused CPU kernel applies (fp32, ``Nq == Nk`` or
bidirectional), and ``"chunked"`` otherwise. ``"reference"`` materialises
the full map (small inputs only).
"""

from __future__ import annotations

import torch

from . import chunked, recompute, reference, row_pass, sdpa_lse
from .exact_pass import exact_stats
from .long_context import RowExtras
from .types import AttentionStats
from .validation import (
    check_block,
    check_int,
    check_keep,
    check_key_padding_mask,
    check_qk,
    check_qkv,
    resolve_backend,
    resolve_scale,
)


def _pick(backend: object, device: torch.device, head_dim: int, block_size: int | None = None) -> str:
    """Resolve the backend; "auto" falls back to chunked where the Triton kernels cannot run."""
    chosen = resolve_backend(backend, device)
    if chosen in ("sdpa_recompute", "row_pass"):  # strategies of attention_with_stats only; elsewhere the chunked code
        return "chunked"
    if backend == "auto" and chosen == "triton":
        sparse_ok = block_size is None or (16 <= block_size <= 128 and block_size & (block_size - 1) == 0)
        if not (16 <= head_dim <= 256 and sparse_ok):
            return "chunked"
    return chosen


def _check_row_extras(extras: RowExtras) -> RowExtras:
    """``extras`` with its fields checked (ValueError naming the bad one)."""
    if not isinstance(extras, RowExtras):
        raise TypeError(f"row_extras must be a kernels.long_context.RowExtras, not {type(extras).__name__}")
    check_int(extras.sinks, "row_extras.sinks", low=0)
    check_int(extras.window, "row_extras.window", low=0)
    if extras.block_size is not None:
        check_block(extras.block_size, "row_extras.block_size")
    return extras


def _triton():
    from . import triton_launch  # imported lazily: TRITON_INTERPRET must be set before triton's jit runs

    return triton_launch


def attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    local_window: int = 8,
    received: bool = False,
    backend: str = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
    row_extras: RowExtras | None = None,
) -> AttentionStats:
    """Attention output, per-row LSE and the docs/metrics.md §1 statistics, never materialising the map.

    Args:
        q: ``[B, Hq, Nq, D]``; k, v: ``[B, Hkv, Nk, D]`` with ``Hq % Hkv == 0`` and ``Nq <= Nk``.
            Query row ``i`` sits at absolute position ``Nk - Nq + i``.
        causal: mask keys after each query's position.
        key_padding_mask: bool ``[B, Nk]``, True = real token. A query row is padded when the
            key at its position is; padded rows get zero output/statistics and ``lse = -inf``.
        scale: logit scale, default ``1/sqrt(D)``.
        local_window: ``w`` of ``local_mass = Σ_{|i-j|<=w} A_ij``.
        received: also compute the received mass per key (``result.received`` /
            ``result.received_normalized``, see :func:`received_mass`).
        backend: "auto" | "reference" | "chunked" | "sdpa_recompute" | "row_pass" | "triton".
            chunked / triton: one streaming pass (online softmax) gives out, LSE and the statistics;
            the received mass is a second pass with the saved LSE. sdpa_recompute (CPU, fp32,
            ``Nq == Nk`` or bidirectional): out and LSE from PyTorch's fused CPU flash kernel, then
            one exact pass with that LSE gives every statistic and the received mass. row_pass (CPU,
            needs a C compiler; the CPU default): whole rows of one query block at a time, one
            matmul for the logits, one compiled softmax-and-statistics loop, one matmul for the
            output (:mod:`kernels.row_pass`; the fastest on CPUs).
        block_q / block_k: tile sizes, None = the backend's default. chunked: query rows per head
            and keys per tile (default about 1.2M logits a tile); sdpa_recompute: the same for its
            exact pass (default about 1.2M); row_pass: query rows per head (whole rows; block_k is
            unused); triton: BLOCK_M / BLOCK_N, powers of two >= 16 (default 64 / 32).
        row_extras: a :class:`kernels.long_context.RowExtras` asking for the long-context rows
            (arg-max key, streaming mass, block-pooled mass) in the same pass. Only row_pass computes
            them there (``result.rows``); the other backends leave ``rows`` None and the caller runs
            :func:`kernels.long_context.block_pass` with the LSE (the same numbers, one more pass).
    Returns:
        ``AttentionStats(out [B, Hq, Nq, D] input dtype, lse [B, Hq, Nq] fp32, stats {name: [B, Hq, Nq]},
        received / received_normalized [B, Hq, Nk] fp32 or None, rows or None)``.
    """
    dims = check_qk(q, k)
    if row_extras is not None:  # checked for every backend, also those that leave rows None
        row_extras = _check_row_extras(row_extras)
    chosen = resolve_backend(backend, q.device)
    if chosen == "row_pass" or (backend == "auto" and chosen == "chunked" and row_pass.available(q)):
        if not row_pass.available(q):
            raise ValueError("backend='row_pass' needs CPU tensors and a C compiler (kernels/csrc/row_softmax.c); "
                             "use backend='chunked'")
        dims = check_qkv(q, k, v)
        mask = check_key_padding_mask(key_padding_mask, dims, q.device)
        if block_q is not None:
            block_q = check_block(block_q, "block_q")
        return row_pass.row_pass_attention(q, k, v, dims, causal, mask, resolve_scale(scale, dims.head_dim),
                                           check_int(local_window, "local_window", low=0), received, block_q,
                                           row_extras)
    if chosen == "sdpa_recompute" or (backend == "auto" and chosen == "chunked"):
        reason = sdpa_lse.unsupported_reason(q, dims, causal)
        if reason is None:
            return _sdpa_recompute(q, k, v, causal, key_padding_mask, scale, local_window, received, block_q, block_k)
        if backend == "sdpa_recompute":
            raise ValueError(f"backend='sdpa_recompute' cannot run this call: {reason}; use backend='chunked'")
    chosen = _pick(backend, q.device, dims.head_dim)
    kwargs = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale, local_window=local_window)
    if chosen == "reference":
        result = reference.reference_attention(q, k, v, **kwargs)
    elif chosen == "chunked":
        result = chunked.chunked_attention(q, k, v, block_q=block_q, block_k=block_k, **kwargs)
    else:
        result = _triton().triton_attention(q, k, v, block_q=block_q, block_k=block_k, **kwargs)
    if received:
        result.received, result.received_normalized = received_mass(
            q, k, result.lse, causal=causal, key_padding_mask=key_padding_mask, scale=scale, backend=chosen
        )
    return result


def _sdpa_recompute(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    key_padding_mask: torch.Tensor | None, scale: float | None, local_window: int, received: bool,
                    block_q: int | None, block_k: int | None) -> AttentionStats:
    """The "sdpa_recompute" strategy: fused SDPA for out + LSE, then :func:`exact_stats`."""
    dims = check_qkv(q, k, v)
    mask = check_key_padding_mask(key_padding_mask, dims, q.device)
    scale = resolve_scale(scale, dims.head_dim)
    out, lse = sdpa_lse.sdpa_out_lse(q, k, v, dims, causal, mask, scale)
    exact = exact_stats(q, k, lse, causal=causal, key_padding_mask=mask, scale=scale, local_window=local_window,
                        received=received, block_q=block_q, block_k=block_k)
    return AttentionStats(out=out, lse=lse, stats=exact.stats, received=exact.received,
                          received_normalized=exact.received_normalized)


def received_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Received mass per key from a second pass that recomputes ``p = exp(s - lse)``.

    Returns ``(c, ĉ)``, fp32 ``[B, Hq, Nk]``: column sums ``c_j = Σ_i A_ij`` and
    ``ĉ_j = c_j / (number of real queries that can see j)`` (0 where nobody can).
    ``lse`` is the ``.lse`` of ``attention_with_stats`` on the same q, k, mask and scale.
    """
    dims = check_qk(q, k)
    chosen = _pick(backend, q.device, dims.head_dim)
    kwargs = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    if chosen == "reference":
        return reference.reference_received_mass(q, k, lse, **kwargs)
    if chosen == "chunked":
        return recompute.chunked_received_mass(q, k, lse, **kwargs)
    return _triton().triton_received_mass(q, k, lse, **kwargs)


def attention_tile(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    head: int,
    batch_index: int = 0,
    q_range: tuple[int, int],
    k_range: tuple[int, int],
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact probabilities ``[q1-q0, k1-k0]`` fp32 of query rows ``q_range`` x keys ``k_range``
    (half-open) of query head ``head``; masked entries are 0."""
    return recompute.chunked_tile(
        q, k, lse, head=head, batch_index=batch_index, q_range=q_range, k_range=k_range,
        causal=causal, key_padding_mask=key_padding_mask, scale=scale,
    )


def attention_thumbnail(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    head: int,
    batch_index: int = 0,
    size: int = 256,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max-pooled, mean-pooled)`` fp32 ``[min(size, Nq), min(size, Nk)]`` views of one head's
    whole map, streamed block by block. Bins: ``thumbnail_edges(Nq, size)`` x ``thumbnail_edges(Nk, size)``."""
    return recompute.chunked_thumbnail(
        q, k, lse, head=head, batch_index=batch_index, size=size,
        causal=causal, key_padding_mask=key_padding_mask, scale=scale,
    )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | list,
    *,
    block_size: int = 64,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    local_window: int = 8,
    backend: str = "auto",
) -> AttentionStats:
    """Attention restricted to kept key blocks, with the same outputs as ``attention_with_stats``.

    Args:
        keep: bool ``[B, Hq, n_q_blocks, n_k_blocks]`` (or ``[Hq, nqb, nkb]``), or nested lists
            ``keep[query_block][head]`` of key-block indices. Query block ``t`` = rows
            ``[t*bs, (t+1)*bs)``, key block ``u`` = keys ``[u*bs, (u+1)*bs)``.
    Dropped blocks contribute nothing. Statistics describe the sparse distribution
    (``entropy_normalized`` divides by the log of the number of kept visible keys). A row that
    keeps no visible key gets zero output/statistics and ``lse = -inf`` (never NaN).
    The Triton backend needs ``block_size`` to be a power of two in [16, 128] ("auto" falls back
    to chunked otherwise).
    """
    dims = check_qk(q, k)
    block_size = check_block(block_size, "block_size")
    chosen = _pick(backend, q.device, dims.head_dim, block_size)
    keep_t = check_keep(keep, dims, block_size, q.device)
    kwargs = dict(
        causal=causal, key_padding_mask=key_padding_mask, scale=scale,
        local_window=local_window, keep=keep_t, block_size=block_size,
    )
    if chosen == "reference":
        return reference.reference_attention(q, k, v, **kwargs)
    if chosen == "chunked":
        return chunked.chunked_attention(q, k, v, **kwargs)
    return _triton().triton_attention(q, k, v, **kwargs)
