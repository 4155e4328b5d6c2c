"""Dataset loaders: bundled prompt sets in ``datasets/`` and user ``.txt``/``.jsonl`` files.

Every loader returns a :class:`TokenBatch` whose ``meta`` keeps each item's fields (answer,
distractor, marked context span as token offsets ``span``...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from workbench.batch import TokenBatch
from workbench.errors import InputError
from workbench.model import HookedModel

BUNDLED = {
    "induction": "induction.json",
    "calibration": "calibration.txt",
    "heldout": "heldout.txt",
    "factual": "factual.jsonl",
    "ioi": "ioi.jsonl",
    "context_qa": "context_qa.jsonl",
    "needle": "calibration.txt",  # haystack of the generated needle set (workbench.needle)
}
QA_TEMPLATE = "{context}\n\nQuestion: {question}\nAnswer:"
QA_NO_CONTEXT = "Question: {question}\nAnswer:"


def datasets_dir() -> Path:
    """The bundled data folder (``$WORKBENCH_DATASETS`` overrides)."""
    env = os.environ.get("WORKBENCH_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "datasets"


def list_datasets() -> list[str]:
    """Names of the bundled datasets."""
    return sorted(BUNDLED)


def dataset_source(name_or_path: str) -> tuple[Path, str]:
    """``(file, name)`` of a bundled name or a ``.txt``/``.jsonl`` path, checked without a model.

    Raises:
        InputError: unknown name, missing file, or an unsupported suffix.
    """
    if name_or_path in BUNDLED:
        return datasets_dir() / BUNDLED[name_or_path], name_or_path
    path = Path(str(name_or_path)).expanduser()
    if not path.is_file():
        raise InputError(f"unknown dataset '{name_or_path}': use one of {', '.join(list_datasets())} "
                         "or the path of a .txt/.jsonl file")
    if path.suffix not in (".txt", ".jsonl"):
        raise InputError(f"dataset file {path} must end in .txt or .jsonl")
    _check_utf8(path)
    return path, path.name


def _check_utf8(path: Path) -> None:
    """Refuse a file that is not UTF-8 text (a binary file), read in 1 MiB chunks."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                decoder.decode(chunk)
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        raise InputError(f"dataset file {path} is not UTF-8 text (byte {offset + err.start} cannot be decoded): "
                         "give a .txt/.jsonl text file saved as UTF-8") from None
    except OSError as err:
        raise InputError(f"cannot read dataset file {path} ({err.strerror}): check the path and its permissions") from None


def load_dataset(name_or_path: str, model: HookedModel, *, n: int | None = None,
                 seq_len: int | None = None, seed: int | None = None) -> TokenBatch:
    """Load a bundled dataset by name, or a ``.txt``/``.jsonl`` file, tokenized for ``model``.

    Args:
        name_or_path: a name from :func:`list_datasets` or a file path.
        n: keep at most this many sequences.
        seq_len: token length: text is packed into windows of this length (``.txt``,
            calibration) or truncated (prompts); for ``induction`` and ``needle`` the total length
            (``needle``: prompt + appended answer, default 1024; a needle ``.jsonl`` is an upper bound).
        seed: overrides the induction spec's seed (``needle``: the random keys and values).

    Raises:
        InputError: unknown name, missing/empty file, malformed line, bad ``n``/``seq_len``.
    """
    if n is not None and n < 1:
        raise InputError(f"n={n}: ask for at least one sequence")
    if seq_len is not None and not 2 <= seq_len <= model.n_ctx:
        raise InputError(f"--seq-len {seq_len} must be between 2 and the model context ({model.n_ctx})")
    path, name = dataset_source(name_or_path)
    from workbench import needle

    if name_or_path == "needle":
        batch = needle.generate_needles(model, path, n=n, seq_len=seq_len, seed=seed)
    elif path.suffix == ".jsonl" and needle.is_needle_jsonl(path):
        batch = needle.needle_jsonl(path, model, seq_len=seq_len)
    elif path.suffix == ".json":
        batch = _repeated_random(json.loads(path.read_text()), model, seq_len, seed)
    elif path.suffix == ".txt":
        batch = _text_file(path, model, seq_len)
    elif path.suffix == ".jsonl":
        batch = _jsonl_file(path, model, seq_len)
    else:
        raise InputError(f"dataset file {path} must end in .txt or .jsonl")
    if n is not None:
        batch = batch.select(slice(0, n))
    for item in batch.meta:
        item.setdefault("dataset", name)
    return batch


