"""App services of issue 10 on tiny-llama: the head card and the patching page's job."""

from __future__ import annotations

import pytest

from app.web.components_head_card import card_body
from app.web.services import head_card as card_svc
from app.web.services import patching as patch_svc
from workbench.errors import InputError

from app_support import run_job


def test_head_card_shows_what_the_head_writes(analysis, tiny_llama):
    from workbench.logit_attribution import components, vocab_contributions

    card = card_svc.head_card(analysis, 1, 2, target=" Mary", k=5)
    parts = components(tiny_llama, analysis.batch)
    effect = vocab_contributions(tiny_llama, parts.vectors[0, parts.head_index[1, 2]], parts.scale[0])
    assert card.promoted["value"].iloc[0] == pytest.approx(float(effect.max()), abs=1e-5)
    assert card.suppressed["value"].iloc[0] == pytest.approx(float(effect.min()), abs=1e-5)
    assert list(card.promoted["value"]) == sorted(card.promoted["value"], reverse=True)
    assert card.target_token == tiny_llama.tokenizer.decode(tiny_llama.tokenizer(" Mary", add_special_tokens=False)["input_ids"][:1])
    assert 1 <= card.target_rank <= tiny_llama.n_layers * tiny_llama.n_heads
    # layer 1 is the last of two: every partner writes into it from layer 0
    assert len(card.partners) and set(card.partners["role"]) == {"writer"} and set(card.partners["layer"]) == {0}
    assert set(card.scores["probe"]) <= set(analysis.frame["probe"])
    body = card_body(card, card_svc.thumbnail(analysis, 1, 2))
    assert "L1H2" in str(body) and "/heads?head=L0H" in str(body)
    with pytest.raises(InputError, match="out of range"):
        card_svc.head_card(analysis, 7, 0)


def test_head_query_in_the_address():
    assert card_svc.parse_head_query("?head=L9H3") == (9, 3)
    assert card_svc.parse_head_query("") is None
    with pytest.raises(InputError, match="L<layer>H<head>"):
        card_svc.parse_head_query("?head=nine")


def test_patching_job_tables_and_figures(ws, tiny_llama):
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupt = "When Mary and John went to the store, Mary gave a drink to"
    result = patch_svc.results(ws).get(run_job(ws, patch_svc.start_patching(
        ws, "tiny-llama", clean, corrupt, "Mary", "John", "logit_diff"))["key"])
    assert len(result.heads) == tiny_llama.n_layers * tiny_llama.n_heads
    n = len(tiny_llama.encode(clean))
    assert len(result.resid) == tiny_llama.n_layers * n
    changed = result.resid[(result.resid.layer == 0)].set_index("position")["recovery"]
    assert changed.max() == pytest.approx(1.0, abs=1e-5)   # the one changed token carries everything at layer 0
    heads, resid = patch_svc.figures(result)
    assert heads.data[0].z.shape == (tiny_llama.n_layers, tiny_llama.n_heads)
    assert resid.data[0].z.shape == (tiny_llama.n_layers, n)
    click = {"points": [{"customdata": [1, 3, 0]}]}
    assert patch_svc.head_of_click(click) == (1, 3)
    assert patch_svc.head_of_click({"points": [{"customdata": [1, -1, -2]}]}) is None
    assert "clean" in patch_svc.summary(result)


def test_patching_form_is_checked_before_any_model_work(ws):
    with pytest.raises(InputError, match="empty corrupted prompt"):
        patch_svc.start_patching(ws, "tiny-llama", "a b", "", "x", "y", "logit_diff")
    with pytest.raises(InputError, match="distractor"):
        patch_svc.start_patching(ws, "tiny-llama", "a b", "a c", "x", "", "logit_diff")
    with pytest.raises(InputError, match="unknown metric"):
        patch_svc.start_patching(ws, "tiny-llama", "a b", "a c", "x", "y", "nope")
    example = patch_svc.ioi_example(0)
    assert {"prompt", "corrupt_prompt", "answer", "distractor"} <= set(example)
