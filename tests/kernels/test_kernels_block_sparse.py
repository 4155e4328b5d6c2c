"""Block-sparse attention, block scores and block selection."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_stats_match, make_inputs, truth_and_baseline
from kernels import STAT_NAMES, block_scores, block_sparse_attention, select_blocks

BS = 16


def _random_keep(q, k, seed=0):
    B, Hq, Nq = q.shape[:3]
    nqb, nkb = -(-Nq // BS), -(-k.shape[2] // BS)
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, Hq, nqb, nkb, generator=g) < 0.6
    keep[0, 0, -1] = False  # one (query block, head) keeps nothing at all
    return keep


def _masked_softmax_out(q, k, v, keep, causal, mask):
    """Independent check: dense softmax with dropped blocks masked (fp64)."""
    B, Hq, Nq, D = q.shape
    Nk, G = k.shape[2], Hq // k.shape[1]
    s = q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2) / D**0.5
    allowed = keep.repeat_interleave(BS, 2)[:, :, :Nq].repeat_interleave(BS, 3)[..., :Nk]
    pos = torch.arange(Nq) + Nk - Nq
    if causal:
        allowed = allowed & (torch.arange(Nk)[None, :] <= pos[:, None])
    if mask is not None:
        allowed = allowed & mask[:, None, None, :] & mask[:, None, Nk - Nq :, None]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    return p @ v.double().repeat_interleave(G, 1), torch.logsumexp(s, -1)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("case", ["gqa-causal-pad", "gqa-bidir-pad"])
def test_block_sparse_matches_masked_reference(case, backend):
    q, k, v, mask, causal = make_inputs(case)
    keep = _random_keep(q, k)
    kw = dict(causal=causal, key_padding_mask=mask, keep=keep, block_size=BS)
    truth, base = truth_and_baseline(q, k, v, **kw)
    got = block_sparse_attention(q, k, v, keep, block_size=BS, causal=causal, key_padding_mask=mask, backend=backend)
    assert_stats_match(got, truth, base)
    out, lse = _masked_softmax_out(q, k, v, keep, causal, mask)
    torch.testing.assert_close(got.out.double(), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.lse.double(), lse, atol=1e-5, rtol=1e-5)
    # the (query block, head) that keeps nothing: zeros, -inf LSE, no NaN
    last_block = (q.shape[2] - 1) // BS * BS
    assert torch.all(got.out[0, 0, last_block:] == 0)
    assert torch.all(torch.isneginf(got.lse[0, 0, last_block:]))
    assert not any(torch.isnan(got.stats[n]).any() for n in STAT_NAMES)


def test_block_sparse_keep_all_equals_dense_and_lists_convert():
    q, k, v, mask, causal = make_inputs("gqa-causal-pad")
    nqb, nkb = -(-q.shape[2] // BS), -(-k.shape[2] // BS)
    dense = block_sparse_attention(q, k, v, torch.ones(q.shape[1], nqb, nkb, dtype=torch.bool), block_size=BS, key_padding_mask=mask)
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask)
    assert_stats_match(dense, truth, base)
    keep = _random_keep(q, k)[0]  # shared by the batch
    lists = [[torch.nonzero(keep[h, t]).flatten().tolist() for h in range(q.shape[1])] for t in range(nqb)]
    a = block_sparse_attention(q, k, v, keep, block_size=BS, key_padding_mask=mask, backend="chunked")
    b = block_sparse_attention(q, k, v, lists, block_size=BS, key_padding_mask=mask, backend="chunked")
    torch.testing.assert_close(a.out, b.out)
    torch.testing.assert_close(a.lse, b.lse)


def test_block_scores_are_mean_pooled_dots():
    q, k, _, _, _ = make_inputs("gqa-causal-pad")  # Nq = Nk = 37 -> 3 blocks of 16 (last has 5)
    scores = block_scores(q, k, block_size=BS)
    assert scores.shape == (2, 4, 3, 3)
    qm = torch.stack([q[:, :, a : a + BS].mean(2) for a in range(0, 37, BS)], 2)
    km = torch.stack([k[:, :, a : a + BS].mean(2) for a in range(0, 37, BS)], 2).repeat_interleave(2, 1)
    expected = qm @ km.transpose(-1, -2) / 32**0.5
    future = torch.triu(torch.ones(3, 3, dtype=torch.bool), 1)
    assert torch.all(torch.isneginf(scores[..., future]))
    torch.testing.assert_close(scores[..., ~future], expected[..., ~future])
    assert torch.isfinite(block_scores(q, k, block_size=BS, causal=False)).all()


def test_select_blocks_keeps_first_and_diagonal_and_clamps():
    scores = torch.tensor([[0.0, 5.0, 1.0, 3.0, float("-inf")], [9.0, 1.0, 2.0, 8.0, 4.0]]).expand(1, 2, 2, 5).clone()
    keep = select_blocks(scores, torch.tensor([1, 3]))
    # head 0, budget 1: first and diagonal are forced (budget grows to 2)
    assert keep[0, 0, 0].tolist() == [True, False, False, True, False]
    assert keep[0, 0, 1].tolist() == [True, False, False, False, True]
    # head 1, budget 3: forced first + diagonal, then the best remaining block
    assert keep[0, 1, 0].tolist() == [True, True, False, True, False]
    assert keep[0, 1, 1].tolist() == [True, False, False, True, True]
    big = select_blocks(scores, 10)
    assert torch.equal(big, torch.isfinite(scores))  # clamped to the visible blocks
    none = select_blocks(scores, 0, always_keep_first=False, always_keep_diagonal=False)
    assert not none.any()


def test_select_blocks_end_to_end_with_scores():
    q, k, v, mask, causal = make_inputs("gqa-causal-pad")
    keep = select_blocks(block_scores(q, k, block_size=BS), torch.tensor([1, 2, 3, 1]))
    assert keep.shape == (2, 4, 3, 3) and keep.dtype == torch.bool
    assert keep[..., 0].all() and keep.diagonal(dim1=-2, dim2=-1).all()
    got = block_sparse_attention(q, k, v, keep, block_size=BS, key_padding_mask=mask)
    assert torch.isfinite(got.out).all()
