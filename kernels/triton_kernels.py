"""Triton kernels: stats forward (dense or block-sparse) and the received-mass second pass.

Only ``@triton.jit`` code lives here; shapes, strides, dtypes and grids are checked and chosen in
``triton_launch.py``. Logits are kept in base 2 (``s·log2(e)``) so the kernels can use ``exp2``;
results are converted back to natural logs before they are stored.

``DOT_PRECISION`` is ``"ieee"``/``"tf32x3"`` for fp32 inputs (full fp32 accuracy, like PyTorch's
default CUDA matmul) and ``None`` for fp16/bf16. ``UPCAST_DOT`` (set only under ``TRITON_INTERPRET=1`` with bf16 inputs) feeds ``tl.dot`` fp32
copies of the operands: the Triton 3.9 CPU interpreter computes bf16 dots wrongly. Operands are
rounded to bf16 first, so the numbers match the GPU path up to summation order.

Conventions: query row ``i`` has absolute position ``offset + i`` with ``offset = N_K - N_Q``;
masked logits are set to the finite ``_NEG`` so ``0 * logit`` never makes NaN, and masked
probabilities are forced to exactly 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # plain float for the launchers
N_STATS = 9  # rows of the Stats output, in the order of types.STAT_NAMES
# kernels may only read globals that are constexpr
_NEG = tl.constexpr(-1.0e30)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _stats_fwd_kernel(
    Q, K, V, Out, Lse, Stats, KeyMask, BlockIdx, BlockCnt,
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb,
    stride_ib, stride_ih, stride_iq,
    stride_cb, stride_ch,
    H_Q, GROUP, N_Q, N_K, HEAD_DIM, LOCAL_W, STAT_PLANE,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SPARSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """One program = BLOCK_M query rows of one (batch, query head); streams over key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    hk = h // GROUP
    offset = N_K - N_Q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    pos_m = offs_m + offset
    row_in = offs_m < N_Q
    d_ok = offs_d < HEAD_DIM
    row_ok = row_in
    if HAS_MASK:
        q_real = tl.load(KeyMask + b * stride_mb + pos_m, mask=row_in, other=0)
        row_ok = row_ok & (q_real != 0)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_in[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    ent = tl.zeros([BLOCK_M], dtype=tl.float32)  # Σ p (s - m), base-2 logits
    dist = tl.zeros([BLOCK_M], dtype=tl.float32)
    local = tl.zeros([BLOCK_M], dtype=tl.float32)
    selfm = tl.zeros([BLOCK_M], dtype=tl.float32)
    prev = tl.zeros([BLOCK_M], dtype=tl.float32)
    first1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    first4 = tl.zeros([BLOCK_M], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    band_lo = pid_m * BLOCK_M + offset - tl.maximum(LOCAL_W, 1)  # keys j with |i - j| <= w (or j = i - 1)
    band_hi = pid_m * BLOCK_M + offset + BLOCK_M - 1 + LOCAL_W
    if SPARSE:
        n_iter = tl.load(BlockCnt + b * stride_cb + h * stride_ch + pid_m)
    else:
        hi = N_K
        if CAUSAL:
            hi = tl.minimum(N_K, offset + (pid_m + 1) * BLOCK_M)
        n_iter = tl.cdiv(hi, BLOCK_N)
    for it in range(0, n_iter):
        if SPARSE:
            start_n = tl.load(BlockIdx + b * stride_ib + h * stride_ih + pid_m * stride_iq + it) * BLOCK_N
        else:
            start_n = it * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_in = offs_n < N_K
        kt = tl.load(
            k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=col_in[None, :] & d_ok[:, None], other=0.0,
        )
        if UPCAST_DOT:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        valid = row_ok[:, None] & col_in[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= pos_m[:, None])
        if HAS_MASK:
            k_real = tl.load(KeyMask + b * stride_mb + offs_n, mask=col_in, other=0)
            valid = valid & (k_real[None, :] != 0)
        s = tl.where(valid, s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        delta = m_new - m_i
        alpha = tl.exp2(-delta)
        t = s - m_new[:, None]
        p = tl.where(valid, tl.exp2(t), 0.0)

        ent = alpha * (ent - delta * l_i) + tl.sum(p * t, 1)
        l_i = l_i * alpha + tl.sum(p, 1)
        rel = (pos_m[:, None] - offs_n[None, :]).to(tl.float32)  # i - j
        dist = dist * alpha + tl.sum(p * tl.abs(rel), 1)
        local = local * alpha
        selfm = selfm * alpha
        prev = prev * alpha
        first1 = first1 * alpha
        first4 = first4 * alpha
        # band and first-key statistics only where this tile can hold such keys
        if (start_n <= band_hi) & (start_n + BLOCK_N > band_lo):
            local += tl.sum(tl.where(tl.abs(rel) <= LOCAL_W, p, 0.0), 1)
            selfm += tl.sum(tl.where(rel == 0.0, p, 0.0), 1)
            prev += tl.sum(tl.where(rel == 1.0, p, 0.0), 1)
        if start_n < 4:
            first1 += tl.sum(tl.where(offs_n[None, :] == 0, p, 0.0), 1)
            first4 += tl.sum(tl.where(offs_n[None, :] < 4, p, 0.0), 1)
        cnt += tl.sum(valid.to(tl.float32), 1)

        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=col_in[:, None] & d_ok[None, :], other=0.0,
        )
        pv = p.to(v.dtype)  # rounded to the input precision, as the GPU tensor cores see it
        if UPCAST_DOT:
            pv = pv.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PRECISION)
        m_i = m_new

    dead = cnt == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    inv = 1.0 / l_safe
    log2_l = tl.log2(l_safe)
    out = tl.where(dead[:, None], 0.0, acc * inv[:, None])
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_in[:, None] & d_ok[None, :])

    row_base = (b * H_Q + h) * N_Q + offs_m  # Lse and Stats rows are contiguous [B, Hq, Nq]
    lse = tl.where(dead, float("-inf"), (m_i + log2_l) * _LN2)
    tl.store(Lse + row_base, lse, mask=row_in)
    entropy = tl.where(dead, 0.0, (log2_l - ent * inv) * _LN2)
    ent_norm = tl.where(cnt > 1.0, entropy / tl.log(tl.maximum(cnt, 2.0)), 0.0)
    plane = STAT_PLANE  # = B * Hq * Nq
    tl.store(Stats + 0 * plane + row_base, entropy, mask=row_in)
    tl.store(Stats + 1 * plane + row_base, ent_norm, mask=row_in)
    tl.store(Stats + 2 * plane + row_base, tl.where(dead, 0.0, inv), mask=row_in)
    tl.store(Stats + 3 * plane + row_base, first1 * inv, mask=row_in)
    tl.store(Stats + 4 * plane + row_base, first4 * inv, mask=row_in)
    tl.store(Stats + 5 * plane + row_base, prev * inv, mask=row_in)
    tl.store(Stats + 6 * plane + row_base, selfm * inv, mask=row_in)
    tl.store(Stats + 7 * plane + row_base, local * inv, mask=row_in)
    tl.store(Stats + 8 * plane + row_base, dist * inv, mask=row_in)