def _repeated_random(spec: dict, model: HookedModel, seq_len: int | None, seed: int | None) -> TokenBatch:
    """Random token blocks repeated ``repeats`` times (the induction task)."""
    repeats = int(spec.get("repeats", 2))
    bos = model.tokenizer.bos_token_id if spec.get("prepend_bos", True) and model.causal else None
    if seq_len is not None:
        block = (seq_len - (bos is not None)) // repeats
    else:
        block = int(spec["block_len"])
    if block < 2:
        raise InputError(f"--seq-len too short for repeated blocks: need at least {2 * repeats + 1}")
    if block * repeats + (bos is not None) > model.n_ctx:
        raise InputError(f"induction sequences of {block * repeats} tokens exceed the model context {model.n_ctx}: "
                         "lower --seq-len")
    special = set(model.tokenizer.all_special_ids) if spec.get("exclude_special_tokens", True) else set()
    vocab = torch.tensor([i for i in range(len(model.tokenizer)) if i not in special])
    generator = torch.Generator().manual_seed(int(spec.get("seed", 0) if seed is None else seed))
    sequences, meta = [], []
    for _ in range(int(spec["n_sequences"])):
        ids = vocab[torch.randint(len(vocab), (block,), generator=generator)].repeat(repeats)
        if bos is not None:
            ids = torch.cat([torch.tensor([bos]), ids])
        sequences.append(ids)
        meta.append({"kind": "induction", "repeat_period": block, "first_copy_start": int(bos is not None)})
    return model.batch_from_ids(sequences, meta)


def _text_file(path: Path, model: HookedModel, seq_len: int | None) -> TokenBatch:
    """Paragraphs (blank-line separated) as samples, or the packed token stream when ``seq_len``."""
    text = path.read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise InputError(f"empty dataset: {path} has no text")
    if seq_len is None:
        return model.tokenize(paragraphs, meta=[{"text": p} for p in paragraphs])
    return _pack(model, "\n\n".join(paragraphs), seq_len)


def _pack(model: HookedModel, text: str, seq_len: int) -> TokenBatch:
    """Cut the token stream of ``text`` into windows of ``seq_len`` (BOS first for decoders)."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = model.tokenizer.bos_token_id if model.causal else None
    body = seq_len - (bos is not None)
    windows = [ids[i:i + body] for i in range(0, len(ids), body)]
    windows = [w for w in windows if len(w) == body] or windows[:1]
    sequences = [torch.tensor(([bos] if bos is not None else []) + w) for w in windows]
    return model.batch_from_ids(sequences, [{"packed": True} for _ in sequences])


def jsonl_objects(path: Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a ``.jsonl`` file.

    Raises:
        InputError: a line that is not valid JSON or not a JSON object (naming the line).
    """
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as err:
            raise InputError(f"{path} line {number} is not valid JSON ({err}): fix or remove it") from None
        if not isinstance(item, dict):
            raise InputError(f"{path} line {number} must be a JSON object")
        items.append((number, item))
    return items


def _jsonl_file(path: Path, model: HookedModel, seq_len: int | None) -> TokenBatch:
    items = [item for _, item in jsonl_objects(path)]
    if not items:
        raise InputError(f"empty dataset: {path} has no items")
    prompts, meta = [], []
    for number, item in enumerate(items, start=1):
        for key in _TEXT_FIELDS:
            if key in item and not isinstance(item[key], str):
                raise InputError(f"{path} item {number}: field '{key}' must be a string, got "
                                 f"{type(item[key]).__name__}: quote it")
        if "context" in item and "question" in item:
            text = QA_TEMPLATE.format(**item)
            item = dict(item, no_context_prompt=QA_NO_CONTEXT.format(**item),
                        char_span=[0, len(item["context"])])
        else:
            text = item.get("prompt", item.get("text"))
            if not isinstance(text, str):
                raise InputError(f"{path} item {number} has no 'prompt' or 'text' string field")
        prompts.append(text)
        meta.append(dict(item, prompt=text))
    sequences = [_encode_truncated(model, p, seq_len) for p in prompts]
    for item, prompt, ids in zip(meta, prompts, sequences):
        if "char_span" in item:
            item["span"] = list(char_span_to_tokens(model, prompt, *item["char_span"]))
    return model.batch_from_ids(sequences, meta)


_TEXT_FIELDS = ("prompt", "text", "context", "question", "answer", "distractor", "corrupt_prompt")


def _encode_truncated(model: HookedModel, text: str, seq_len: int | None) -> torch.Tensor:
    """Ids of one prompt, cut to its first ``seq_len`` tokens when given (else refused past the context)."""
    return model.encode(text, max_tokens=seq_len, truncate=seq_len is not None)


def char_span_to_tokens(model: HookedModel, text: str, start: int, end: int) -> tuple[int, int]:
    """Token offsets ``[t0, t1)`` (in :meth:`HookedModel.encode` positions) covering the
    characters ``text[start:end]``.

    Raises:
        InputError: empty span, or a span outside the text.
    """
    if not 0 <= start < end <= len(text):
        raise InputError(f"context span [{start}, {end}) is empty or outside the prompt of {len(text)} "
                         "characters: mark a non-empty span inside the text")
    ids = model.encode(text)
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    plain = enc["input_ids"]
    # special tokens the model adds in front (BOS / CLS): find where the plain ids start
    front = next((f for f in range(len(ids) - len(plain) + 1) if ids[f:f + len(plain)].tolist() == plain), 0)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    if not inside:
        raise InputError(f"context span [{start}, {end}) covers no token: widen it")
    return inside[0] + front, inside[-1] + 1 + front
