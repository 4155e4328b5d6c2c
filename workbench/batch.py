"""Token batches: right-padded ids with a mask, plus per-sample metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenBatch:
    """A batch of token sequences of different lengths.

    Attributes:
        tokens: ``[B, N]`` int64 ids, right-padded with the pad id.
        mask: ``[B, N]`` bool, True on real tokens (always a prefix of each row).
        meta: one dict per sample (e.g. ``{"span": (start, end)}`` token offsets, answers).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    meta: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.meta:
            self.meta = [{} for _ in range(self.tokens.shape[0])]

    def check(self, vocab_size: int | None = None) -> "TokenBatch":
        """Raise :class:`workbench.errors.InputError` (one line) unless this is a usable batch:
        ``[B, N]`` integer tokens with ``B >= 1``, a bool mask of the same shape whose real tokens
        are a non-empty prefix of every row, and (given ``vocab_size``) ids in ``[0, vocab_size)``.
        Returns the batch."""
        from workbench.errors import InputError

        tokens, mask = self.tokens, self.mask
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
                or tokens.dtype == torch.bool:
            raise InputError("TokenBatch.tokens must be a [batch, positions] integer tensor: build batches with "
                             "model.tokenize(prompts)")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise InputError(f"empty TokenBatch (shape {list(tokens.shape)}): give at least one sequence of one token")
        if not isinstance(mask, torch.Tensor) or mask.shape != tokens.shape:
            raise InputError(f"TokenBatch.mask must have the tokens' shape {list(tokens.shape)}: build batches with "
                             "model.tokenize(prompts)")
        mask = mask.bool()
        empty = (~mask[:, 0]).nonzero()
        if len(empty):
            raise InputError(f"row {int(empty[0])} of the batch has no real token at position 0 (all padding, or left "
                             "padding): drop the row; real tokens come first, padding after")
        if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
            raise InputError("the batch mask has a gap (a real token after padding): pad on the right only")
        if vocab_size is not None:
            real = tokens[mask]
            low, high = int(real.min()), int(real.max())
            if low < 0 or high >= vocab_size:
                bad = low if low < 0 else high
                raise InputError(f"token id {bad} is outside the model's vocabulary [0, {vocab_size}): the tokenizer "
                                 "does not belong to this model, or the ids were built by hand")
        return self

    @property
    def lengths(self) -> torch.Tensor:
        """``[B]`` number of real tokens per sample."""
        return self.mask.sum(dim=1)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: slice | list[int]) -> "TokenBatch":
        """A sub-batch (rows ``index``), trimmed to its longest sample."""
        rows = list(range(len(self)))[index] if isinstance(index, slice) else list(index)
        tokens, mask = self.tokens[rows], self.mask[rows]
        width = int(mask.sum(dim=1).max()) if len(rows) else 0
        return TokenBatch(tokens[:, :width], mask[:, :width], [self.meta[i] for i in rows])

    def chunks(self, size: int) -> list["TokenBatch"]:
        """Split into sub-batches of at most ``size`` samples."""
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]


def pad_sequences(sequences: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D id tensors into ``([B, N] ids, [B, N] bool mask)``."""
    width = max(int(s.numel()) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        tokens[row, : seq.numel()] = seq
        mask[row, : seq.numel()] = True
    return tokens, mask