@triton.jit
def _received_mass_kernel(
    Q, K, Lse, Col, KeyMask,
    qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb,
    H_Q, GROUP, N_Q, N_K, HEAD_DIM,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """One program = BLOCK_N keys of one (batch, query head); sums exp(s - lse) over the rows."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    hk = h // GROUP
    offset = N_K - N_Q

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_in = offs_n < N_K
    d_ok = offs_d < HEAD_DIM
    col_ok = col_in
    if HAS_MASK:
        k_real = tl.load(KeyMask + b * stride_mb + offs_n, mask=col_in, other=0)
        col_ok = col_ok & (k_real != 0)
    kt = tl.load(
        K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=col_in[None, :] & d_ok[:, None], other=0.0,
    )
    if UPCAST_DOT:
        kt = kt.to(tl.float32)
    col = tl.zeros([BLOCK_N], dtype=tl.float32)
    lo = 0
    if CAUSAL:
        lo = (tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_in = offs_m < N_Q
        q = tl.load(
            Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            mask=row_in[:, None] & d_ok[None, :], other=0.0,
        )
        if UPCAST_DOT:
            q = q.to(tl.float32)
        lse = tl.load(Lse + (b * H_Q + h) * N_Q + offs_m, mask=row_in, other=float("inf"))
        row_ok = row_in & (lse < float("inf")) & (lse > float("-inf"))
        if HAS_MASK:
            q_real = tl.load(KeyMask + b * stride_mb + offs_m + offset, mask=row_in, other=0)
            row_ok = row_ok & (q_real != 0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        valid = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= (offs_m + offset)[:, None])
        lse2 = tl.where(row_ok, lse * _LOG2E, 0.0)
        p = tl.exp2(tl.where(valid, s - lse2[:, None], float("-inf")))  # masked lanes: exactly 0
        col += tl.sum(p, 0)
    tl.store(Col + (b * H_Q + h) * N_K + offs_n, col, mask=col_in)
