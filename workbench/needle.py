"""Needle-in-a-haystack samples for the long-context probes (docs/metrics.md §10).

Two sources, one sample layout (token positions in ``meta``):

- :func:`generate_needles` (``--dataset needle``): a haystack cut from the bundled calibration text
  (repeated when the length asks for more), a needle sentence ``"One of the special magic numbers
  for {key} is: {value}."`` with a random 7-digit value inserted at a sentence end near the chosen
  depth, then the question, then the answer ``" {value}"`` appended (teacher-forced);
- :func:`needle_jsonl` (a ``.jsonl`` of ``{"prompt", "needle", "answer"}``): ``prompt`` verbatim,
  ``needle`` located by its first occurrence in it, ``answer`` tokenized on its own (no special
  tokens) and appended to the prompt's tokens.

Each sample's ``meta`` holds ``kind="needle"``, ``needle_span [t0, t1)`` (token offsets of the
needle), ``answer_span [a0, a1)`` (the appended answer tokens; ``a0`` = prompt length),
``answer`` (text), ``depth`` (share of the haystack before the needle; for a ``.jsonl`` item the
prompt tokens before the needle over the prompt length; generated samples also keep the requested
``target_depth``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from workbench.batch import TokenBatch, pad_sequences
from workbench.errors import InputError

NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = ("\n\nWhat is the special magic number for {key} mentioned in the provided text? "
            "The special magic number for {key} mentioned in the provided text is:")
ANSWER = " {value}"
_KEYS = ("quiet-river", "amber-falcon", "silver-orchard", "hollow-lantern", "crimson-harbor", "velvet-meadow",
         "copper-summit", "misty-canyon", "golden-thicket", "frozen-lagoon", "scarlet-bridge", "wandering-pine")
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_SEQ_LEN = 1024


def depths_for(n: int) -> list[float]:
    """``n`` depths spread evenly over 10–90 % (one sample: 50 %)."""
    if n == 1:
        return [0.5]
    return [round(0.1 + 0.8 * i / (n - 1), 4) for i in range(n)]


def _plain(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(model) -> list[int]:
    bos = model.tokenizer.bos_token_id
    return [bos] if bos is not None and model.causal else []


def _build(model, sequences: list[torch.Tensor], meta: list[dict], beyond_context: bool) -> TokenBatch:
    if not beyond_context:
        return model.batch_from_ids(sequences, meta)
    tokens, mask = pad_sequences(sequences, model.pad_id)  # lengths past n_ctx: timing / extrapolation runs only
    return TokenBatch(tokens, mask, meta)


def generate_needles(model, haystack_file: Path, *, n: int | None = None, seq_len: int | None = None,
                     seed: int | None = None, depths: list[float] | None = None,
                     beyond_context: bool = False) -> TokenBatch:
    """The bundled needle set (module docstring): ``n`` samples (default 5) of ``seq_len`` tokens
    (default 1024) each, depths spread over 10–90 % unless ``depths`` are given.

    Raises:
        InputError: a length too short for question, needle and some haystack, or past the context.
    """
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if depths is None:
        depths = depths_for(n or len(DEFAULT_DEPTHS)) if n else list(DEFAULT_DEPTHS)
    if any(not 0 <= d <= 1 for d in depths):
        raise InputError(f"needle depths must be in [0, 1], got {depths}")
    if seq_len > model.n_ctx and not beyond_context:
        raise InputError(f"--seq-len {seq_len} exceeds the model context ({model.n_ctx}): lower it")
    text = haystack_file.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    hay = _plain(model, "\n\n".join(paragraphs))
    rng = random.Random(0 if seed is None else seed)
    sequences, meta = [], []
    for i, depth in enumerate(depths):
        key, value = rng.choice(_KEYS), str(rng.randrange(1_000_000, 10_000_000))
        needle = _plain(model, " " + NEEDLE.format(key=key, value=value))
        question = _plain(model, QUESTION.format(key=key))
        answer = _plain(model, ANSWER.format(value=value))
        front = _bos(model)
        room = seq_len - len(front) - len(needle) - len(question) - len(answer)
        if room < 16:
            need = seq_len - room + 16
            raise InputError(f"--seq-len {seq_len} is too short for a needle sample: use at least {need}")
        start = (i * 997) % len(hay)  # a different stretch of haystack per sample
        body = [hay[(start + t) % len(hay)] for t in range(room)]
        at = _sentence_end(model, body, round(depth * room), reach=max(1, min(64, room // 20)))
        ids = front + body[:at] + needle + body[at:] + question
        t0 = len(front) + at
        a0 = len(ids)
        ids = ids + answer
        meta.append({"kind": "needle", "needle_span": [t0, t0 + len(needle)], "answer_span": [a0, a0 + len(answer)],
                     "answer": value, "needle": NEEDLE.format(key=key, value=value), "key": key,
                     "target_depth": depth, "depth": round(at / room, 4)})
        sequences.append(torch.tensor(ids))
    return _build(model, sequences, meta, beyond_context)


def _sentence_end(model, body: list[int], at: int, reach: int = 64) -> int:
    """The position just after the sentence-ending token nearest to ``at`` (within ``reach``
    tokens either side; ``at`` itself when there is none)."""
    for step in range(reach + 1):
        for pos in (at - step, at + step):
            if 0 < pos <= len(body) and model.tokenizer.decode(body[pos - 1:pos]).rstrip().endswith((".", "!", "?")):
                return pos
    return at


def is_needle_jsonl(path: Path) -> bool:
    """True when the first item of a ``.jsonl`` file has a ``needle`` field."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                item = json.loads(line)
            except ValueError:
                return False
            return isinstance(item, dict) and "needle" in item
    return False


