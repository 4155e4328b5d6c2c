"""Direct logit attribution (docs/metrics.md §11): what each component writes into one logit.

The final residual stream at a position is a sum of component outputs: the token (and
position) embeddings, every head's ``z_h W_O^h``, each layer's attention bias ``b_O``, and every
MLP's output. The final norm is linear once its scale is frozen from the clean run
(TransformerLens' ``apply_ln_to_stack`` convention): RMSNorm maps ``x -> w ⊙ x / s`` with
``s = rms(resid_final)``; LayerNorm maps ``x -> w ⊙ (x - mean(x)) / s`` (its bias ``b`` is one
constant term). Dotting each normed component with an unembedding direction ``u`` (``W_U[:, t]``,
or ``W_U[:, a] - W_U[:, d]`` for a logit difference) splits the logit exactly::

    logit_t = Σ_c (normed c) · u + (b · u + b_U[t])     # the last term is the ``bias`` component

Everything is read with TransformerLens hooks during one :func:`workbench.forward.run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.batch import TokenBatch
from workbench.errors import InputError
from workbench.forward import require_causal, run


@dataclass
class Components:
    """The final residual stream at one position per sample, split into components.

    Attributes:
        labels: one name per component: ``embed``, ``pos_embed``, ``L{l}H{h}``, ``L{l}.attn_bias``,
            ``L{l}.mlp`` (the constant ``bias`` term is added by :func:`project`).
        vectors: ``[B, C, D]`` each component's residual-stream output at the position.
        scale: ``[B]`` the final norm's scale ``s`` from the clean run (frozen).
        resid: ``[B, D]`` the real final residual stream (for the identity check).
        logits: ``[B, V]`` the model's logits at the position.
        positions: ``[B]`` the position read in each sample.
        head_index: ``[n_layers, n_heads]`` the component index of each head.
    """

    labels: list[str]
    vectors: torch.Tensor
    scale: torch.Tensor
    resid: torch.Tensor
    logits: torch.Tensor
    positions: torch.Tensor
    head_index: torch.Tensor

    @property
    def residual_error(self) -> float:
        """Largest ``|Σ_c vectors - resid|`` (0 up to rounding when the split is complete)."""
        return float((self.vectors.sum(1) - self.resid).abs().max())


def last_positions(batch: TokenBatch) -> torch.Tensor:
    """``[B]`` index of each sample's last real token."""
    return (batch.lengths - 1).clamp_min(0)


def components(model, batch: TokenBatch, positions: torch.Tensor | None = None, *, edits=None) -> Components:
    """Split the final residual stream at ``positions [B]`` (default: each sample's last token).

    One forward of ``batch`` reads ``hook_embed``, ``hook_pos_embed``, every ``attn.hook_z`` and
    ``hook_mlp_out``, the last block's ``hook_resid_post`` and ``ln_final.hook_scale``.
    ``edits`` (compiled interventions) are active in that forward when given.
    """
    require_causal(model, "direct logit attribution")
    bridge = model.bridge
    positions = last_positions(batch) if positions is None else torch.as_tensor(positions, dtype=torch.long)
    if positions.shape != (len(batch),):
        raise InputError(f"positions has shape {tuple(positions.shape)}: give one position per sample ({len(batch)})")
    if (positions < 0).any() or (positions >= batch.lengths).any():
        raise InputError("a position lies outside its sample's tokens: give 0 <= position < length")
    rows = torch.arange(len(batch))
    store: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(tensor: torch.Tensor, hook) -> torch.Tensor:
            store[key] = tensor.detach()[rows.to(tensor.device), positions.to(tensor.device)].float().cpu()
            return tensor
        return hook
    last = model.n_layers - 1
    sites = {"embed": "hook_embed", "pos_embed": "hook_pos_embed", "resid": f"blocks.{last}.hook_resid_post",
             "scale": "ln_final.hook_scale"}
    for layer in range(model.n_layers):
        sites[f"z{layer}"] = f"blocks.{layer}.attn.hook_z"
        sites[f"mlp{layer}"] = f"blocks.{layer}.hook_mlp_out"
    if bridge.cfg.positional_embedding_type != "standard":
        sites.pop("pos_embed")
    hooks = [(name, keep(key)) for key, name in sites.items()]
    logits = run(model, batch, edits=edits, fwd_hooks=hooks)
    out_logits = logits.detach()[rows.to(logits.device), positions.to(logits.device)].float().cpu()
    labels, vectors = ["embed"], [store["embed"]]
    if "pos_embed" in store:
        labels.append("pos_embed")
        vectors.append(store["pos_embed"])
    head_index = torch.zeros(model.n_layers, model.n_heads, dtype=torch.long)
    for layer in range(model.n_layers):
        attn = bridge.blocks[layer].attn
        w_o = attn.W_O.detach().float().cpu()  # [H, d, D]
        per_head = torch.einsum("bhd,hdm->bhm", store[f"z{layer}"], w_o)
        for head in range(model.n_heads):
            head_index[layer, head] = len(labels)
            labels.append(f"L{layer}H{head}")
            vectors.append(per_head[:, head])
        b_o = _optional(attn, "b_O")
        if b_o is not None:
            labels.append(f"L{layer}.attn_bias")
            vectors.append(b_o.detach().float().cpu().expand(len(batch), -1))
        labels.append(f"L{layer}.mlp")
        vectors.append(store[f"mlp{layer}"])
    scale = store["scale"].reshape(len(batch))
    return Components(labels, torch.stack(vectors, 1), scale, store["resid"], out_logits, positions, head_index)


