"""Patterns-mode capture: padding, subsets, persistence, result independent of the model."""

import pytest
import torch

from workbench.capture import Capture, capture
from workbench.errors import InputError

PROMPTS = ["the quick brown fox jumps over the lazy dog", "the dog", "capital of France is Paris"]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2", "tiny_bert"])
def test_padding_never_enters_statistics(fixture, request):
    model = request.getfixturevalue(fixture)
    together = capture(model, PROMPTS, keep_patterns=True, progress=False)
    for i, prompt in enumerate(PROMPTS):
        alone = capture(model, [prompt], keep_patterns=True, progress=False)
        n = int(alone.mask.sum())
        for name, rows in alone.row_stats.items():
            torch.testing.assert_close(together.row_stats[name][i, ..., :n], rows[0, ..., :n],
                                       atol=1e-5, rtol=1e-5, equal_nan=True, msg=name)
            tail = together.row_stats[name][i, ..., n:]
            assert (torch.isnan(tail) | (tail == 0)).all(), f"{name} has values on padding"
        torch.testing.assert_close(together.received[i, ..., :n], alone.received[0, ..., :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.pattern(1, 2, i), alone.pattern(1, 2, 0), atol=1e-5, rtol=1e-5)


def test_rows_sum_to_one_and_causal(tiny_llama):
    cap = capture(tiny_llama, PROMPTS, keep_patterns=True, progress=False)
    A = cap.pattern(0, 3, 0)
    torch.testing.assert_close(A.sum(-1), torch.ones(A.shape[0]))
    assert torch.all(A.triu(1) == 0)
    assert cap.tokens_of(1) == ["<s>", "t", "he", " dog"]


def test_layer_head_subset_and_errors(tiny_llama):
    cap = capture(tiny_llama, PROMPTS[:1], layers=[1], heads=[0, 2], keep_patterns=True, progress=False)
    assert cap.row_stats["entropy"].shape[1:3] == (1, 2)
    full = capture(tiny_llama, PROMPTS[:1], keep_patterns=True, progress=False)
    torch.testing.assert_close(cap.pattern(1, 2), full.pattern(1, 2))
    with pytest.raises(InputError, match="layer 0 was not captured"):
        cap.pattern(0, 0)
    with pytest.raises(InputError, match="layer index 7 out of range"):
        capture(tiny_llama, PROMPTS[:1], layers=[7], progress=False)
    with pytest.raises(InputError, match="head index 4 out of range"):
        capture(tiny_llama, PROMPTS[:1], heads=[4], progress=False)
    with pytest.raises(InputError, match="batch index 3 out of range"):
        full.pattern(0, 0, 3)


def test_bad_prompts(tiny_llama):
    with pytest.raises(InputError, match="empty prompt"):
        capture(tiny_llama, ["ok", "   "], progress=False)
    with pytest.raises(InputError, match="longer than the limit"):
        capture(tiny_llama, ["word " * 3000], progress=False)
    with pytest.raises(InputError, match="no prompts"):
        capture(tiny_llama, [], progress=False)


def test_save_load_roundtrip_without_model(tiny_bert, tmp_path):
    cap = capture(tiny_bert, PROMPTS, keep_patterns=True, progress=False)
    cap.save(tmp_path / "cap")
    loaded = Capture.load(tmp_path / "cap")
    assert not any(isinstance(v, torch.nn.Module) for v in vars(loaded).values())
    assert loaded.str_tokens == cap.str_tokens and loaded.causal is False
    for name in cap.row_stats:
        torch.testing.assert_close(loaded.row_stats[name], cap.row_stats[name], equal_nan=True)
    torch.testing.assert_close(loaded.pattern(1, 1, 2), cap.pattern(1, 1, 2))
    with pytest.raises(InputError, match="cannot read capture folder"):
        Capture.load(tmp_path / "missing")


def test_patterns_not_kept_by_default(tiny_llama):
    cap = capture(tiny_llama, PROMPTS, progress=False)
    assert cap.patterns is None
    with pytest.raises(Exception, match="kept neither patterns"):
        cap.pattern(0, 0)


@pytest.mark.parametrize("mode", ["patterns", "stats"])
def test_capture_under_interventions_in_both_modes(tiny_llama, mode):
    from workbench.interventions import parse_interventions

    spec = parse_interventions("L0H1:zero")
    plain = capture(tiny_llama, PROMPTS, mode=mode, progress=False)
    edited = capture(tiny_llama, PROMPTS, mode=mode, interventions=spec, progress=False)
    other = capture(tiny_llama, PROMPTS, mode="patterns" if mode == "stats" else "stats",
                    interventions=spec, progress=False)
    # layer 0 is upstream of nothing edited before it; layer 1 sees the ablated head's absence
    torch.testing.assert_close(edited.row_stats["entropy"][:, 0], plain.row_stats["entropy"][:, 0])
    assert not torch.allclose(edited.row_stats["entropy"][:, 1], plain.row_stats["entropy"][:, 1])
    torch.testing.assert_close(edited.row_stats["entropy"], other.row_stats["entropy"], atol=1e-5, rtol=1e-5)
