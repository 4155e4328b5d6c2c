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