def _optional(module, name: str) -> torch.Tensor | None:
    """A TransformerLens weight property, or None where the checkpoint has none (bias-free)."""
    try:
        return getattr(module, name)
    except AttributeError:
        return None


def final_norm(model) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """``(weight [D], bias [D] | None, centred)`` of the final norm (``centred`` = LayerNorm)."""
    norm = model.bridge.ln_final.original_component
    weight = getattr(norm, "weight", None)
    d_model = model.bridge.cfg.d_model
    weight = torch.ones(d_model) if weight is None else weight.detach().float().cpu()
    bias = getattr(norm, "bias", None)
    bias = None if bias is None else bias.detach().float().cpu()
    centred = str(model.bridge.cfg.normalization_type).upper().startswith("LN")
    return weight, bias, centred


def normed(model, vectors: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Residual components ``[B, C, D]`` through the final norm with frozen ``scale [B]`` (no bias)."""
    weight, _, centred = final_norm(model)
    if centred:
        vectors = vectors - vectors.mean(-1, keepdim=True)
    return vectors * weight / scale[:, None, None]


def directions(model, targets: torch.Tensor, distractors: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unembedding directions ``[B, D]`` and constant terms ``[B]`` for ``logit(t)`` or
    ``logit(t) - logit(d)`` (the constant is ``b_ln · u + b_U`` of the same difference)."""
    w_u = model.bridge.W_U.detach().float().cpu()  # [D, V]
    b_u = _optional(model.bridge, "b_U")
    b_u = torch.zeros(w_u.shape[1]) if b_u is None else b_u.detach().float().cpu()
    direction, const = w_u[:, targets].T, b_u[targets]
    if distractors is not None:
        direction = direction - w_u[:, distractors].T
        const = const - b_u[distractors]
    _, bias, _ = final_norm(model)
    if bias is not None:
        const = const + direction @ bias
    return direction, const


def project(model, parts: Components, targets: torch.Tensor, distractors: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, list[str]]:
    """Each component's contribution ``[B, C + 1]`` to ``logit(t)`` (or ``logit(t) - logit(d)``),
    the last column being the constant ``bias`` term; the row sums are the model's values."""
    direction, const = directions(model, torch.as_tensor(targets), None if distractors is None
                                  else torch.as_tensor(distractors))
    values = torch.einsum("bcm,bm->bc", normed(model, parts.vectors, parts.scale), direction)
    return torch.cat([values, const[:, None]], 1), parts.labels + ["bias"]


def vocab_contributions(model, vectors: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Direct effect ``[..., V]`` of residual vectors ``[..., D]`` (with frozen ``scale``
    broadcastable to ``[...]``) on every logit (no bias terms)."""
    weight, _, centred = final_norm(model)
    if centred:
        vectors = vectors - vectors.mean(-1, keepdim=True)
    return (vectors * weight / scale[..., None]) @ model.bridge.W_U.detach().float().cpu()


def answer_token(model, text: str) -> int:
    """First token id of ``text`` tokenized on its own (no special tokens).

    Raises:
        InputError: the text has no token.
    """
    ids = model.tokenizer(str(text), add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"target '{text}' has no token: give a non-empty answer/target")
    return int(ids[0])
