"""Stats forward: chunked torch and Triton (interpreter) against the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from conftest import CASES, assert_stats_match, make_inputs, truth_and_baseline
from kernels import STAT_NAMES, AttentionStats, attention_with_stats
from kernels.chunked import chunked_attention

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_matches_reference_fp32(case):
    q, k, v, mask, causal = make_inputs(case)
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask, local_window=3)
    # small tiles so every query block crosses several key tiles
    got = chunked_attention(q, k, v, causal=causal, key_padding_mask=mask, local_window=3, block_q=8, block_k=16)
    assert got.out.dtype == q.dtype
    assert_stats_match(got, truth, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["gqa-causal-pad", "gqa-bidir-pad"])
def test_chunked_matches_reference_half(case, dtype):
    q, k, v, mask, causal = make_inputs(case, dtype)
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask)
    got = chunked_attention(q, k, v, causal=causal, key_padding_mask=mask, block_q=16, block_k=16)
    assert got.out.dtype == dtype
    assert_stats_match(got, truth, base)


def test_chunked_default_blocks_and_dispatch_auto():
    q, k, v, mask, causal = make_inputs("gqa-causal-pad")
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask)
    got = attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask)  # auto -> chunked on CPU
    assert isinstance(got, AttentionStats)
    assert tuple(got.stats) == STAT_NAMES
    assert_stats_match(got, truth, base)
    ref = attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, backend="reference")
    assert_stats_match(ref, truth, base)


@pytest.mark.parametrize("case", ["gqa-causal-pad", "mha-causal-short-q", "gqa-bidir-pad", "generation-step"])
def test_triton_matches_reference_fp32(case):
    q, k, v, mask, causal = make_inputs(case)
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask, local_window=5)
    got = attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, local_window=5, backend="triton")
    assert got.out.dtype == q.dtype
    assert_stats_match(got, truth, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_matches_reference_half(dtype):
    q, k, v, mask, causal = make_inputs("gqa-causal-pad", dtype)
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask)
    got = attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, backend="triton", block_q=16, block_k=32)
    assert got.out.dtype == dtype
    assert_stats_match(got, truth, base)


@pytest.mark.parametrize("backend", ["reference", "chunked", "sdpa_recompute", "triton"])
def test_fully_padded_sequence_gives_zeros_not_nan(backend):
    q, k, v, _, _ = make_inputs("gqa-causal-pad")
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1] = False  # the whole second sequence is padding
    got = attention_with_stats(q, k, v, key_padding_mask=mask, backend=backend)
    assert not torch.isnan(got.out).any() and not torch.isnan(got.lse).any()
    assert torch.all(got.out[1] == 0)
    assert torch.all(torch.isneginf(got.lse[1])) and torch.isfinite(got.lse[0]).all()
    for name in STAT_NAMES:
        assert not torch.isnan(got.stats[name]).any(), name
        assert torch.all(got.stats[name][1] == 0), name


def test_known_values_on_a_uniform_map():
    """Identical keys: every visible key gets 1/n, so the statistics have closed forms."""
    n, d = 12, 32
    q = torch.randn(1, 1, n, d)
    k = torch.ones(1, 1, n, d)
    v = torch.randn(1, 1, n, d)
    got = attention_with_stats(q, k, v, local_window=2, backend="chunked")
    i = torch.arange(n, dtype=torch.float32)
    cnt = i + 1
    s = got.stats
    torch.testing.assert_close(s["entropy"][0, 0], torch.log(cnt))
    torch.testing.assert_close(s["entropy_normalized"][0, 0], torch.where(cnt > 1, 1.0, 0.0))
    torch.testing.assert_close(s["max_weight"][0, 0], 1 / cnt)
    torch.testing.assert_close(s["first1_mass"][0, 0], 1 / cnt)
    torch.testing.assert_close(s["first4_mass"][0, 0], torch.clamp(cnt, max=4) / cnt)
    torch.testing.assert_close(s["prev_token_mass"][0, 0], torch.where(i >= 1, 1 / cnt, 0.0))
    torch.testing.assert_close(s["self_mass"][0, 0], 1 / cnt)
    torch.testing.assert_close(s["local_mass"][0, 0], torch.clamp(cnt, max=3) / cnt)
    torch.testing.assert_close(s["mean_distance"][0, 0], i / 2)
    torch.testing.assert_close(got.out[0, 0], v[0, 0].cumsum(0) / cnt[:, None])


@pytest.mark.parametrize("backend", ["chunked", "sdpa_recompute", "triton"])
def test_non_contiguous_inputs(backend):
    """Models hand over q/k/v as [B, N, H, D].transpose(1, 2) views."""
    q, k, v, mask, causal = make_inputs("gqa-causal-pad")
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask)
    assert_stats_match(attention_with_stats(qt, kt, vt, key_padding_mask=mask, backend=backend), truth, base)


@pytest.mark.parametrize("backend", ["chunked", "sdpa_recompute", "triton"])
@pytest.mark.parametrize("n,causal", [(1, True), (2, False), (3, True), (5, False)])
def test_tiny_sequences(n, causal, backend):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g) for _ in range(3))
    truth, base = truth_and_baseline(q, k, v, causal=causal)
    assert_stats_match(attention_with_stats(q, k, v, causal=causal, backend=backend), truth, base)


def test_block_parallel_workers_match_sequential():
    """With 2 torch threads the chunked path runs query blocks on 2 workers: identical results."""
    from kernels.recompute import chunked_received_mass

    q, k, v, mask, causal = make_inputs("gqa-bidir-pad")
    seq = chunked_attention(q, k, v, causal=causal, key_padding_mask=mask, block_q=8, block_k=16)
    col_seq, _ = chunked_received_mass(q, k, seq.lse, causal=causal, key_padding_mask=mask, block_q=8, block_k=16)
    torch.set_num_threads(2)  # restored by the autouse fixture
    par = chunked_attention(q, k, v, causal=causal, key_padding_mask=mask, block_q=8, block_k=16)
    col_par, _ = chunked_received_mass(q, k, par.lse, causal=causal, key_padding_mask=mask, block_q=8, block_k=16)
    assert torch.get_num_threads() == 2  # the call restores the thread count it changed
    assert torch.equal(seq.out, par.out) and torch.equal(seq.lse, par.lse)
    for name in STAT_NAMES:
        assert torch.equal(seq.stats[name], par.stats[name]), name
    torch.testing.assert_close(col_seq, col_par, rtol=1e-6, atol=1e-7)  # summation order differs
