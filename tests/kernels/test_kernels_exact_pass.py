"""The exact pass (statistics + received mass from a known LSE) and the "sdpa_recompute" backend."""

from __future__ import annotations

import pytest
import torch

from conftest import CASES, assert_stats_match, assert_within_precision, make_inputs, truth_and_baseline
from kernels import STAT_NAMES, attention_with_stats, cpu_fused, received_mass
from kernels.exact_pass import exact_stats
from kernels.reference import reference_received_mass

SDPA_CASES = [c for c, (_, _, _, nq, nk, _, causal, _) in CASES.items() if nq == nk or not causal]
HAVE_CC = cpu_fused._compiler() is not None


@pytest.fixture(params=["fused", "torch"])
def epilogue(request, monkeypatch):
    """Run a test with the compiled C epilogue and with the torch-ops one."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_fused, "tile_stats", lambda: None)
    elif cpu_fused.tile_stats() is None:
        pytest.skip("no C compiler: the fused epilogue is not built here")
    return request.param


def _check_received(got_raw, got_norm, q, k, truth, baseline, causal, mask):
    """Received mass against the fp64 truth, within twice PyTorch's own fp32 error."""
    t_raw, t_norm = reference_received_mass(q.double(), k.double(), truth.lse, causal=causal, key_padding_mask=mask)
    b_raw, b_norm = reference_received_mass(q, k, baseline.lse, causal=causal, key_padding_mask=mask)
    assert_within_precision("received", got_raw, t_raw, b_raw)
    assert_within_precision("received_normalized", got_norm, t_norm, b_norm)


@pytest.mark.parametrize("blocks", [(None, None), (8, 16), (16, 8)])
@pytest.mark.parametrize("case", list(CASES))
def test_exact_stats_from_the_true_lse(case, blocks, epilogue):
    """Every statistic and the received mass, for every layout (GQA, padding, Nq < Nk, bidirectional)."""
    q, k, v, mask, causal = make_inputs(case)
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask, local_window=3)
    got = exact_stats(q, k, base.lse, causal=causal, key_padding_mask=mask, local_window=3,
                      block_q=blocks[0], block_k=blocks[1])
    assert tuple(got.stats) == STAT_NAMES
    for name in STAT_NAMES:
        assert got.stats[name].dtype == torch.float32
        assert_within_precision(name, got.stats[name], truth.stats[name], base.stats[name])
    _check_received(got.received, got.received_normalized, q, k, truth, base, causal, mask)


def test_exact_stats_without_received_mass():
    q, k, v, mask, causal = make_inputs("gqa-causal-pad")
    _, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask)
    got = exact_stats(q, k, base.lse, causal=causal, key_padding_mask=mask, received=False)
    assert got.received is None and got.received_normalized is None
    full = exact_stats(q, k, base.lse, causal=causal, key_padding_mask=mask)
    for name in STAT_NAMES:
        assert torch.equal(got.stats[name], full.stats[name]), name


@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa_recompute_matches_reference(case, epilogue):
    q, k, v, mask, causal = make_inputs(case)
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask, local_window=3)
    got = attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, local_window=3, received=True,
                               backend="sdpa_recompute")
    assert got.out.dtype == q.dtype
    assert_stats_match(got, truth, base)
    _check_received(got.received, got.received_normalized, q, k, truth, base, causal, mask)


def test_peaked_logits_need_the_exp_floor(epilogue):
    """Logits far below the row maximum (exp would underflow past -88, so tiles are clamped at -80):
    same numbers, no NaN. fp32 logits of this size (|s| ~ 100) carry ~1e-5 absolute error in
    ``s - lse`` in any fp32 implementation, hence the 1e-4 tolerance."""
    q, k, v, mask, causal = make_inputs("gqa-causal-pad")
    q = q * 12.0
    scale = q.shape[-1] ** -0.5
    truth, base = truth_and_baseline(q, k, v, causal=causal, key_padding_mask=mask)
    reach = (q.norm(dim=-1) * scale * k.norm(dim=-1).amax() + truth.lse.nan_to_num(neginf=0.0)).amax()
    assert reach > 80  # the Cauchy-Schwarz bound asks for the clamp
    got = attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, received=True,
                               backend="sdpa_recompute", block_q=8, block_k=16)
    assert_stats_match(got, truth, base, rel_atol=1e-4)
    t_raw, _ = reference_received_mass(q.double(), k.double(), truth.lse, causal=causal, key_padding_mask=mask)
    b_raw, _ = reference_received_mass(q, k, base.lse, causal=causal, key_padding_mask=mask)
    assert_within_precision("received", got.received, t_raw, b_raw, rel_atol=1e-4)


