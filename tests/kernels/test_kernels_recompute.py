"""Received mass, tiles and thumbnails recomputed from the saved LSE vs the materialised map."""

from __future__ import annotations

import pytest
import torch

from conftest import make_inputs
from kernels import attention_thumbnail, attention_tile, attention_with_stats, received_mass, thumbnail_edges
from kernels.reference import reference_probs


def _map_and_lse(case):
    q, k, v, mask, causal = make_inputs(case)
    probs, _, _ = reference_probs(q.double(), k.double(), causal=causal, key_padding_mask=mask)
    lse = attention_with_stats(q, k, v, causal=causal, key_padding_mask=mask, backend="chunked").lse
    return q, k, mask, causal, probs, lse


@pytest.mark.parametrize("backend", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("case", ["gqa-causal-pad", "mha-causal-short-q", "gqa-bidir-pad"])
def test_received_mass_equals_column_sums(case, backend):
    q, k, mask, causal, probs, lse = _map_and_lse(case)
    col, col_norm = received_mass(q, k, lse, causal=causal, key_padding_mask=mask, backend=backend)
    expected = probs.sum(-2)
    assert col.shape == expected.shape and col.dtype == torch.float32
    torch.testing.assert_close(col.double(), expected, atol=2e-5, rtol=1e-5)
    # normaliser: number of real query rows that can see key j
    B, Hq, Nq, Nk = probs.shape
    pos = torch.arange(Nq) + (Nk - Nq)
    sees = (torch.arange(Nk)[None, :] <= pos[:, None]) if causal else torch.ones(Nq, Nk, dtype=torch.bool)
    sees = sees[None].expand(B, -1, -1)
    if mask is not None:
        sees = sees & mask[:, None, :] & mask[:, Nk - Nq :, None]
    n = sees.sum(1).double()[:, None, :]
    expected_norm = torch.where(n > 0, expected / n.clamp(min=1), 0.0)
    torch.testing.assert_close(col_norm.double(), expected_norm, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["gqa-causal-pad", "gqa-bidir-pad", "mha-causal-short-q"])
def test_tile_equals_slice_of_map(case):
    q, k, mask, causal, probs, lse = _map_and_lse(case)
    Nq, Nk = probs.shape[-2:]
    for b, h, qr, kr in [(0, 0, (0, Nq), (0, Nk)), (q.shape[0] - 1, 3, (2, 11), (1, 9)), (0, 1, (Nq - 1, Nq), (Nk - 5, Nk))]:
        tile = attention_tile(q, k, lse, head=h, batch_index=b, q_range=qr, k_range=kr, causal=causal, key_padding_mask=mask)
        assert tile.shape == (qr[1] - qr[0], kr[1] - kr[0]) and tile.dtype == torch.float32
        torch.testing.assert_close(tile.double(), probs[b, h, qr[0] : qr[1], kr[0] : kr[1]], atol=1e-6, rtol=1e-5)


def _pool(probs2d, size):
    re, ce = thumbnail_edges(probs2d.shape[0], size), thumbnail_edges(probs2d.shape[1], size)
    mx = torch.zeros(len(re) - 1, len(ce) - 1, dtype=probs2d.dtype)
    mean = torch.zeros_like(mx)
    for a in range(len(re) - 1):
        for c in range(len(ce) - 1):
            block = probs2d[re[a] : re[a + 1], ce[c] : ce[c + 1]]
            mx[a, c], mean[a, c] = block.max(), block.mean()
    return mx, mean


@pytest.mark.parametrize("size", [5, 16, 256])
@pytest.mark.parametrize("case", ["gqa-causal-pad", "gqa-bidir-pad", "mha-causal-short-q"])
def test_thumbnail_equals_pooled_map(case, size):
    q, k, mask, causal, probs, lse = _map_and_lse(case)
    b, h = q.shape[0] - 1, 1
    mx, mean = attention_thumbnail(q, k, lse, head=h, batch_index=b, size=size, causal=causal, key_padding_mask=mask)
    emx, emean = _pool(probs[b, h], size)
    assert mx.shape == (min(size, probs.shape[-2]), min(size, probs.shape[-1]))
    torch.testing.assert_close(mx.double(), emx, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean.double(), emean, atol=1e-6, rtol=1e-5)


def test_thumbnail_streams_in_aligned_tiles():
    """Tiles smaller than the map (several row and column groups) give the same pooled views."""
    from kernels.recompute import chunked_thumbnail

    q, k, mask, causal, probs, lse = _map_and_lse("gqa-causal-pad")
    mx, mean = chunked_thumbnail(q, k, lse, head=2, batch_index=1, size=9, key_padding_mask=mask, block_q=5, block_k=7)
    emx, emean = _pool(probs[1, 2], 9)
    torch.testing.assert_close(mx.double(), emx, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean.double(), emean, atol=1e-6, rtol=1e-5)


def test_thumbnail_edges_are_contiguous_and_cover():
    for n, size in [(37, 5), (256, 256), (10, 64), (1000, 7)]:
        e = thumbnail_edges(n, size)
        assert e[0] == 0 and e[-1] == n and len(e) == min(n, size) + 1
        assert all(b > a for a, b in zip(e[:-1], e[1:]))


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_padding_contributes_exactly_zero(backend):
    q, k, v, mask, causal = make_inputs("gqa-causal-pad")
    lse = attention_with_stats(q, k, v, key_padding_mask=mask, backend=backend).lse
    col, col_norm = received_mass(q, k, lse, key_padding_mask=mask, backend=backend)
    assert torch.all(col[~mask[:, None, :].expand_as(col)] == 0)  # padded keys receive nothing
    # padded query rows add nothing: dropping them from q changes no column sum
    q_real_only = q.clone()
    q_real_only[1, :, -2:] = 1e3  # garbage in the padded rows must not matter
    col2, _ = received_mass(q_real_only, k, lse, key_padding_mask=mask, backend=backend)
    assert torch.equal(col, col2)
    assert torch.isfinite(col_norm).all()
