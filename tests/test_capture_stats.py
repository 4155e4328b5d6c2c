"""Stats-mode capture (recompute kernels) against patterns mode (materialised maps)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from probes.detectors import Detectors
from probes.pattern_stats import PatternStats
from workbench import capture_stats as capture_stats_module
from workbench.attention_backend import STATE
from workbench.capture import Capture, capture
from workbench.errors import InputError
from workbench.pattern_rows import DETECTOR_ROWS, STAT_NAMES, detector_rows
from workbench.recompute import detector_rows_from_qk, thumbnail_from_capture, tile_from_capture, token_groups

PROMPTS = [
    "The quick brown fox jumps over the lazy dog near the river bank. The quick brown fox jumps again.",
    "One two three four five six seven. One two three four five six seven.",
    "Mary and John went to the store.",
]
MODELS = ["tiny_llama", "tiny_gpt2", "tiny_bert"]


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=True)


def assert_same_capture(stats: Capture, patterns: Capture, tol: float = 1e-5) -> None:
    assert stats.mode == "stats" and patterns.mode == "patterns"
    assert stats.layers == patterns.layers and stats.heads == patterns.heads
    for name in STAT_NAMES + DETECTOR_ROWS:
        close(stats.row_stats[name], patterns.row_stats[name], tol)
    close(stats.received, patterns.received, tol)
    close(stats.received_normalized, patterns.received_normalized, tol)


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    """(model, batch, patterns capture with maps, stats capture with Q/K) on a padded batch."""
    model = request.getfixturevalue(request.param)
    batch = model.tokenize(PROMPTS)
    assert len(set(batch.lengths.tolist())) == 3  # three different lengths: padding is exercised
    patterns = capture(model, batch, mode="patterns", keep_patterns=True, progress=False)
    stats = capture(model, batch, mode="stats", keep_qk=True, progress=False, batch_size=2)
    return model, batch, patterns, stats


def test_stats_mode_equals_patterns_mode(pair):
    _, batch, patterns, stats = pair
    assert_same_capture(stats, patterns)
    # the detector rows are defined somewhere (repeated tokens) and undefined elsewhere
    assert torch.isfinite(stats.row_stats["duplicate_mass"]).any()
    assert torch.isnan(stats.row_stats["induction_mass"]).any()
    assert (stats.row_stats["entropy"][~batch.mask[:, None, None, :].expand_as(stats.row_stats["entropy"])] == 0).all()


def test_head_subset_and_gqa_mapping(tiny_llama):
    batch = tiny_llama.tokenize(PROMPTS)
    kwargs = dict(layers=[1], heads=[1, 2], progress=False)  # heads 1, 2 use different KV heads
    patterns = capture(tiny_llama, batch, mode="patterns", **kwargs)
    stats = capture(tiny_llama, batch, mode="stats", keep_qk=True, batch_size=1, **kwargs)
    assert_same_capture(stats, patterns)
    full = capture(tiny_llama, batch, mode="patterns", keep_patterns=True, progress=False)
    close(stats.pattern(1, 2, 1), full.pattern(1, 2, 1))
    assert stats.extras["q.1"].shape[1] == 2 and stats.extras["k.1"].shape[1] == tiny_llama.n_kv_heads


def test_forward_stops_after_the_last_selected_layer(tiny_gpt2, monkeypatch):
    import kernels

    calls = []
    original = kernels.attention_with_stats

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    batch = tiny_gpt2.tokenize(PROMPTS)
    patterns = capture(tiny_gpt2, batch, mode="patterns", layers=[0], progress=False)
    monkeypatch.setattr(kernels, "attention_with_stats", counting)
    stats = capture(tiny_gpt2, batch, mode="stats", layers=[0], batch_size=2, progress=False)
    assert len(calls) == 2  # one attention call per chunk: layer 1 never ran
    assert_same_capture(stats, patterns)


def test_induction_rows_on_repeated_random_tokens(tiny_llama):
    from workbench.data import load_dataset

    batch = load_dataset("induction", tiny_llama, n=2, seq_len=40)
    patterns = capture(tiny_llama, batch, mode="patterns", progress=False)
    stats = capture(tiny_llama, batch, mode="stats", progress=False)
    assert torch.isfinite(stats.row_stats["induction_mass"]).sum() > 0
    assert_same_capture(stats, patterns)


def test_probe_tables_match(pair):
    _, _, patterns, stats = pair
    for probe in (PatternStats, Detectors):
        a, b = probe().fit(stats).to_frame(), probe().fit(patterns).to_frame()
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-5)


def test_tiles_and_thumbnails_equal_the_map(pair):
    model, batch, patterns, stats = pair
    layer, head = model.n_layers - 1, model.n_heads - 1
    for b, n in enumerate(batch.lengths.tolist()):
        full = patterns.pattern(layer, head, b)
        close(stats.pattern(layer, head, b), full)
        close(tile_from_capture(stats, layer, head, b, (2, n - 1), (1, n // 2)), full[2:n - 1, 1:n // 2])
        for size, q_range, k_range in ((5, None, None), (n, None, None), (3, (1, n), (0, n - 2))):
            mx, mean = thumbnail_from_capture(stats, layer, head, b, size, q_range=q_range, k_range=k_range)
            region = full[slice(*(q_range or (0, n))), slice(*(k_range or (0, n)))]
            close(mx, _pool(region, size, "max"))
            close(mean, _pool(region, size, "mean"))


def _pool(region: torch.Tensor, size: int, how: str) -> torch.Tensor:
    """Reference pooling with the bin edges floor(t * n / bins)."""
    def edges(n):
        bins = min(size, n)
        return [t * n // bins for t in range(bins + 1)]
    re, ce = edges(region.shape[0]), edges(region.shape[1])
    out = torch.zeros(len(re) - 1, len(ce) - 1)
    for i in range(len(re) - 1):
        for j in range(len(ce) - 1):
            cell = region[re[i]:re[i + 1], ce[j]:ce[j + 1]]
            out[i, j] = cell.max() if how == "max" else cell.mean()
    return out


def test_recompute_errors(pair):
    model, batch, patterns, stats = pair
    lean = capture(model, batch.select([0]), mode="stats", progress=False)
    with pytest.raises(InputError, match="keep_qk=True"):
        tile_from_capture(lean, 0, 0, 0, (0, 2), (0, 2))
    with pytest.raises(InputError, match="keep_qk=True"):
        thumbnail_from_capture(patterns, 0, 0, 0)
    n = int(batch.lengths[2])
    with pytest.raises(InputError, match="outside the sample"):
        tile_from_capture(stats, 0, 0, 2, (0, n + 1), (0, 2))
    with pytest.raises(InputError, match="size"):
        thumbnail_from_capture(stats, 0, 0, 0, 0)


def test_saved_stats_capture_roundtrip(pair, tmp_path):
    model, batch, _, stats = pair
    loaded = Capture.load(stats.save(tmp_path / "cap"))
    close(loaded.pattern(0, 1, 0), stats.pattern(0, 1, 0))


def test_fwd_hooks_fire_in_stats_mode(tiny_llama):
    """One model, one forward: TransformerLens hooks observe a stats capture too (hook_z, hook_v)."""
    seen = []
    hooks = [(f"blocks.0.attn.hook_{site}", lambda x, hook: seen.append(hook.name) or x) for site in ("z", "v")]
    capture(tiny_llama, PROMPTS[:1], mode="stats", fwd_hooks=hooks, progress=False)
    assert len(seen) == 2


def test_no_leftover_state_after_an_error(tiny_llama, monkeypatch):
    batch = tiny_llama.tokenize(PROMPTS)
    before = capture(tiny_llama, batch, mode="stats", progress=False)

    def broken(*args, **kwargs):
        raise RuntimeError("recorder failed")

    with monkeypatch.context() as patch:
        patch.setattr(capture_stats_module, "detector_rows_from_qk", broken)
        with pytest.raises(RuntimeError, match="recorder failed"):
            capture(tiny_llama, batch, mode="stats", progress=False)
    assert STATE.get() is None
    # outside the call the model is the plain bridge again
    with torch.no_grad():
        logits = tiny_llama.bridge.original_model(input_ids=batch.tokens[:1], attention_mask=batch.mask[:1].long()).logits
    close(logits, tiny_llama.run(batch.select([0])), 1e-4)
    after = capture(tiny_llama, batch, mode="stats", progress=False)
    for name in STAT_NAMES + DETECTOR_ROWS:
        torch.testing.assert_close(after.row_stats[name], before.row_stats[name], rtol=0, atol=0, equal_nan=True)


def test_detector_gather_matches_materialised_map(monkeypatch):
    """Exact at target pairs, including the chunked paths for large token groups."""
    torch.manual_seed(0)
    n, H, d = 70, 3, 8
    tokens = torch.randint(0, 6, (n,))
    tokens[40:] = 2  # one big group of repeated tokens
    q, k = torch.randn(H, n, d), torch.randn(H, n, d)
    scores = (q @ k.transpose(1, 2)) * 0.3
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    expected = detector_rows(torch.softmax(scores, -1)[None], tokens[None], torch.ones(1, n, dtype=torch.bool))
    from workbench import recompute

    for rows, elements in ((recompute._ROWS, recompute._ELEMENTS), (3, 64), (5, 1)):
        monkeypatch.setattr(recompute, "_ROWS", rows)
        monkeypatch.setattr(recompute, "_ELEMENTS", elements)
        got = detector_rows_from_qk(q, k, lse, token_groups(tokens), 0.3)
        for name in DETECTOR_ROWS:
            close(got[name], expected[name][0])


@pytest.mark.smollm2
def test_smollm2_stats_mode_equals_patterns_mode(smollm2):
    from workbench.data import load_dataset

    batch = load_dataset("calibration", smollm2, seq_len=256, n=1)
    assert batch.tokens.shape == (1, 256)
    patterns = capture(smollm2, batch, mode="patterns", progress=False)
    stats = capture(smollm2, batch, mode="stats", progress=False)
    assert len(stats.layers) * len(stats.heads) == 270
    assert_same_capture(stats, patterns, tol=1e-4)


def test_interventions_apply_in_stats_mode(tiny_llama):
    from workbench.interventions import parse_interventions

    batch = tiny_llama.tokenize(PROMPTS)
    edits = parse_interventions("L0H1:zero, L0H3:scale=2")
    patterns = capture(tiny_llama, batch, mode="patterns", interventions=edits, progress=False)
    stats = capture(tiny_llama, batch, mode="stats", interventions=edits, progress=False)
    assert_same_capture(stats, patterns)
    clean = capture(tiny_llama, batch, mode="stats", progress=False)
    assert (clean.row_stats["entropy"][:, 1] - stats.row_stats["entropy"][:, 1]).abs().max() > 1e-4
    assert stats.info["interventions"] == edits.text


@pytest.mark.parametrize("mode", ["patterns", "stats"])
def test_capture_without_detector_rows(pair, mode):
    """``detectors=False`` drops only the detector rows; the Detectors probe then names the fix."""
    model, batch, patterns, stats = pair
    full = stats if mode == "stats" else patterns
    lean = capture(model, batch, mode=mode, progress=False, detectors=False)
    assert not set(DETECTOR_ROWS) & set(lean.row_stats)
    for name in STAT_NAMES:
        close(lean.row_stats[name], full.row_stats[name])
    close(lean.received, full.received)
    assert Detectors(["previous_token"]).fit(lean).mean_["previous_token"].shape == (model.n_layers, model.n_heads)
    with pytest.raises(InputError, match="detectors=True"):
        Detectors(["induction"]).fit(lean)