def test_auto_picks_sdpa_recompute_without_the_row_pass_and_chunked_otherwise(monkeypatch):
    """Where the row pass cannot build (no compiler), auto falls back to sdpa_recompute, then chunked."""
    monkeypatch.setattr(cpu_fused, "row_softmax", lambda: None)
    q, k, v, mask, _ = make_inputs("gqa-causal-pad")
    auto = attention_with_stats(q, k, v, key_padding_mask=mask, received=True)
    explicit = attention_with_stats(q, k, v, key_padding_mask=mask, received=True, backend="sdpa_recompute")
    for name in STAT_NAMES:
        assert torch.equal(auto.stats[name], explicit.stats[name]), name
    assert torch.equal(auto.received, explicit.received)
    # bf16 inputs, and causal calls with Nq < Nk, go to the chunked kernel
    qh, kh, vh = (x.bfloat16() for x in (q, k, v))
    assert torch.equal(attention_with_stats(qh, kh, vh, key_padding_mask=mask).lse,
                       attention_with_stats(qh, kh, vh, key_padding_mask=mask, backend="chunked").lse)
    q2, k2, v2, _, _ = make_inputs("mha-causal-short-q")
    assert torch.equal(attention_with_stats(q2, k2, v2).lse, attention_with_stats(q2, k2, v2, backend="chunked").lse)


def test_sdpa_recompute_refuses_what_it_cannot_run():
    q, k, v, _, _ = make_inputs("gqa-causal-pad")
    with pytest.raises(ValueError, match="fp32"):
        attention_with_stats(q.half(), k.half(), v.half(), backend="sdpa_recompute")
    q2, k2, v2, _, _ = make_inputs("mha-causal-short-q")
    with pytest.raises(ValueError, match="Nq == Nk"):
        attention_with_stats(q2, k2, v2, backend="sdpa_recompute")


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
def test_received_flag_equals_the_second_pass(backend):
    q, k, v, mask, causal = make_inputs("gqa-bidir-pad")
    got = attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, received=True, backend=backend)
    raw, norm = received_mass(q, k, got.lse, causal=causal, key_padding_mask=mask, backend=backend)
    assert torch.equal(got.received, raw) and torch.equal(got.received_normalized, norm)
    assert attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, backend=backend).received is None


def test_padding_contributes_exactly_zero_and_dead_rows_are_zero(epilogue):
    q, k, v, mask, _ = make_inputs("gqa-causal-pad")
    mask[1] = False  # a whole padded sequence: every row sees nothing
    got = attention_with_stats(q, k, v, key_padding_mask=mask, received=True, backend="sdpa_recompute")
    assert torch.all(got.out[1] == 0) and torch.all(torch.isneginf(got.lse[1]))
    assert torch.all(got.received[~mask[:, None, :].expand_as(got.received)] == 0)
    for name in STAT_NAMES:
        assert not torch.isnan(got.stats[name]).any() and torch.all(got.stats[name][1] == 0), name
    q_garbage = q.clone()
    q_garbage[0, :, :3] = 1e3  # sample 0 is left-padded: its first 3 rows are dead, their q must not matter
    again = attention_with_stats(q_garbage, k, v, key_padding_mask=mask, received=True, backend="sdpa_recompute")
    assert torch.equal(again.received, got.received)
    assert torch.isfinite(again.received_normalized).all()


def test_thread_pool_matches_one_worker(epilogue):
    """With 2 torch threads query blocks run on 2 workers; per-worker column sums add up the same."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 300, 32, generator=g), torch.randn(1, 2, 300, 32, generator=g), torch.randn(1, 2, 300, 32, generator=g)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attention_with_stats(q, k, v, received=True, block_q=16, block_k=64)
        torch.set_num_threads(2)
        two = attention_with_stats(q, k, v, received=True, block_q=16, block_k=64)
    finally:
        torch.set_num_threads(previous)
    for name in STAT_NAMES:
        torch.testing.assert_close(one.stats[name], two.stats[name], rtol=0, atol=0)
    torch.testing.assert_close(one.received, two.received, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
def test_fused_epilogue_builds_where_a_compiler_exists():
    """CI has gcc: the fast path must really be in use there, not silently skipped."""
    assert cpu_fused.tile_stats() is not None


def test_fused_epilogue_can_be_disabled_and_survives_a_broken_compiler(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_fused, "tile_stats", cpu_fused.tile_stats.__wrapped__)  # no cache
    monkeypatch.setenv(cpu_fused.DISABLE_ENV, "0")
    assert cpu_fused.tile_stats() is None
    monkeypatch.delenv(cpu_fused.DISABLE_ENV)
    monkeypatch.setenv("CC", "false")  # exists, but fails: the build error becomes a warning
    monkeypatch.setattr(cpu_fused, "_cache_dir", lambda: tmp_path)
    with pytest.warns(RuntimeWarning, match="could not build"):
        assert cpu_fused.tile_stats() is None