def needle_jsonl(path: Path, model, *, seq_len: int | None = None) -> TokenBatch:
    """Samples from a ``.jsonl`` of ``{"prompt", "needle", "answer"}`` (module docstring).

    Raises:
        InputError: a missing/non-string field, a needle not in its prompt, an empty answer, or a
            sample longer than ``seq_len`` / the model context.
    """
    from workbench.data import char_span_to_tokens, jsonl_objects

    sequences, meta = [], []
    for number, item in jsonl_objects(path):
        where = f"{path} line {number}"
        for field in ("prompt", "needle", "answer"):
            if not isinstance(item.get(field), str):
                raise InputError(f"{where} needs a string '{field}': needle items are "
                                 '{"prompt": ..., "needle": ..., "answer": ...}')
        prompt, needle, answer = item["prompt"], item["needle"], item["answer"]
        if not needle:
            raise InputError(f"{where}: the needle is empty: give the sentence the answer is in")
        start = prompt.find(needle)
        if start < 0:
            raise InputError(f"{where}: the needle is not in the prompt: copy it verbatim from the prompt")
        answer_ids = _plain(model, answer) if answer.strip() else []
        if not answer_ids:
            raise InputError(f"{where}: the answer is empty: give the text the model should produce")
        prompt_ids = model.encode(prompt).tolist()
        t0, t1 = char_span_to_tokens(model, prompt, start, start + len(needle))
        ids = prompt_ids + answer_ids
        limit = model.n_ctx if seq_len is None else min(seq_len, model.n_ctx)
        if len(ids) > limit:
            raise InputError(f"{where}: prompt + answer take {len(ids)} tokens, more than {limit}: shorten the prompt")
        a0 = len(prompt_ids)
        meta.append(dict(item, kind="needle", needle_span=[t0, t1], answer_span=[a0, a0 + len(answer_ids)],
                         depth=round(t0 / a0, 4)))
        sequences.append(torch.tensor(ids))
    if not sequences:
        raise InputError(f"empty dataset: {path} has no items")
    return model.batch_from_ids(sequences, meta)
