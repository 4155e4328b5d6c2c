"""OV and QK circuits of a head and composition scores between heads (docs/metrics.md §11).

Row-vector convention (TransformerLens): a head reads ``x W_V`` and writes ``z W_O``, so its
OV circuit is ``W_OV = W_V W_O`` ``[D, D]`` and its QK circuit ``W_QK = W_Q W_K^T`` ``[D, D]``.
Weights are read from the bridge (``W_Q/W_K/W_V [n_layers, H_kv or H, D, d]``, ``W_O [H, d, D]``);
under grouped-query attention query head ``h`` uses key/value head ``h // (H / H_kv)``. The
norm in front of a head is folded in as its elementwise weight (``diag(w_ln1) W``; centring and
the data-dependent scale are left out), as is the final norm's weight in front of ``W_U``.

Composition of an earlier head 1 into a later head 2 (Elhage et al. 2021)::

    Q: ‖W_OV¹ W_QK²‖_F / (‖W_OV¹‖_F ‖W_QK²‖_F)     K: same with W_QK²ᵀ     V: same with W_OV²

computed through ``d × d`` Gram matrices (never forming a ``D × D`` product per pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from workbench.errors import InputError

KINDS = ("q", "k", "v")


def kv_head(model, head: int) -> int:
    """Key/value head index used by query ``head`` (grouped-query attention)."""
    return head // (model.n_heads // model.n_kv_heads)


def _ln_weight(model, layer: int | None) -> torch.Tensor:
    """Elementwise weight ``[D]`` of block ``layer``'s attention input norm (None: the final norm)."""
    module = model.bridge.ln_final if layer is None else model.bridge.blocks[layer].ln1
    weight = getattr(getattr(module, "original_component", module), "weight", None)
    return torch.ones(model.bridge.cfg.d_model) if weight is None else weight.detach().float().cpu()


def layer_weights(model, layer: int) -> dict[str, torch.Tensor]:
    """Per query head weights of ``layer``, norm weight folded: ``Q, K, V [H, D, d]``, ``O [H, d, D]``."""
    attn = model.bridge.blocks[layer].attn
    ln = _ln_weight(model, layer)[None, :, None]
    index = torch.tensor([kv_head(model, h) for h in range(model.n_heads)])

    def per_query(weight: torch.Tensor) -> torch.Tensor:
        weight = weight.detach().float().cpu()
        return weight[index] if weight.shape[0] != model.n_heads else weight
    return {"Q": attn.W_Q.detach().float().cpu() * ln, "K": per_query(attn.W_K) * ln,
            "V": per_query(attn.W_V) * ln, "O": attn.W_O.detach().float().cpu()}


def _check_head(model, layer: int, head: int) -> None:
    model.check_heads([layer], [head])


def _token_id(model, token: int | str) -> int:
    if isinstance(token, str):
        ids = model.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"'{token}' is {len(ids)} tokens: give text that is exactly one token, or its id")
        return int(ids[0])
    token = int(token)
    if not 0 <= token < model.bridge.cfg.d_vocab:
        raise InputError(f"token id {token} outside the vocabulary (0..{model.bridge.cfg.d_vocab - 1})")
    return token


