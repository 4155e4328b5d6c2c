"""The "row_pass" strategy (kernels/row_pass.py + csrc/row_softmax.c): whole rows of one query block,
one softmax-and-statistics loop, e @ V. Checked against the fp64 truth for every layout."""

from __future__ import annotations

import pytest
import torch

from conftest import CASES, assert_stats_match, assert_within_precision, make_inputs, truth_and_baseline
from kernels import STAT_NAMES, attention_with_stats, cpu_fused, row_pass
from kernels.reference import reference_received_mass

pytestmark = pytest.mark.skipif(cpu_fused._compiler() is None, reason="no C compiler: the row pass is not built")


def _received_ok(got, q, k, truth, base, causal, mask, rel_atol=1e-5):
    t_raw, t_norm = reference_received_mass(q.double(), k.double(), truth.lse, causal=causal, key_padding_mask=mask)
    b_raw, b_norm = reference_received_mass(q, k, base.lse, causal=causal, key_padding_mask=mask)
    assert_within_precision("received", got.received, t_raw, b_raw, rel_atol=rel_atol)
    assert_within_precision("received_normalized", got.received_normalized, t_norm, b_norm, rel_atol=rel_atol)


@pytest.mark.parametrize("block_q", [None, 16, 32])
@pytest.mark.parametrize("case", list(CASES))
def test_row_pass_matches_the_truth(case, block_q):
    """out, LSE, every statistic and the received mass, for every layout (GQA, padding, Nq < Nk, bidirectional)."""
    q, k, v, mask, causal = make_inputs(case)
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask, local_window=3)
    got = attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, local_window=3, received=True,
                               backend="row_pass", block_q=block_q)
    assert got.out.dtype == q.dtype and tuple(got.stats) == STAT_NAMES
    assert_stats_match(got, truth, base)
    _received_ok(got, q, k, truth, base, causal, mask)
    assert attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, backend="row_pass").received is None


def test_auto_uses_the_row_pass_on_the_cpu():
    q, k, v, mask, _ = make_inputs("gqa-causal-pad")
    auto = attention_with_stats(q, k, v, key_padding_mask=mask, received=True)
    explicit = attention_with_stats(q, k, v, key_padding_mask=mask, received=True, backend="row_pass")
    assert torch.equal(auto.out, explicit.out) and torch.equal(auto.received, explicit.received)
    for name in STAT_NAMES:
        assert torch.equal(auto.stats[name], explicit.stats[name]), name


def test_half_inputs_compute_in_fp32():
    q, k, v, mask, causal = make_inputs("gqa-causal-pad")
    qh, kh, vh = (x.bfloat16() for x in (q, k, v))
    truth, base = truth_and_baseline(qh.float(), kh.float(), vh.float(), causal=causal, key_padding_mask=mask)
    got = attention_with_stats(qh, kh, vh, causal=causal, key_padding_mask=mask, backend="row_pass")
    assert got.out.dtype == torch.bfloat16
    for name in STAT_NAMES:
        assert_within_precision(name, got.stats[name], truth.stats[name], base.stats[name])


def test_peaked_logits_and_dead_rows():
    """Logits ~100 apart (exp floored at -80 below the row max): no NaN; padded rows are exactly zero."""
    q, k, v, mask, causal = make_inputs("gqa-causal-pad")
    q = q * 12.0
    mask[1] = False  # a whole padded sequence
    mask[1, -5:] = True
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask)
    got = attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, received=True, backend="row_pass")
    assert_stats_match(got, truth, base, rel_atol=1e-4)
    dead = torch.isneginf(truth.lse)
    assert dead.any() and torch.equal(torch.isneginf(got.lse), dead)
    assert torch.all(got.out[dead] == 0)
    for name in STAT_NAMES:
        assert not torch.isnan(got.stats[name]).any() and torch.all(got.stats[name][dead] == 0), name
    assert torch.all(got.received[~mask[:, None, :].expand_as(got.received)] == 0)


def test_thread_pool_matches_one_worker():
    """With 2 torch threads the query blocks run on 2 workers; per-worker column sums add up the same."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 300, 32, generator=g) for h in (4, 2, 2))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention_with_stats(q, k, v, received=True, block_q=16, backend="row_pass")
        torch.set_num_threads(2)
        two = attention_with_stats(q, k, v, received=True, block_q=16, backend="row_pass")
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(one.out, two.out, rtol=0, atol=0)
    for name in STAT_NAMES:
        torch.testing.assert_close(one.stats[name], two.stats[name], rtol=0, atol=0)
    torch.testing.assert_close(one.received, two.received, rtol=1e-6, atol=1e-6)


def test_refuses_what_it_cannot_run(monkeypatch):
    q, k, v, _, _ = make_inputs("gqa-causal-pad")
    with pytest.raises(ValueError, match="block_q"):
        attention_with_stats(q, k, v, backend="row_pass", block_q=0)
    monkeypatch.setattr(cpu_fused, "row_softmax", lambda: None)
    assert not row_pass.available(q)
    with pytest.raises(ValueError, match="C compiler"):
        attention_with_stats(q, k, v, backend="row_pass")


def test_loading_the_compiled_loops_leaves_the_process_float_mode_alone():
    """Built with -ffast-math but linked without it: loading them must not switch the whole process
    to flush-to-zero (gcc's crtfastmath.o would, and subnormals would silently become 0 everywhere)."""
    import subprocess
    import sys

    code = ("import numpy as np; from kernels import cpu_fused; "
            "assert cpu_fused.tile_stats() is not None and cpu_fused.row_softmax() is not None; "
            "print(np.nextafter(np.float64(0), 1.0) * 1.0 > 0, np.float32(1e-40) * np.float32(1) > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
