"""Batched head replacement (many ablations per forward) and the pruning curve (docs/metrics.md §4).

The engine runs ``C`` copies of a batch in one forward of the model (the one forward,
:func:`workbench.forward.run`, fused SDPA attention, no statistics), copy ``c`` replacing the per-head
outputs ``z`` of the heads in ``masks[c]`` by a source value (zero, a mean, a resampled or a
clean activation). One forward therefore measures many single-head ablations, or many pruning
levels, at once; copies are chunked to a token budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from probes.figures import curves
from workbench.batch import TokenBatch
from workbench.errors import InputError
from workbench.attention_backend import AttentionCall
from workbench.forward import bridge_call, check_finite_values, run
from workbench.head_edits import OutputEdits
from workbench.model import HookedModel, bind_hook
from workbench.progress import Estimate

Metric = Callable[[torch.Tensor], torch.Tensor]
"""``logits [c, B, N, V] -> [c, B]`` per-sample metric of each copy."""
PruneOrder = Literal["importance", "random"]



def kernel_logits(model: HookedModel, batch: TokenBatch, editors: Sequence = (), *, grad: bool = False) -> torch.Tensor:
    """Logits ``[B, N, V]`` with ``z`` editors ``(z [B, N, Hq, d], call) -> z`` active (fused SDPA attention)."""
    return run(model, batch, backend="sdpa", edits=OutputEdits(editors) if editors else None, grad=grad)


def clean_z(model: HookedModel, batch: TokenBatch) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Clean logits ``[B, N, V]`` and per-head outputs ``{layer: z [B, N, Hq, d]}`` (fp32)."""
    logits, store, _ = clean_run(model, batch)
    return logits, store


def clean_run(model: HookedModel, batch: TokenBatch, *, layer_inputs: bool = False):
    """``(logits [B, N, V], {layer: z [B, N, Hq, d]}, {layer: residual entering it [B, N, D]} | None)``."""
    store: dict[int, torch.Tensor] = {}
    residuals: dict[int, torch.Tensor] = {}

    def record(call: AttentionCall, result) -> None:
        store[call.layer] = result.out.detach().transpose(1, 2).float()

    def keep_residual(resid: torch.Tensor, hook, *, layer: int) -> torch.Tensor:
        residuals[layer] = resid.detach()
        return resid
    hooks = []
    if layer_inputs and _decoder_stack(model) is not None:
        hooks = [(f"blocks.{layer}.hook_resid_pre", bind_hook(keep_residual, layer=layer)) for layer in range(model.n_layers)]
    logits = run(model, batch, backend="sdpa", recorders=[record], fwd_hooks=hooks)
    return logits, store, (residuals if hooks else None)


def _decoder_stack(model: HookedModel):
    """The inner Llama-style decoder (``layers``, ``norm``, ``rotary_emb``, plus ``lm_head``) or None."""
    outer = model.bridge.original_model
    inner = getattr(outer, "model", None)
    if inner is None or not hasattr(outer, "lm_head") or not all(
            hasattr(inner, name) for name in ("layers", "norm", "rotary_emb")):
        return None
    return inner


def logits_from_layer(model: HookedModel, batch: TokenBatch, start: int, hidden: torch.Tensor,
                      editors: Sequence = ()) -> torch.Tensor:
    """Logits ``[B, N, V]`` running only layers ``start..`` from the residual ``hidden [B, N, D]``
    entering layer ``start`` (Llama-style decoders; layers below are unaffected by edits at or
    above ``start``, so their clean residual is reused)."""
    inner, outer = _decoder_stack(model), model.bridge.original_model
    edits = OutputEdits(editors) if editors else None
    with bridge_call(model, batch.mask, backend="sdpa", edits=edits), torch.no_grad():
        positions = torch.arange(batch.tokens.shape[1], device=hidden.device)[None]
        rotary = inner.rotary_emb(hidden, position_ids=positions)
        for layer in inner.layers[start:model.n_layers]:
            hidden = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        logits = outer.lm_head(inner.norm(hidden))
    check_finite_values(logits)
    return logits


