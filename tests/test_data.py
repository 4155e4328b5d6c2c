"""Dataset loaders: bundled sets, user files, packing, spans, bad files."""

import json

import pytest
import torch

from workbench.data import char_span_to_tokens, list_datasets, load_dataset
from workbench.errors import InputError


def test_induction_is_a_repeated_random_block(tiny_llama):
    batch = load_dataset("induction", tiny_llama, n=3)
    L = batch.meta[0]["repeat_period"]
    assert len(batch) == 3 and L == 50
    for row in batch.tokens:
        assert row[0] == tiny_llama.tokenizer.bos_token_id
        assert torch.equal(row[1:L + 1], row[L + 1:2 * L + 1])
    assert not torch.equal(batch.tokens[0], batch.tokens[1])
    assert load_dataset("induction", tiny_llama, seq_len=21).meta[0]["repeat_period"] == 10


def test_every_bundled_dataset_loads(tiny_llama):
    for name in list_datasets():
        batch = load_dataset(name, tiny_llama, n=2)
        assert len(batch) == 2 and batch.mask.any(1).all(), name


def test_calibration_packs_to_seq_len(tiny_llama):
    batch = load_dataset("calibration", tiny_llama, seq_len=64, n=4)
    assert batch.tokens.shape == (4, 64) and batch.mask.all()


def test_context_span_covers_the_context(tiny_llama):
    batch = load_dataset("context_qa", tiny_llama, n=1)
    item = batch.meta[0]
    t0, t1 = item["span"]
    decoded = tiny_llama.tokenizer.decode(batch.tokens[0, t0:t1])
    assert decoded.strip() == item["context"].strip()


def test_span_errors(tiny_llama):
    with pytest.raises(InputError, match="empty or outside"):
        char_span_to_tokens(tiny_llama, "hello world", 5, 5)
    with pytest.raises(InputError, match="empty or outside"):
        char_span_to_tokens(tiny_llama, "hello world", 3, 40)


def test_user_files(tiny_llama, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first paragraph here\n\nsecond one")
    assert len(load_dataset(str(txt), tiny_llama)) == 2
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(json.dumps({"prompt": "the fox"}) + "\n" + json.dumps({"text": "the dog", "x": 1}) + "\n")
    batch = load_dataset(str(jsonl), tiny_llama, seq_len=3)
    assert batch.tokens.shape[1] == 3 and batch.meta[1]["x"] == 1


@pytest.mark.parametrize("content,message", [
    ("", "empty dataset"),
    ("\n\n  \n", "empty dataset"),
])
def test_empty_files(tiny_llama, tmp_path, content, message):
    for suffix in (".txt", ".jsonl"):
        path = tmp_path / f"empty{suffix}"
        path.write_text(content)
        with pytest.raises(InputError, match=message):
            load_dataset(str(path), tiny_llama)


def test_bad_files(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        load_dataset(str(bad), tiny_llama)
    with pytest.raises(InputError, match="unknown dataset 'nope'"):
        load_dataset("nope", tiny_llama)
    with pytest.raises(InputError, match="seq-len"):
        load_dataset("calibration", tiny_llama, seq_len=100000)
