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


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
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