def per_sample_ce(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per sample ``[..., B]`` from ``logits [..., B, N, V]``.

    ``targets [B, N]`` are the ids to predict (shifted inside); ``valid [B, N-1]`` marks the
    predicting positions counted. NaN for a sample with no valid position.
    """
    lead = logits.shape[:-3]
    targets, valid = targets.to(logits.device), valid.to(logits.device)
    flat = logits[..., :-1, :].reshape(-1, logits.shape[-1]).float()
    tgt = targets[:, 1:].expand(*lead, -1, -1).reshape(-1)
    losses = torch.nn.functional.cross_entropy(flat, tgt, reduction="none").reshape(*lead, *valid.shape)
    count = valid.sum(-1)
    total = torch.where(valid, losses, torch.zeros_like(losses)).sum(-1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def next_token_valid(batch: TokenBatch) -> torch.Tensor:
    """``[B, N-1]`` positions whose next token is a real token."""
    return batch.mask[:, 1:] & batch.mask[:, :-1]


def replaced_metric(model: HookedModel, batch: TokenBatch, masks: torch.Tensor,
                    sources: dict[int, torch.Tensor | None], metric: Metric, *,
                    tokens_per_forward: int = 2048,
                    layer_inputs: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-sample metric ``[C, B]`` with copy ``c`` replacing the heads in ``masks[c]``.

    Args:
        masks: ``[C, n_layers, Hq]`` bool, heads replaced in each copy.
        sources: layer -> replacement ``z`` broadcastable to ``[B, N, Hq, d]`` (None = zero).
        metric: ``logits [c, B, N, V] -> [c, B]``.
        tokens_per_forward: copies per forward are chosen so ``copies * B * N`` stays below it.
        layer_inputs: clean residual entering each layer (:func:`clean_run`); when given (and
            the model is a Llama-style decoder) each forward starts at its copies' first edited
            layer instead of the embeddings.
    """
    n_samples, width = batch.tokens.shape
    per_forward = max(1, tokens_per_forward // (n_samples * width))
    edited = masks.flatten(2).any(-1)  # [C, n_layers]
    first = torch.where(edited.any(-1), edited.float().argmax(-1), torch.full((masks.shape[0],), model.n_layers - 1))
    skip = layer_inputs is not None and _decoder_stack(model) is not None
    groups: dict[int, list[int]] = {}
    for copy, start in enumerate(first.tolist()):
        groups.setdefault(int(start) if skip else 0, []).append(copy)
    results = torch.empty(masks.shape[0], n_samples)
    eta = Estimate(masks.shape[0], "ablated copies")
    for start, copies in groups.items():
        size = -(-len(copies) // -(-len(copies) // per_forward))  # even chunks of at most per_forward
        for offset in range(0, len(copies), size):
            index = copies[offset:offset + size]
            chunk = masks[index]
            rep = TokenBatch(batch.tokens.repeat(len(index), 1), batch.mask.repeat(len(index), 1),
                             [{}] * (len(index) * n_samples))
            editor = _copies_editor(chunk, sources, n_samples)
            with torch.no_grad():
                if skip:
                    hidden = layer_inputs[start].repeat(len(index), 1, 1)
                    logits = logits_from_layer(model, rep, start, hidden, [editor])
                else:
                    logits = kernel_logits(model, rep, [editor])
                results[index] = metric(logits.reshape(len(index), n_samples, width, -1)).float().cpu()
            eta.advance(len(index))
    return results


def _copies_editor(chunk: torch.Tensor, sources: dict[int, torch.Tensor | None], n_samples: int):
    def edit(z: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        selected = chunk[:, call.layer]  # [c, Hq]
        if not selected.any():
            return z
        copies = selected.shape[0]
        view = z.reshape(copies, n_samples, *z.shape[1:])
        source = sources.get(call.layer)
        source = torch.zeros((), dtype=z.dtype) if source is None else source.to(z.dtype)
        out = torch.where(selected[:, None, None, :, None].to(z.device), source, view)
        return out.reshape(z.shape)
    return edit


def single_head_masks(n_layers: int, n_heads: int, layers: Sequence[int], heads: Sequence[int]) -> torch.Tensor:
    """``[len(layers) * len(heads), n_layers, n_heads]``: one copy per selected head, layer-major."""
    masks = torch.zeros(len(layers) * len(heads), n_layers, n_heads, dtype=torch.bool)
    for i, layer in enumerate(layers):
        for j, head in enumerate(heads):
            masks[i * len(heads) + j, layer, head] = True
    return masks


def zero_ablation_importance(model: HookedModel, batch: TokenBatch, *, tokens_per_forward: int = 2048) -> np.ndarray:
    """Mean over samples of Δloss when each head is zeroed, ``[n_layers, Hq]``."""
    logits, _, inputs = clean_run(model, batch, layer_inputs=True)
    valid = next_token_valid(batch)
    clean = per_sample_ce(logits[None], batch.tokens, valid)[0].cpu()
    masks = single_head_masks(model.n_layers, model.n_heads, range(model.n_layers), range(model.n_heads))
    ablated = replaced_metric(model, batch, masks, {}, lambda lg: per_sample_ce(lg, batch.tokens, valid),
                              tokens_per_forward=tokens_per_forward, layer_inputs=inputs)
    return np.nanmean((ablated - clean[None]).numpy(), axis=1).reshape(model.n_layers, model.n_heads)


def pruning_curve(model: HookedModel, batch: TokenBatch, order: PruneOrder | Sequence[PruneOrder] = "importance",
                  step: float = 0.1, *, importance: np.ndarray | None = None, seed: int = 0,
                  tokens_per_forward: int = 2048) -> tuple[pd.DataFrame, go.Figure]:
    """Loss as the least important heads are zero-ablated cumulatively, ``step`` of them at a time.

    Args:
        order: ``"importance"`` (least important first: lowest ``importance``), ``"random"``
            (a seeded permutation), or several of them (one curve each).
        step: fraction of all heads removed per point (0.1 = 10%).
        importance: ``[n_layers, Hq]`` scores, higher = more important; default: the
            zero-ablation Δloss of each head on ``batch``.
    Returns:
        ``(frame, figure)``: columns ``fraction_removed, heads_removed, loss, order`` (loss is the
        token-weighted next-token cross-entropy of the batch) and the plotly curves.
    """
    if not model.causal:
        raise InputError(f"{model.name} is an encoder: the pruning curve needs a causal language model")
    orders = [order] if isinstance(order, str) else list(order)
    bad = [o for o in orders if o not in ("importance", "random")]
    if bad or not orders:
        raise InputError(f"unknown pruning order '{bad[0] if bad else ''}': use 'importance' or 'random'")
    if not 0 < step <= 1:
        raise InputError(f"step={step}: give a fraction in (0, 1] (0.1 removes 10% of heads per point)")
    total = model.n_layers * model.n_heads
    if "importance" in orders:
        if importance is None:
            importance = zero_ablation_importance(model, batch, tokens_per_forward=tokens_per_forward)
        importance = np.asarray(importance, dtype=float)
        if importance.shape != (model.n_layers, model.n_heads):
            raise InputError(f"importance has shape {importance.shape}: give one score per head "
                             f"({model.n_layers} x {model.n_heads})")
    nominal = np.append(np.arange(0.0, 1.0 - 1e-9, step), 1.0)
    counts = np.unique(np.round(nominal * total).astype(int))  # distinct head counts, 0 .. total
    fractions = counts / total
    valid = next_token_valid(batch)
    _, _, inputs = clean_run(model, batch, layer_inputs=True)
    frames, series = [], {}
    for name in orders:
        if name == "importance":
            ranking = np.argsort(np.nan_to_num(importance.ravel(), nan=np.inf), kind="stable")
        else:
            ranking = np.random.default_rng(seed).permutation(total)
        masks = torch.zeros(len(counts), total, dtype=torch.bool)
        for i, count in enumerate(counts):
            masks[i, torch.as_tensor(ranking[:count], dtype=torch.long)] = True
        masks = masks.reshape(len(counts), model.n_layers, model.n_heads)
        losses = replaced_metric(model, batch, masks, {}, lambda lg: _token_sums(lg, batch, valid),
                                 tokens_per_forward=tokens_per_forward, layer_inputs=inputs)
        loss = (losses.sum(-1) / valid.sum()).numpy()
        frames.append(pd.DataFrame({"fraction_removed": fractions, "heads_removed": counts,
                                    "loss": loss, "order": name}))
        series[name] = (fractions, loss)
    figure = curves(series, title=f"pruning curve ({model.name})", x_title="fraction of heads removed",
                    y_title="next-token loss")
    return pd.concat(frames, ignore_index=True), figure


def _token_sums(logits: torch.Tensor, batch: TokenBatch, valid: torch.Tensor) -> torch.Tensor:
    """Per-sample summed cross-entropy ``[c, B]`` (for token-weighted batch losses)."""
    return torch.nan_to_num(per_sample_ce(logits, batch.tokens, valid)) * valid.sum(-1).to(logits.device)
