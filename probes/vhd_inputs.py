"""Inputs of the VHD probe: a prompt with a marked context span, and its no-context twin.

A :class:`ContextPrompt` holds the prompt's token ids, the context span ``[t0, t1)`` in token
offsets, and (vision path) the ``pixel_values`` that fill the span's image placeholders. The
no-context branch is the same ids with the span removed (and no image). A span is marked by
character offsets (``span=(start, end)``), by markers in the text (``<ctx>...</ctx>``, removed
before tokenizing), by a dataset's ``meta["span"]`` (token offsets), or by the image
placeholders of a vision-language model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workbench.batch import TokenBatch
from workbench.data import char_span_to_tokens
from workbench.errors import InputError
from workbench.model import HookedModel

CTX_OPEN, CTX_CLOSE = "<ctx>", "</ctx>"


@dataclass(frozen=True)
class ContextPrompt:
    """One prompt with its context span.

    Attributes:
        ids: ``[n]`` token ids of the full prompt (context included).
        span: ``(t0, t1)`` token offsets of the context inside ``ids``.
        pixel_values: ``[1, 3, S, S]`` image of a vision-language prompt (the span holds its
            placeholders), else None.
    """

    ids: torch.Tensor
    span: tuple[int, int]
    pixel_values: torch.Tensor | None = None

    def without_context(self) -> torch.Tensor:
        """``[n - (t1 - t0)]`` ids with the context span removed."""
        t0, t1 = self.span
        return torch.cat([self.ids[:t0], self.ids[t1:]])


def check_span(span: Sequence[int], n_tokens: int) -> tuple[int, int]:
    """Validate token offsets ``[t0, t1)`` of a context inside a prompt of ``n_tokens``.

    Raises:
        InputError: an empty span, a span outside the prompt, or one that reaches the last
            token (the current generation step's query must exist in both branches).
    """
    try:
        t0, t1 = (int(x) for x in span)
    except (TypeError, ValueError):
        raise InputError(f"context span {span!r} must be two token offsets (t0, t1)") from None
    if not 0 <= t0 < t1 <= n_tokens:
        raise InputError(f"context span [{t0}, {t1}) is empty or outside the prompt of {n_tokens} tokens: "
                         "mark a non-empty span inside the prompt")
    if t1 >= n_tokens:
        raise InputError(f"context span [{t0}, {t1}) reaches the last prompt token: the span must end before "
                         "the question/last token, which is where VHD is read")
    return t0, t1


def context_prompt(model: HookedModel, text: str, span: tuple[int, int] | None = None) -> ContextPrompt:
    """A prompt whose context is marked by character offsets ``span`` or by ``<ctx>...</ctx>``.

    Raises:
        InputError: no/unbalanced markers, empty context, span outside the text.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError("empty prompt: give text with a marked context span")
    if span is None:
        if text.count(CTX_OPEN) != 1 or text.count(CTX_CLOSE) != 1 or text.index(CTX_OPEN) > text.index(CTX_CLOSE):
            raise InputError(f"mark the context once as {CTX_OPEN}...{CTX_CLOSE} in the text, "
                             "or pass span=(start, end) character offsets")
        start = text.index(CTX_OPEN)
        end = text.index(CTX_CLOSE) - len(CTX_OPEN)
        text = text.replace(CTX_OPEN, "", 1).replace(CTX_CLOSE, "", 1)
    else:
        if CTX_OPEN in text or CTX_CLOSE in text:
            raise InputError(f"give either span=(start, end) or {CTX_OPEN} markers, not both")
        start, end = span
    if not text[start:end].strip():
        raise InputError(f"context span [{start}, {end}) is empty or only whitespace: mark the context text")
    t0, t1 = char_span_to_tokens(model, text, start, end)
    ids = model.encode(text)
    return ContextPrompt(ids, check_span((t0, t1), ids.numel()))


def prompts_from_batch(batch: TokenBatch) -> list[ContextPrompt]:
    """One :class:`ContextPrompt` per sample from ``meta["span"]`` (token offsets, e.g. context_qa).

    Raises:
        InputError: a sample without ``span`` in its metadata, or a bad span.
    """
    prompts = []
    for index, (tokens, mask, meta) in enumerate(zip(batch.tokens, batch.mask, batch.meta)):
        if "span" not in meta:
            raise InputError(f"sample {index} has no context span: VHD needs data with a marked context "
                             "(e.g. the context_qa dataset, or <ctx>...</ctx> markers)")
        ids = tokens[mask]
        prompts.append(ContextPrompt(ids, check_span(meta["span"], ids.numel())))
    return prompts


def image_token_info(model: HookedModel) -> tuple[int, int]:
    """``(image placeholder id, placeholders per image)`` of a LLaVA-style model.

    Raises:
        InputError: the model has no vision tower.
    """
    config = getattr(getattr(model.bridge, "original_model", None), "config", None)
    vision = getattr(config, "vision_config", None)
    image_id = getattr(config, "image_token_index", getattr(config, "image_token_id", None))
    if vision is None or image_id is None:
        raise InputError(f"{model.name} is not a vision-language model: use a text span instead of an image")
    count = (vision.image_size // vision.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        count += 1
    return int(image_id), count


def image_prompt(model: HookedModel, text: str, pixel_values: torch.Tensor) -> ContextPrompt:
    """A vision-language prompt: the image's placeholders right after BOS, then ``text``.

    Args:
        pixel_values: ``[1, 3, S, S]`` or ``[3, S, S]`` float image (already normalised).
    """
    image_id, count = image_token_info(model)
    pixel_values = pixel_values[None] if pixel_values.dim() == 3 else pixel_values
    if pixel_values.dim() != 4 or pixel_values.shape[0] != 1:
        raise InputError(f"pixel_values of shape {tuple(pixel_values.shape)}: give one image [1, 3, S, S]")
    ids = model.encode(text)
    front = 1 if model.tokenizer.bos_token_id is not None and int(ids[0]) == model.tokenizer.bos_token_id else 0
    ids = torch.cat([ids[:front], torch.full((count,), image_id, dtype=ids.dtype), ids[front:]])
    return ContextPrompt(ids, check_span((front, front + count), ids.numel()), pixel_values)
