"""Result container shared by every attention backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

STAT_NAMES: tuple[str, ...] = (
    "entropy",
    "entropy_normalized",
    "max_weight",
    "first1_mass",
    "first4_mass",
    "prev_token_mass",
    "self_mass",
    "local_mass",
    "mean_distance",
)
"""Per-query-row statistics (docs/metrics.md §1), in a fixed order."""


@dataclass
class AttentionStats:
    """Output of one attention call plus its per-row statistics.

    Attributes:
        out: attention output ``[B, Hq, Nq, D]`` in the input dtype.
        lse: natural-log ``log Σ_j exp(scale·q_i·k_j)`` over visible keys,
            ``[B, Hq, Nq]`` fp32; ``-inf`` for rows that see no key (padded queries).
        stats: ``{name: Tensor[B, Hq, Nq]}`` fp32 with the keys of ``STAT_NAMES``
            (zero for rows that see no key), or ``None`` when not computed.
        received, received_normalized: per-key received mass ``c``, ``ĉ`` ``[B, Hq, Nk]`` fp32
            when asked for (``attention_with_stats(..., received=True)``), else None.
        rows: the long-context rows (``kernels.long_context.BlockPass`` with a leading batch axis:
            argmax / argmax_prob / streaming ``[B, Hq, Nq]``, block_mass ``[B, Hq, nqb, nkb]``) when
            asked for with ``row_extras`` and the backend computes them in its pass, else None.
    """

    out: torch.Tensor
    lse: torch.Tensor
    stats: dict[str, torch.Tensor] | None
    received: torch.Tensor | None = None
    received_normalized: torch.Tensor | None = None
    rows: object | None = None

    def stat(self, name: str) -> torch.Tensor:
        """Return one statistic ``[B, Hq, Nq]`` by name, with a clear error if absent."""
        if self.stats is None:
            raise ValueError("these results carry no statistics; call attention_with_stats for them")
        if name not in self.stats:
            raise KeyError(f"unknown statistic {name!r}; expected one of {STAT_NAMES}")
        return self.stats[name]


def stats_from_stacked(stacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a ``[len(STAT_NAMES), B, Hq, Nq]`` tensor into the named dictionary (views)."""
    return {name: stacked[i] for i, name in enumerate(STAT_NAMES)}
