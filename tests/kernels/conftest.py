"""Shared fixtures for the kernels tests.

Triton runs on the CPU through its interpreter: TRITON_INTERPRET must be set before
``triton.jit`` decorates the kernels, i.e. before ``kernels.triton_launch`` is imported.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels.reference import reference_attention  # noqa: E402

# (B, Hq, Hkv, Nq, Nk, D, causal, padded)
CASES = {
    "gqa-causal-pad": (2, 4, 2, 37, 37, 32, True, True),
    "mha-causal-short-q": (1, 4, 4, 13, 70, 64, True, False),
    "gqa-bidir-pad": (2, 4, 2, 45, 45, 64, False, True),
    "generation-step": (1, 2, 1, 1, 53, 32, True, True),
    "gqa-bidir-odd": (1, 4, 2, 29, 29, 32, False, False),
}


def make_inputs(case: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Random q, k, v (logits scaled up so the maps are peaked) and the case's padding mask."""
    B, Hq, Hkv, Nq, Nk, D, causal, padded = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Nq, D, generator=g) * 2.0).to(dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g).to(dtype)
    mask = None
    if padded:
        mask = torch.ones(B, Nk, dtype=torch.bool)
        mask[0, :3] = False  # left padding
        if B > 1:
            mask[1, -2:] = False  # right padding (padded query rows)
            mask[1, 5] = False  # a hole
    return q, k, v, mask, causal


def truth_and_baseline(q, k, v, **kwargs):
    """fp64 truth and the reference computed at the input precision (PyTorch's own error)."""
    truth = reference_attention(q.double(), k.double(), v.double(), **kwargs)
    baseline = reference_attention(q, k, v, compute_dtype=q.dtype, **kwargs)
    return truth, baseline


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x.double(), nan=float("nan"), posinf=0.0, neginf=0.0)


def assert_within_precision(name, got, truth, baseline, rel_atol=1e-5):
    """|got - truth| <= 2 * |baseline - truth| + atol, atol scaled by the truth's magnitude.

    Infinite entries (lse of rows that see nothing) must match exactly; nothing may be NaN.
    """
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in result"
    assert torch.equal(torch.isinf(got), torch.isinf(truth.to(got.device))), f"{name}: inf pattern differs"
    truth64 = _finite(truth)
    err = (_finite(got.cpu()) - truth64).abs().max().item()
    base = (_finite(baseline.cpu()) - truth64).abs().max().item()
    atol = rel_atol * (1.0 + truth64.abs().max().item())
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x baseline {base:.3g} + {atol:.3g}"


def assert_stats_match(result, truth, baseline, rel_atol=1e-5):
    """Compare out, lse and every statistic of an AttentionStats against truth/baseline."""
    assert_within_precision("out", result.out, truth.out, baseline.out, rel_atol)
    assert result.lse.dtype == torch.float32
    assert_within_precision("lse", result.lse, truth.lse, baseline.lse, rel_atol)
    assert set(result.stats) == set(truth.stats)
    for name in truth.stats:
        assert result.stats[name].dtype == torch.float32, name
        assert_within_precision(name, result.stats[name], truth.stats[name], baseline.stats[name], rel_atol)


@pytest.fixture(autouse=True)
def _few_threads():
    """The CI box has 2 shared cores: keep torch from oversubscribing them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
