"""Run a model with interventions active: forward, loss, next-token top-k, greedy generation.

Every function runs the one forward (:func:`workbench.forward.run`) with the interventions
compiled once (:meth:`workbench.interventions.InterventionSet.compile`); ``mode`` only picks the
attention backend (``None``: fused SDPA; ``"patterns"``: the eager map; ``"stats"``: the recompute
kernels) and gives the same logits in each. Inputs may be a :class:`TokenBatch`, a prompt or a
list of prompts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from workbench.batch import TokenBatch
from workbench.errors import InputError
from workbench.forward import generate_ids, require_causal, run
from workbench.interventions import HeadIntervention, InterventionSet, as_intervention_set
from workbench.model import HookedModel, next_token_loss

RunMode = Literal["patterns", "stats"]
Interventions = InterventionSet | Iterable[HeadIntervention] | str | None
Inputs = TokenBatch | Sequence[str] | str
_BACKEND = {None: "sdpa", "patterns": "eager", "stats": "stats"}

__all__ = ["as_intervention_set", "forward", "generate", "loss", "next_token_topk"]


def backend_of(mode: str | None) -> str:
    """Attention backend of a run mode (``None`` / ``"patterns"`` / ``"stats"``)."""
    if mode not in _BACKEND:
        raise InputError(f"unknown mode '{mode}': use 'patterns' (eager map) or 'stats' (recompute kernels)")
    return _BACKEND[mode]


def _batch(model: HookedModel, inputs: Inputs) -> TokenBatch:
    if isinstance(inputs, TokenBatch):
        if len(inputs) == 0:
            raise InputError("empty dataset: it has no sequences")
        return inputs
    return model.tokenize([inputs] if isinstance(inputs, str) else list(inputs))


def forward(model: HookedModel, inputs: Inputs, interventions: Interventions = None, *,
            mode: RunMode | None = None, grad: bool = False) -> torch.Tensor:
    """Logits ``[B, N, V]`` of ``inputs`` with the interventions active (validated first)."""
    backend = backend_of(mode)
    batch = _batch(model, inputs)
    edits = as_intervention_set(interventions).compile(model, batch)
    return run(model, batch, backend=backend, edits=edits, grad=grad)


def loss(model: HookedModel, inputs: Inputs, interventions: Interventions = None, *,
         mode: RunMode | None = None, per_token: bool = False) -> torch.Tensor:
    """Next-token cross-entropy over real positions (mean, or ``[B, N-1]`` with NaN on padding)."""
    require_causal(model, "loss")
    batch = _batch(model, inputs)
    return next_token_loss(forward(model, batch, interventions, mode=mode), batch, per_token=per_token)


def next_token_topk(model: HookedModel, prompt: str, interventions: Interventions = None, *,
                    k: int = 10, mode: RunMode | None = None) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` as ``(token text, probability)``."""
    require_causal(model, "next-token prediction")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k={k!r}: ask for at least one token (a positive integer)")
    batch = model.batch_from_ids([model.encode(prompt)])
    logits = forward(model, batch, interventions, mode=mode)[0, -1].float()
    probs, ids = torch.softmax(logits, -1).topk(min(k, logits.shape[-1]))
    return [(model.tokenizer.decode([int(i)]), float(p)) for p, i in zip(probs, ids)]


def generate(model: HookedModel, prompt: str, interventions: Interventions = None, *,
             max_new_tokens: int = 20, mode: RunMode | None = None) -> str:
    """Greedy continuation of ``prompt`` (the new text only), interventions active at every step.

    Runs Hugging Face ``generate`` with a KV cache on the one model in every mode (``mode`` is
    accepted for symmetry; the continuation is the same); stops after ``max_new_tokens`` or at
    the end-of-sequence token.
    """
    require_causal(model, "generation")
    backend_of(mode)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}: ask for at least one token (a positive integer)")
    ids = model.encode(prompt)
    if ids.numel() + max_new_tokens > model.n_ctx:
        raise InputError(f"prompt of {ids.numel()} tokens + {max_new_tokens} new tokens exceeds the model "
                         f"context of {model.n_ctx}: shorten the prompt or lower max_new_tokens")
    batch = model.batch_from_ids([ids])
    edits = as_intervention_set(interventions).compile(model, batch)
    new = generate_ids(model, ids, max_new_tokens=max_new_tokens, edits=edits)
    return model.tokenizer.decode(new, skip_special_tokens=True)
