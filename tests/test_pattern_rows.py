"""Per-row statistics of a materialised map against a plain per-element loop."""

import math

import pytest
import torch

from workbench.pattern_rows import detector_rows, map_received_mass as received_mass, map_row_statistics as row_statistics


def _random_pattern(B, H, N, mask, causal, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, N, N, generator=g) * 3
    allowed = mask[:, None, None, :].expand(B, H, N, N).clone()
    if causal:
        allowed &= torch.ones(N, N, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)


def _loop_stats(A, mask, causal, w=8):
    """Straightforward per-element definitions of docs/metrics.md §1 (independent implementation)."""
    B, H, N, _ = A.shape
    out = {k: torch.zeros(B, H, N) for k in ["entropy", "entropy_normalized", "max_weight", "first1_mass",
                                             "first4_mass", "prev_token_mass", "self_mass", "local_mass",
                                             "mean_distance"]}
    for b in range(B):
        for h in range(H):
            for i in range(N):
                if not mask[b, i]:
                    continue
                keys = [j for j in range(N) if mask[b, j] and (j <= i or not causal)]
                p = {j: float(A[b, h, i, j]) for j in keys}
                ent = -sum(v * math.log(v) for v in p.values() if v > 0)
                out["entropy"][b, h, i] = ent
                out["entropy_normalized"][b, h, i] = ent / math.log(len(keys)) if len(keys) > 1 else 0.0
                out["max_weight"][b, h, i] = max(p.values())
                out["first1_mass"][b, h, i] = p.get(0, 0.0)
                out["first4_mass"][b, h, i] = sum(p.get(j, 0.0) for j in range(4))
                out["prev_token_mass"][b, h, i] = p.get(i - 1, 0.0) if i > 0 else 0.0
                out["self_mass"][b, h, i] = p.get(i, 0.0)
                out["local_mass"][b, h, i] = sum(v for j, v in p.items() if abs(i - j) <= w)
                out["mean_distance"][b, h, i] = sum(v * abs(i - j) for j, v in p.items())
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_row_statistics_match_loop_definitions(causal):
    mask = torch.tensor([[1] * 13, [1] * 9 + [0] * 4], dtype=torch.bool)
    A = _random_pattern(2, 3, 13, mask, causal)
    ours = row_statistics(A, mask, causal=causal)
    ref = _loop_stats(A, mask, causal)
    for name, value in ref.items():
        torch.testing.assert_close(ours[name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_received_mass_normalises_by_queries_that_can_see_the_key():
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    A = _random_pattern(1, 1, 5, mask, True)
    raw, norm = received_mass(A, mask, causal=True)
    torch.testing.assert_close(raw[0, 0, :4], A[0, 0, :4, :4].sum(0))
    torch.testing.assert_close(norm[0, 0, :4], raw[0, 0, :4] / torch.tensor([4.0, 3.0, 2.0, 1.0]))
    assert raw[0, 0, 4] == 0 and norm[0, 0, 4] == 0


def test_detector_rows_on_repeated_block():
    block = torch.tensor([5, 9, 7, 3])
    tokens = torch.cat([torch.tensor([1]), block, block])[None]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    N, L = tokens.shape[1], 4
    A = torch.zeros(1, 1, N, N)
    for i in range(N):  # a perfect induction head: attend to i - L + 1 in the second copy
        A[0, 0, i, i - L + 1 if i > L else 0] = 1.0
    rows = detector_rows(A, tokens, mask)
    assert torch.isnan(rows["induction_mass"][0, 0, : L + 1]).all()
    torch.testing.assert_close(rows["induction_mass"][0, 0, L + 1:], torch.ones(L))
    assert torch.isnan(rows["duplicate_mass"][0, 0, : L + 1]).all()
    torch.testing.assert_close(rows["duplicate_mass"][0, 0, L + 1:], torch.zeros(L))


def test_row_labels_never_crowd_each_other():
    """The strongest keys of a long row are labelled only where their labels cannot overlap."""
    from app.web.services.patterns import spaced_labels

    top = [(0, "<s>", 0.9), (668, " letting", 0.014), (670, " sleep", 0.009), (581, ".", 0.006), (663, " returned", 0.005)]
    assert spaced_labels(top, 675) == ["0:'<s>'", "668:' letting'", "", "581:'.'", ""]
    assert spaced_labels(top, 675, count=1) == ["0:'<s>'", "", "", "", ""]
    assert spaced_labels(top[1:3], 10) == ["668:' letting'", "670:' sleep'"]  # zoomed in: room for both
