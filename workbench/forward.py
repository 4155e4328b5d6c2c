"""Every workbench forward: one model, one attention function, the backend chosen per call.

:func:`bridge_call` scopes one call: the bridge's attention components take TransformerLens'
native path (they run the Hugging Face attention module they wrap, whose projections are
bridged, so ``hook_q/k/v/z`` fire as usual), the attention implementation of those modules is
``"workbench"`` (:func:`workbench.attention_backend.workbench_attention`), and the per-call state
(backend, interventions, recorders, padding mask) is set. Everything is restored on exit, even on
error; the model lock serialises calls so the switch never leaks into another thread's forward.

:func:`run` is the forward every caller uses (capture, interventions, probes, the app).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence

import torch

from workbench.attention_backend import ATTENTION_NAME, STATE, CallState, Recorder, StopForward, check_backend, register
from workbench.batch import TokenBatch
from workbench.errors import InputError, WorkbenchError

Hook = tuple[str, Callable]
_PATTERN_SITES = ("hook_pattern",)
_INTERNAL_SITES = ("hook_attn_scores", "hook_rot_q", "hook_rot_k")


@contextlib.contextmanager
def bridge_call(model, key_padding_mask: torch.Tensor | None, *, backend: str | Callable = "sdpa",
                edits=None, recorders: Sequence[Recorder] = (), local_window: int = 8,
                stop_after_layer: int | None = None) -> Iterator[None]:
    """Scope one workbench forward on ``model`` (a :class:`workbench.model.HookedModel`).

    Args:
        key_padding_mask: ``[B, N]`` bool, True = real token (None = all real).
        backend: ``"sdpa"``, ``"eager"``, ``"stats"`` or a kernel function (see
            :mod:`workbench.attention_backend`).
        edits: a :class:`workbench.head_edits.HeadEdits` (compiled interventions) or None.
        recorders: callbacks ``(call, result)`` fed every layer's attention result.
        local_window: ``w`` of the local-mass statistic (stats backend).
        stop_after_layer: raise :class:`StopForward` right after this layer's attention.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    check_backend(backend)
    register()
    layout = model.attention
    device = model.device
    mask = None if key_padding_mask is None else key_padding_mask.to(device=device, dtype=torch.bool)
    with model.lock:
        saved = [(config, config._attn_implementation) for config in layout.configs]
        row_extras = next((r.row_extras for r in recorders if getattr(r, "row_extras", None) is not None), None)
        token = STATE.set(CallState(layout.sites, mask, backend, edits, tuple(recorders), local_window, stop_after_layer,
                                    row_extras))
        try:
            for component in layout.components:
                object.__setattr__(component, "forward", types.MethodType(AttentionBridge.forward, component))
            for config in layout.configs:
                config._attn_implementation = ATTENTION_NAME
            yield
        finally:
            STATE.reset(token)
            for config, value in saved:
                config._attn_implementation = value
            for component in layout.components:
                if "forward" in vars(component):
                    object.__delattr__(component, "forward")


def default_backend(fwd_hooks: Sequence[Hook], bwd_hooks: Sequence[Hook] = ()) -> str:
    """``"eager"`` when a hook needs the attention map (``hook_pattern``), else ``"sdpa"``."""
    names = [name for name, _ in list(fwd_hooks) + list(bwd_hooks)]
    return "eager" if any(str(n).endswith(_PATTERN_SITES) for n in names) else "sdpa"


def check_hooks(backend, hooks: Sequence[Hook]) -> None:
    """Refuse hooks that would silently never fire in this forward (one line naming the fix).

    The workbench attention function fires ``hook_pattern`` only where a map exists (the eager
    backend); TransformerLens' score and post-RoPE hooks live inside its own re-implemented
    attention, which the one forward replaces.
    """
    for name, _ in hooks:
        name = str(name)
        if name.endswith(_INTERNAL_SITES):
            raise InputError(f"hook '{name}' does not fire in the workbench forward (attention is computed by its "
                             "backends): read hook_q / hook_k / hook_pattern instead, or call "
                             "model.bridge.run_with_cache directly")
        if name.endswith("hook_pattern") and backend != "eager":
            raise InputError(f"hook '{name}' needs the attention map, which the {backend!r} backend never builds: "
                             "use mode='patterns' (the eager backend) for short inputs")


def run(model, batch: TokenBatch, *, backend: str | Callable | None = None, edits=None,
        fwd_hooks: Sequence[Hook] = (), bwd_hooks: Sequence[Hook] = (), recorders: Sequence[Recorder] = (),
        grad: bool = False, stop_at_layer: int | None = None, local_window: int = 8,
        check_finite: bool = True, stop_after_layer: int | None = None, **model_inputs) -> torch.Tensor | None:
    """Forward ``batch`` once with everything scoped to this call.

    Args:
        model: the loaded :class:`workbench.model.HookedModel`.
        batch: right-padded tokens and mask.
        backend: attention backend; None = ``"eager"`` when a hook reads ``hook_pattern``, else ``"sdpa"``.
        edits: compiled interventions (:meth:`workbench.interventions.InterventionSet.compile`).
        fwd_hooks, bwd_hooks: TransformerLens hooks ``(name, fn)``, removed when the call returns or raises.
        recorders: attention-result callbacks (the statistics stream).
        grad: keep the autograd graph.
        stop_at_layer: stop before this layer (returns the residual stream; TransformerLens semantics).
        stop_after_layer: end the forward right after this layer's attention (recorders have
            seen it; no later layer and no LM head runs); returns None.
        model_inputs: extra model inputs (``pixel_values`` of a vision-language model).
    Returns:
        logits ``[B, N, V]`` (or the residual stream with ``stop_at_layer``; None with ``stop_after_layer``).
    """
    if backend is None:
        backend = default_backend(fwd_hooks, bwd_hooks)
    check_hooks(backend, list(fwd_hooks) + list(bwd_hooks))
    batch.check(getattr(model.bridge.cfg, "d_vocab", None))
    device = model.device
    tokens, mask = batch.tokens.to(device), batch.mask.to(device)
    try:
        with bridge_call(model, mask, backend=backend, edits=edits, recorders=recorders, local_window=local_window,
                         stop_after_layer=stop_after_layer), torch.set_grad_enabled(grad), \
                model.bridge.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks)):
            out = model.bridge(tokens, attention_mask=mask.long(), stop_at_layer=stop_at_layer, **model_inputs)
    except StopForward:
        return None
    if check_finite and stop_at_layer is None:
        check_finite_values(out)
    return out


def generate_ids(model, ids: torch.Tensor, *, max_new_tokens: int, edits=None) -> torch.Tensor:
    """Greedy continuation of one prompt ``ids [n]`` with a KV cache; returns the new ids ``[m]``.

    The interventions see each step's new query rows at their absolute positions, so a cached
    step gives the same numbers as re-running the whole prefix.
    """
    device = model.device
    hf = model.bridge.original_model
    eos = model.tokenizer.eos_token_id
    tokens = ids[None].to(device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with bridge_call(model, mask, backend="sdpa", edits=edits), torch.no_grad():
        out = hf.generate(input_ids=tokens, attention_mask=mask.long(), max_new_tokens=max_new_tokens,
                          do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=model.pad_id)
    return out[0, ids.numel():].cpu()


def check_finite_values(tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise WorkbenchError("the model produced NaN/inf values: the checkpoint may be corrupt, "
                             "or the dtype too narrow (try --dtype float32)")


def require_causal(model, what: str) -> None:
    if not model.causal:
        raise InputError(f"{model.name} is an encoder: {what} needs a causal language model")
