"""Run a model with block-sparse attention (HeSS-guided or any per-head block budget).

For each layer, head and query block the attention keeps ``budgets[layer, head, qblock]`` key
blocks, chosen by mean-pooled Q·K block scores (:func:`kernels.block_scores`); the first and
the diagonal block are always kept and count toward the budget (:func:`kernels.select_blocks`).
The forward runs ``model.kernel_model`` inside :func:`workbench.kernel_attention.kernel_forward`
with :class:`LayerBudgetAttention` as the attention function. The kernel interface does not
pass the layer index to the attention function, so the function counts its calls (layers run
in order) and a recorder checks each call's ``layer`` against the count; nothing outlives the
forward (the attention object is built per call and the kernel context is restored on exit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.batch import TokenBatch
from workbench.errors import InputError, WorkbenchError
from workbench.kernel_attention import AttentionCall, kernel_forward
from workbench.model import HookedModel


class LayerBudgetAttention:
    """Attention function ``(q, k, v, *, causal, key_padding_mask, scale) -> AttentionStats``
    that applies per-layer block budgets ``[L, Hq, nqb]`` and keeps what it kept.

    Attributes:
        calls: attention calls seen (the layer index of the next call).
        kept: per layer, kept visible (query block, key block) pairs summed over batch and heads.
        visible: per layer, visible pairs summed over batch and heads.
    """

    def __init__(self, budgets: torch.Tensor, block_size: int, backend: str = "auto") -> None:
        self.budgets, self.block_size, self.backend = budgets, block_size, backend
        self.calls = 0
        self.kept: list[int] = []
        self.visible: list[int] = []

    def __call__(self, q, k, v, *, causal, key_padding_mask, scale):
        from kernels import block_scores, block_sparse_attention, select_blocks

        layer = self.calls
        if layer >= self.budgets.shape[0]:
            raise WorkbenchError(f"block-sparse forward made more than {self.budgets.shape[0]} attention calls: "
                                 "run one plain forward per sparse_forward call")
        self.calls += 1
        scores = block_scores(q, k, block_size=self.block_size, causal=causal, scale=scale)
        budget = self.budgets[layer].to(q.device)  # [Hq, nqb]
        if budget.shape != scores.shape[1:3]:
            raise InputError(f"block budgets hold {tuple(budget.shape)} (heads, query blocks) but the layer has "
                             f"{tuple(scores.shape[1:3])} at block size {self.block_size}: rebuild them for this length")
        keep = torch.zeros_like(scores, dtype=torch.bool)
        for t in range(scores.shape[2]):
            keep[:, :, t] = select_blocks(scores, budget[:, t])[:, :, t]
        finite = torch.isfinite(scores)
        self.kept.append(int((keep & finite).sum()))
        self.visible.append(int(finite.sum()))
        return block_sparse_attention(q, k, v, keep, block_size=self.block_size, causal=causal,
                                      key_padding_mask=key_padding_mask, scale=scale, backend=self.backend)

    def check_layer(self, call: AttentionCall, result) -> None:
        """Recorder: the call just made must be the layer the counter assumed."""
        if call.layer >= 0 and call.layer != self.calls - 1:
            raise WorkbenchError(f"attention call for layer {call.layer} arrived as call {self.calls - 1}: "
                                 "layers ran out of order, block budgets would be misassigned")


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
    """Forward ``batch`` through ``model.kernel_model`` with block-sparse attention.

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
    hf = model.kernel_model
    device = next(hf.parameters()).device
    tokens, mask = batch.tokens.to(device), batch.mask.to(device)
    with model.lock, torch.no_grad(), kernel_forward(mask, attention=attention, recorders=[attention.check_layer]):
        logits = hf(input_ids=tokens, attention_mask=mask.long()).logits
    if attention.calls != model.n_layers:
        raise WorkbenchError(f"expected {model.n_layers} attention calls, saw {attention.calls}")
    density = [k / max(v, 1) for k, v in zip(attention.kept, attention.visible)]
    return SparseRun(logits, density)