def _embedding_rows(model, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Token embeddings ``[n, D]`` scaled to unit RMS (what the first norm hands a head)."""
    w_e = model.bridge.W_E.detach().float().cpu()
    rows = w_e if ids is None else w_e[ids]
    return rows / rows.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def _top(model, values: torch.Tensor, k: int, largest: bool) -> pd.DataFrame:
    top = torch.topk(values, k=min(k, values.numel()), largest=largest)
    return pd.DataFrame({"token_id": top.indices.tolist(),
                         "token": [model.tokenizer.decode([i]) for i in top.indices.tolist()],
                         "value": top.values.tolist()})


def ov_tokens(model, layer: int, head: int, source: int | str, k: int = 10) -> dict[str, pd.DataFrame]:
    """Full-vocabulary OV circuit of a head for one source token (weight-based).

    ``W_E[src] (unit RMS) · diag(w_ln1) W_V W_O · diag(w_ln_final) W_U`` -> the ``k`` tokens
    it promotes most (``"promoted"``) and suppresses most (``"suppressed"``), columns
    ``token_id, token, value``.
    """
    _check_head(model, layer, head)
    w = layer_weights(model, layer)
    x = _embedding_rows(model, torch.tensor([_token_id(model, source)]))[0]
    out = (x @ w["V"][head] @ w["O"][head]) * _ln_weight(model, None)
    logits = out @ model.bridge.W_U.detach().float().cpu()
    return {"promoted": _top(model, logits, k, True), "suppressed": _top(model, logits, k, False)}


def qk_keys(model, layer: int, head: int, query: int | str, k: int = 10) -> pd.DataFrame:
    """Weight-based QK circuit: the ``k`` key tokens a query token attends to most (no
    positional rotation), columns ``token_id, token, value`` (the bilinear score ``q · k``)."""
    _check_head(model, layer, head)
    w = layer_weights(model, layer)
    q = _embedding_rows(model, torch.tensor([_token_id(model, query)]))[0] @ w["Q"][head]  # [d]
    keys = _embedding_rows(model) @ w["K"][head]  # [V, d]
    return _top(model, keys @ q, k, True)


def _gram(a: torch.Tensor) -> torch.Tensor:
    """``a^T a`` over the middle axis: ``[n, D, d] -> [n, d, d]``."""
    return a.transpose(1, 2) @ a


@dataclass
class CompositionBasis:
    """What every composition score is computed from (reusable across calls on one model).

    Attributes:
        layers: the layers stacked; heads are layer-major (index ``i = position(layer) * H + head``).
        Q, K, V: ``[n, D, d]`` per query head (norm weight folded); O: ``[n, d, D]``.
        g_q, g_k, g_v: ``[n, d, d]`` Gram matrices ``W^T W``; g_o: ``O O^T``.
        ov_norm, qk_norm: ``[n]`` Frobenius norms of ``W_OV`` and ``W_QK``.
    """

    layers: list[int]
    n_heads: int
    Q: torch.Tensor
    K: torch.Tensor
    V: torch.Tensor
    O: torch.Tensor
    g_q: torch.Tensor
    g_k: torch.Tensor
    g_v: torch.Tensor
    g_o: torch.Tensor
    ov_norm: torch.Tensor
    qk_norm: torch.Tensor


def composition_basis(model, layers: list[int] | None = None) -> CompositionBasis:
    """Stack the heads of ``layers`` (default all) and their Gram matrices."""
    layers, _ = model.check_heads(layers, None)
    weights = {layer: layer_weights(model, layer) for layer in layers}
    stack = {name: torch.cat([weights[layer][name] for layer in layers]) for name in "QKVO"}
    g_v, g_q, g_k = _gram(stack["V"]), _gram(stack["Q"]), _gram(stack["K"])
    g_o = stack["O"] @ stack["O"].transpose(1, 2)
    ov_norm = torch.einsum("nij,nji->n", g_v, g_o).clamp_min(0).sqrt()   # ‖V O‖_F
    qk_norm = (g_q * g_k).sum((1, 2)).clamp_min(0).sqrt()               # ‖Q K^T‖_F
    return CompositionBasis(list(layers), model.n_heads, stack["Q"], stack["K"], stack["V"], stack["O"],
                            g_q, g_k, g_v, g_o, ov_norm, qk_norm)


def composition_scores(model, kinds: tuple[str, ...] = KINDS, layers: list[int] | None = None,
                       focus: tuple[int, int] | None = None, basis: CompositionBasis | None = None) -> pd.DataFrame:
    """Q-, K- and V-composition of every earlier head into every later head.

    Args:
        kinds: any of ``"q"``, ``"k"``, ``"v"``.
        layers: restrict both ends to these layers (default all; ignored when ``basis`` is given).
        focus: ``(layer, head)``: only the pairs involving that head (cost linear, not
            quadratic, in the number of heads).
        basis: a :func:`composition_basis` to reuse (e.g. cached by the app).
    Returns:
        a tidy table with columns ``kind, src_layer, src_head, dst_layer, dst_head, score``, one
        row per pair with ``src_layer < dst_layer`` and per kind.
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise InputError(f"unknown composition kind '{bad[0] if bad else ''}': use q, k or v")
    if basis is None:
        if focus is not None:
            layers = None if layers is None else sorted(set(layers) | {int(focus[0])})
        basis = composition_basis(model, layers)
    H, layers = basis.n_heads, basis.layers
    focus_index = None
    if focus is not None:
        model.check_heads([focus[0]], [focus[1]])
        if int(focus[0]) not in layers:
            raise InputError(f"layer {focus[0]} is not in the composition basis: build it with that layer")
        focus_index = layers.index(int(focus[0])) * H + int(focus[1])
    n = len(layers) * H
    layer_of = np.repeat(layers, H)
    head_of = np.tile(np.arange(H), len(layers))
    # reader matrix R entering after O1, the Gram of what follows, the norm of the later head's circuit
    readers = {"q": (basis.Q, basis.g_k, basis.qk_norm), "k": (basis.K, basis.g_q, basis.qk_norm),
               "v": (basis.V, basis.g_o, basis.ov_norm)}
    frames = []
    for kind in kinds:
        reader, g_after, norm2 = readers[kind]
        for i in range(n):
            later = np.nonzero(layer_of > layer_of[i])[0]
            if focus_index is not None and i != focus_index:
                later = later[later == focus_index]
            if not len(later):
                continue
            m = torch.einsum("dk,jke->jde", basis.O[i], reader[later])          # O1 R2 [j, d, d]
            left = torch.einsum("ab,jbc->jac", basis.g_v[i], m)                 # G_V1 M
            right = m @ g_after[later]                                           # M G2
            value = (left * right).sum((1, 2)).clamp_min(0).sqrt()
            score = value / (basis.ov_norm[i] * norm2[later]).clamp_min(1e-30)
            frames.append(pd.DataFrame({"kind": kind, "src_layer": int(layer_of[i]), "src_head": int(head_of[i]),
                                        "dst_layer": layer_of[later].astype(int), "dst_head": head_of[later].astype(int),
                                        "score": score.numpy()}))
    if not frames:
        raise InputError("composition needs heads in at least two layers: widen the layer selection")
    return pd.concat(frames, ignore_index=True)


def partners(scores: pd.DataFrame, layer: int, head: int, k: int = 5) -> pd.DataFrame:
    """The ``k`` strongest composition partners of a head (as reader or writer), with
    columns ``kind, role, layer, head, score`` (``role``: the partner writes into this head,
    ``"writer"``, or reads from it, ``"reader"``)."""
    into = scores[(scores.dst_layer == layer) & (scores.dst_head == head)]
    out = scores[(scores.src_layer == layer) & (scores.src_head == head)]
    rows = pd.concat([
        pd.DataFrame({"kind": into.kind, "role": "writer", "layer": into.src_layer, "head": into.src_head,
                      "score": into.score}),
        pd.DataFrame({"kind": out.kind, "role": "reader", "layer": out.dst_layer, "head": out.dst_head,
                      "score": out.score}),
    ], ignore_index=True)
    return rows.sort_values("score", ascending=False).head(k).reset_index(drop=True)


def composition_figure(scores: pd.DataFrame, kind: str = "k") -> go.Figure:
    """Heatmap of one composition kind: writer heads (rows) × reader heads (columns), layer-major."""
    rows = scores[scores.kind == kind]
    if rows.empty:
        raise InputError(f"no '{kind}' composition scores in the table: compute them with kinds including '{kind}'")
    src = rows.src_layer.astype(str).radd("L") + "H" + rows.src_head.astype(str)
    dst = rows.dst_layer.astype(str).radd("L") + "H" + rows.dst_head.astype(str)
    order = sorted(set(src) | set(dst), key=lambda s: tuple(int(x) for x in s[1:].split("H")))
    grid = pd.DataFrame({"src": src, "dst": dst, "score": rows.score}).pivot(index="src", columns="dst", values="score")
    grid = grid.reindex(index=order, columns=order)
    figure = go.Figure(go.Heatmap(z=grid.values, x=order, y=order, colorscale="Viridis",
                                  colorbar={"title": "score"},
                                  hovertemplate="writer %{y} → reader %{x}<br>score %{z:.3f}<extra></extra>"))
    figure.update_layout(title=f"{kind.upper()}-composition", xaxis_title="reader head (later layer)",
                         yaxis_title="writer head (earlier layer)", yaxis_autorange="reversed")
    return figure
