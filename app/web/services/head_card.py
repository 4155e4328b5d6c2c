"""Head card: what one head of the analysed prompt reads and writes (docs/metrics.md §11).

For the selected head of the session's analysis: a pattern thumbnail, its scores in the
analysis table, the tokens it promotes and suppresses at the last prompt token (its direct
logit attribution over the vocabulary, final norm frozen from the clean run), its direct
contribution to the top predicted token and to a typed target token, and its strongest
composition partners. The decomposition (one forward) is cached per analysis, the composition
basis (weights only) per model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from app.web.services.analysis import Analysis
from workbench.circuits import CompositionBasis, composition_basis, composition_scores, partners
from workbench.errors import InputError
from workbench.logit_attribution import Components, answer_token, components, project, vocab_contributions
from workbench.model import load_model

_LOCK = threading.Lock()
_PARTS: OrderedDict[tuple, Components] = OrderedDict()
_BASES: dict[str, CompositionBasis] = {}
_KEEP = 4


@dataclass
class HeadCard:
    """Everything the card shows about head ``L{layer}H{head}``.

    Attributes:
        scores: ``probe, metric, value, ci_low, ci_high`` rows of the analysis table.
        promoted, suppressed: ``token, value`` (the head's direct effect on each logit).
        top_token, top_value: the model's top prediction and the head's contribution to its logit.
        target_token, target_value, target_rank: the typed target (None when none typed), the
            head's contribution and the head's rank among all heads for that target (1 = largest).
        partners: ``kind, role, layer, head, score``.
    """

    layer: int
    head: int
    scores: pd.DataFrame
    promoted: pd.DataFrame
    suppressed: pd.DataFrame
    top_token: str
    top_value: float
    target_token: str | None
    target_value: float | None
    target_rank: int | None
    partners: pd.DataFrame


def _components(model, analysis: Analysis) -> Components:
    key = (analysis.model_name, id(analysis), analysis.prompt)
    with _LOCK:
        if key in _PARTS:
            _PARTS.move_to_end(key)
            return _PARTS[key]
    parts = components(model, analysis.batch)
    with _LOCK:
        _PARTS[key] = parts
        while len(_PARTS) > _KEEP:
            _PARTS.popitem(last=False)
    return parts


def _basis(model, name: str) -> CompositionBasis:
    with _LOCK:
        basis = _BASES.get(name)
    if basis is None:
        basis = composition_basis(model)
        with _LOCK:
            _BASES[name] = basis
    return basis


def head_card(analysis: Analysis, layer: int, head: int, target: str | None = None, k: int = 8,
              n_partners: int = 6) -> HeadCard:
    """Compute the card of one head (see :class:`HeadCard`).

    Raises:
        InputError: head out of range, an encoder model, or a target with no token.
    """
    model = load_model(analysis.model_name)
    layer, head = int(layer), int(head)
    model.check_heads([layer], [head])
    parts = _components(model, analysis)
    index = parts.head_index[layer, head]
    effect = vocab_contributions(model, parts.vectors[0, index], parts.scale[0])   # [V]
    top = int(parts.logits[0].argmax())
    top_k = torch.topk(effect, k)
    low_k = torch.topk(-effect, k)
    promoted = pd.DataFrame({"token": model.str_tokens(top_k.indices), "value": top_k.values.tolist()})
    suppressed = pd.DataFrame({"token": model.str_tokens(low_k.indices), "value": (-low_k.values).tolist()})
    target_token = target_value = target_rank = None
    if target is not None and str(target) != "":
        tid = answer_token(model, target)
        values, _ = project(model, parts, torch.tensor([tid]))
        all_heads = values[0, parts.head_index.flatten()]
        target_token = model.tokenizer.decode([tid])
        target_value = float(effect[tid])
        target_rank = int((all_heads > all_heads[layer * model.n_heads + head]).sum()) + 1
    frame = analysis.frame
    rows = frame[(frame["layer"] == layer) & (frame["head"] == head)]
    scores = rows[["probe", "metric", "value", "ci_low", "ci_high"]].reset_index(drop=True)
    comp = composition_scores(model, focus=(layer, head), basis=_basis(model, analysis.model_name))
    return HeadCard(layer, head, scores, promoted, suppressed, model.tokenizer.decode([top]), float(effect[top]),
                    target_token, target_value, target_rank, partners(comp, layer, head, n_partners))


def thumbnail(analysis: Analysis, layer: int, head: int) -> go.Figure:
    """A small pattern heatmap of the head on the analysed prompt."""
    from app.web.services.patterns import pattern_view

    fig, _, _ = pattern_view(analysis, layer, head)
    fig.update_layout(height=220, width=260, title=None, margin=dict(l=10, r=10, t=10, b=10), showlegend=False)
    fig.update_xaxes(showticklabels=False, title=None)
    fig.update_yaxes(showticklabels=False, title=None)
    fig.update_traces(showscale=False)
    return fig


def parse_head_query(search: str | None) -> tuple[int, int] | None:
    """``(layer, head)`` from a URL query ``?head=L9H3``; None when absent.

    Raises:
        InputError: a malformed ``head`` value.
    """
    if not search:
        return None
    from urllib.parse import parse_qs

    value = parse_qs(search.lstrip("?")).get("head", [None])[0]
    if value is None:
        return None
    text = value.upper()
    try:
        layer, head = text.lstrip("L").split("H")
        return int(layer), int(head)
    except ValueError:
        raise InputError(f"head '{value}' in the address is not of the form L<layer>H<head> (e.g. L9H3)") from None
