"""Run a model with block-sparse attention (HeSS-guided or any per-head block budget).

For each layer, head and query block the attention keeps ``budgets[layer, head, qblock]`` key
blocks, chosen by mean-pooled Q·K block scores (:func:`kernels.block_scores`); the first and
the diagonal block are always kept and count toward the budget (:func:`kernels.select_blocks`).
The one forward (:func:`workbench.forward.run`) runs with :class:`LayerBudgetAttention` as its
attention backend, which reads each call's layer from the :class:`AttentionCall`; nothing outlives
the forward (the attention object is built per call and the call state is restored on exit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.batch import TokenBatch
from workbench.errors import InputError, WorkbenchError
from workbench.attention_backend import AttentionCall
from workbench.forward import run
from workbench.model import HookedModel


class LayerBudgetAttention:
    """Attention backend ``(call) -> AttentionStats`` that applies per-layer block budgets
    ``[L, Hq, nqb]`` and keeps what it kept.

    Attributes:
        kept: layer -> kept visible (query block, key block) pairs summed over batch and heads.
        visible: layer -> visible pairs summed over batch and heads.
    """

    def __init__(self, budgets: torch.Tensor, block_size: int, backend: str = "auto") -> None:
        self.budgets, self.block_size, self.backend = budgets, block_size, backend
        self.kept: dict[int, int] = {}
        self.visible: dict[int, int] = {}

    def __call__(self, call: AttentionCall):
        from kernels import block_scores, block_sparse_attention, select_blocks

        q, k, v = call.query, call.key, call.value
        scores = block_scores(q, k, block_size=self.block_size, causal=call.causal, scale=call.scale)
        budget = self.budgets[call.layer].to(q.device)  # [Hq, nqb]
        if budget.shape != scores.shape[1:3]:
            raise InputError(f"block budgets hold {tuple(budget.shape)} (heads, query blocks) but the layer has "
                             f"{tuple(scores.shape[1:3])} at block size {self.block_size}: rebuild them for this length")
        keep = torch.zeros_like(scores, dtype=torch.bool)
        for t in range(scores.shape[2]):
            keep[:, :, t] = select_blocks(scores, budget[:, t])[:, :, t]
        finite = torch.isfinite(scores)
        self.kept[call.layer] = int((keep & finite).sum())
        self.visible[call.layer] = int(finite.sum())
        return block_sparse_attention(q, k, v, keep, block_size=self.block_size, causal=call.causal,
                                      key_padding_mask=call.key_padding_mask, scale=call.scale, backend=self.backend)


@dataclass
class SparseRun:
    """Result of :func:`sparse_forward`.

    Attributes:
        logits: ``[B, N, V]``.
        density: per layer, kept / visible (query block, key block) pairs (achieved, after forcing).
    """

    logits: torch.Tensor
    density: list[float]

    @property
    def achieved_sparsity(self) -> float:
        """Fraction of visible key blocks dropped, averaged over layers."""
        return 1.0 - sum(self.density) / len(self.density)


def sparse_forward(model: HookedModel, batch: TokenBatch, budgets: torch.Tensor, *, block_size: int = 64,
                   backend: str = "auto") -> SparseRun:
    """Forward ``batch`` through the model with block-sparse attention.

    Args:
        budgets: int ``[L, Hq, nqb]`` key blocks kept per layer, head and query block
            (``nqb = ceil(N / block_size)`` for the batch width ``N``), e.g. from
            :func:`probes.sparsity.block_budgets`.
    Raises:
        InputError: budgets of the wrong shape or negative.
    """
    n_blocks = -(-batch.tokens.shape[1] // block_size)
    expected = (model.n_layers, model.n_heads, n_blocks)
    if not isinstance(budgets, torch.Tensor) or tuple(budgets.shape) != expected:
        shape = tuple(budgets.shape) if isinstance(budgets, torch.Tensor) else type(budgets).__name__
        raise InputError(f"budgets must be an int tensor [layers, heads, query blocks] = {expected} for "
                         f"{batch.tokens.shape[1]} tokens at block size {block_size}, got {shape}")
    if budgets.is_floating_point() or bool((budgets < 0).any()):
        raise InputError("budgets must be non-negative integers (blocks kept per head and query block)")
    attention = LayerBudgetAttention(budgets.long(), block_size, backend)
    logits = run(model, batch, backend=attention)
    if len(attention.kept) != model.n_layers:
        raise WorkbenchError(f"expected {model.n_layers} attention calls, saw {len(attention.kept)}")
    density = [attention.kept[layer] / max(attention.visible[layer], 1) for layer in range(model.n_layers)]
    return SparseRun(logits, density)
