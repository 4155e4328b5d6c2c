"""Run a model with interventions active: forward, loss, next-token top-k, greedy generation.

``mode="patterns"``: the ``TransformerBridge`` with the set's TransformerLens hooks, scoped to
the call by :meth:`HookedModel.run`. ``mode="stats"``: the kernel-backed Hugging Face copy
(``model.kernel_model``) inside :func:`workbench.kernel_attention.kernel_forward` with the set's
``z`` editors (no ``[q, k]`` map). Both apply the same rules (:mod:`workbench.interventions`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch

from workbench.batch import TokenBatch
from workbench.errors import InputError
from workbench.interventions import HeadIntervention, InterventionSet, parse_interventions
from workbench.kernel_attention import kernel_forward
from workbench.model import HookedModel, _check_finite, next_token_loss

RunMode = Literal["patterns", "stats"]
Interventions = InterventionSet | Iterable[HeadIntervention] | str | None


def as_intervention_set(interventions: Interventions) -> InterventionSet:
    """``None`` / a set / a list of :class:`HeadIntervention` / spec text -> an :class:`InterventionSet`."""
    if interventions is None:
        return InterventionSet()
    if isinstance(interventions, InterventionSet):
        return interventions
    if isinstance(interventions, str):
        return parse_interventions(interventions) if interventions.strip() else InterventionSet()
    if isinstance(interventions, HeadIntervention):
        return InterventionSet([interventions])
    return InterventionSet(interventions)


def _check_mode(mode: str) -> None:
    if mode not in ("patterns", "stats"):
        raise InputError(f"unknown mode '{mode}': use 'patterns' (bridge hooks) or 'stats' (kernels)")


def forward(model: HookedModel, batch: TokenBatch, interventions: Interventions = None, *,
            mode: RunMode = "patterns", grad: bool = False) -> torch.Tensor:
    """Logits ``[B, N, V]`` of ``batch`` with the interventions active (validated first)."""
    _check_mode(mode)
    spec = as_intervention_set(interventions)
    if mode == "patterns":
        return model.run(batch, fwd_hooks=spec.hooks(model, batch), grad=grad)
    editors = spec.z_editors(model, batch)
    with model.lock, torch.set_grad_enabled(grad), kernel_forward(batch.mask, z_editors=editors):
        device = model.kernel_model.device
        logits = model.kernel_model(input_ids=batch.tokens.to(device),
                                    attention_mask=batch.mask.long().to(device)).logits
    _check_finite(logits)
    return logits


def loss(model: HookedModel, batch: TokenBatch, interventions: Interventions = None, *,
         mode: RunMode = "patterns", per_token: bool = False) -> torch.Tensor:
    """Next-token cross-entropy over real positions (mean, or ``[B, N-1]`` with NaN on padding)."""
    _require_causal(model, "loss")
    return next_token_loss(forward(model, batch, interventions, mode=mode), batch, per_token=per_token)


def next_token_topk(model: HookedModel, prompt: str, interventions: Interventions = None, *,
                    k: int = 10, mode: RunMode = "patterns") -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` as ``(token text, probability)``."""
    _require_causal(model, "next-token prediction")
    if k < 1:
        raise InputError(f"k={k}: ask for at least one token")
    batch = model.batch_from_ids([model.encode(prompt)])
    logits = forward(model, batch, interventions, mode=mode)[0, -1].float()
    probs, ids = torch.softmax(logits, -1).topk(min(k, logits.shape[-1]))
    return [(model.tokenizer.decode([int(i)]), float(p)) for p, i in zip(probs, ids)]


def generate(model: HookedModel, prompt: str, interventions: Interventions = None, *,
             max_new_tokens: int = 20, mode: RunMode = "patterns") -> str:
    """Greedy continuation of ``prompt`` (the new text only), interventions active at every step.

    Stops after ``max_new_tokens`` or at the end-of-sequence token. Patterns mode re-runs the
    whole prefix each step on the bridge; stats mode runs Hugging Face ``generate`` (KV cache)
    on the kernel model, the editors seeing each step's new query rows at their absolute
    positions.
    """
    _require_causal(model, "generation")
    _check_mode(mode)
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens}: ask for at least one token")
    spec = as_intervention_set(interventions)
    ids = model.encode(prompt)
    if ids.numel() + max_new_tokens > model.n_ctx:
        raise InputError(f"prompt of {ids.numel()} tokens + {max_new_tokens} new tokens exceeds the model "
                         f"context of {model.n_ctx}: shorten the prompt or lower max_new_tokens")
    batch = model.batch_from_ids([ids])
    eos = model.tokenizer.eos_token_id
    if mode == "patterns":
        hooks = spec.hooks(model, batch)
        tokens = ids.clone()
        for _ in range(max_new_tokens):
            step = model.batch_from_ids([tokens])
            nxt = int(model.run(step, fwd_hooks=hooks)[0, -1].argmax())
            tokens = torch.cat([tokens, torch.tensor([nxt])])
            if nxt == eos:
                break
        new = tokens[ids.numel():]
    else:
        editors = spec.z_editors(model, batch)
        with model.lock, torch.no_grad(), kernel_forward(batch.mask, z_editors=editors):
            device = model.kernel_model.device
            out = model.kernel_model.generate(
                input_ids=batch.tokens.to(device), attention_mask=batch.mask.long().to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=model.pad_id)
        new = out[0, ids.numel():].cpu()
    return model.tokenizer.decode(new, skip_special_tokens=True)


def _require_causal(model: HookedModel, what: str) -> None:
    if not model.causal:
        raise InputError(f"{model.name} is an encoder: {what} needs a causal language model")
