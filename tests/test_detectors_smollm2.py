"""Detectors on the real SmolLM2, cross-checked against TransformerLens and the definitions of docs/metrics.md §2."""

import pytest
import torch
from transformer_lens.head_detector import detect_head

from probes.detectors import Detectors
from probes.pattern_stats import PatternStats
from workbench.capture import capture
from workbench.data import load_dataset

pytestmark = pytest.mark.smollm2

TEXT = "The old lighthouse keeper walked along the cliff every evening, counting ships. " * 2


def test_row_masses_match_transformer_lens_head_detector(smollm2):
    """TL's "mul" score is our per-row target mass summed over rows, divided by all N rows."""
    batch = smollm2.tokenize([TEXT])
    cap = capture(smollm2, batch, progress=False)
    n = batch.tokens.shape[1]
    for tl_name, rows in [("previous_token_head", "prev_token_mass"), ("induction_head", "induction_mass"),
                          ("duplicate_token_head", "duplicate_mass")]:
        tl = detect_head(smollm2.bridge, TEXT, tl_name)
        ours = torch.nan_to_num(cap.row_stats[rows][0], nan=0.0).sum(-1) / n
        torch.testing.assert_close(ours, tl.float(), atol=1e-5, rtol=1e-4, msg=tl_name)


def test_detectors_match_the_metrics_definition_and_name_the_heads(smollm2):
    batch = load_dataset("induction", smollm2, n=4)
    cap = capture(smollm2, batch, keep_patterns=True, progress=False)
    det = Detectors().fit(cap)
    L = batch.meta[0]["repeat_period"]
    n = batch.tokens.shape[1]
    second_copy = torch.arange(L + 1, n)
    # docs/metrics.md §2 written out directly on the stored maps
    induction = torch.zeros(smollm2.n_layers, smollm2.n_heads)
    previous = torch.zeros(smollm2.n_layers, smollm2.n_heads)
    for layer in range(smollm2.n_layers):
        A = cap.patterns[layer]  # [B, H, N, N]
        induction[layer] = A[:, :, second_copy, second_copy - L + 1].mean(dim=(0, 2))
        previous[layer] = A[:, :, torch.arange(1, n), torch.arange(0, n - 1)].mean(dim=(0, 2))
    torch.testing.assert_close(torch.tensor(det.mean_["induction"]).float(), induction, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(det.mean_["previous_token"]).float(), previous, atol=1e-4, rtol=1e-4)
    top_induction = det.top_heads("induction", 3)
    top_previous = det.top_heads("previous_token", 3)
    assert top_induction[0][2] > 0.5, top_induction      # SmolLM2 has strong induction heads
    assert top_previous[0][2] > 0.5, top_previous        # and strong previous-token heads
    assert all(layer > 0 for layer, _, _ in top_induction)  # induction needs an earlier layer's help
    assert (det.ci_low_["induction"] <= det.mean_["induction"] + 1e-9).all()
    frame = PatternStats().fit(cap).to_frame()
    assert len(frame) == smollm2.n_layers * smollm2.n_heads * len(PatternStats.metrics)
