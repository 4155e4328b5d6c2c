"""Per-head interventions (METRICS §7): the spec, its validation and the exact rules.

Every intervention acts on one query head ``(layer, head)`` of a forward:

- output-level (at the per-head output ``z [B, N, Hq, d]`` before ``W_O``, TransformerLens
  ``hook_z``): ``zero`` (z_h <- 0), ``mean`` (z_h <- the reference mean, see
  :class:`ReferenceZ`), ``resample`` (z_h <- the value on another input), ``scale``
  (z_h <- alpha z_h);
- pattern-level (on the head's attention ``A``): ``softpag`` (A <- (1-u) A + u I) and
  ``redistribute`` (the VAR rule of METRICS §3, :func:`redistribute_delta`).

Order: on one head, pattern-level edits run first (the pattern exists before its output),
each group in list order; different heads are independent. Two equivalent implementations:
``hooks()`` (patterns mode: TransformerLens hooks on the bridge, ``hook_pattern`` then
``hook_z``) and ``z_editors()`` (stats mode: ``z`` editors for
:func:`workbench.kernel_attention.kernel_forward`; pattern edits become exact ``z`` corrections
from ``v`` and probabilities recomputed as ``exp(scale q·k - LSE)`` on the needed columns only).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from workbench.batch import TokenBatch
from workbench.errors import InputError
from workbench.kernel_attention import AttentionCall, ZEditor, kernel_forward
from workbench.model import bind_hook, Hook, hook_name, HookedModel

InterventionKind = Literal["zero", "mean", "resample", "scale", "softpag", "redistribute"]
KINDS: tuple[str, ...] = ("zero", "mean", "resample", "scale", "softpag", "redistribute")
PATTERN_KINDS = ("softpag", "redistribute")
SPAN_MASS_MIN = 0.2
"""VAR selection: a query is redistributed only when its mass on the target span is >= this."""


@dataclass(frozen=True)
class HeadIntervention:
    """One intervention on query head ``head`` of layer ``layer`` (see module docstring)."""

    layer: int
    head: int
    kind: InterventionKind
    alpha: float = 1.0
    u: float = 0.5
    keep: float = 0.6
    rho: float = 0.5
    span: tuple[int, int] | None = None
    sink_positions: tuple[int, ...] = (0,)

    @property
    def label(self) -> str:
        """Text form accepted by :func:`parse_interventions` (e.g. ``L5H1:scale=2``)."""
        base = f"L{self.layer}H{self.head}:{self.kind}"
        if self.kind == "scale":
            return f"{base}={self.alpha:g}"
        if self.kind == "softpag":
            return f"{base}={self.u:g}"
        if self.kind == "redistribute":
            text = f"{base}={self.keep:g};rho={self.rho:g};sinks={'+'.join(map(str, self.sink_positions))}"
            return text + (f";span={self.span[0]}:{self.span[1]}" if self.span is not None else "")
        return base

    def check(self, model: HookedModel) -> None:
        """Raise :class:`InputError` for an index or parameter out of range."""
        name = self.label.split(":")[0]
        if self.kind not in KINDS:
            raise InputError(f"{name}: unknown intervention '{self.kind}': use one of {', '.join(KINDS)}")
        model.check_heads([self.layer], [self.head])
        for field, value, low, high in (("alpha", self.alpha, 0.0, float("inf")), ("u", self.u, 0.0, 1.0),
                                        ("keep", self.keep, 0.0, 1.0), ("rho", self.rho, 0.0, 1.0)):
            if not (low <= float(value) <= high):
                bound = ">= 0" if high == float("inf") else f"in [{low:g}, {high:g}]"
                raise InputError(f"{name}: {field}={value} out of range: it must be {bound}")
        if self.kind != "redistribute":
            return
        if self.layer == model.n_layers - 1:
            raise InputError(f"{name}: redistribute leaves the last layer unmodified (METRICS §3): "
                             f"pick a layer below {model.n_layers - 1}")
        if self.span is not None:
            t0, t1 = (int(x) for x in self.span)
            if not 0 <= t0 < t1 <= model.n_ctx:
                raise InputError(f"{name}: span [{t0}, {t1}) is empty or outside the context: "
                                 "give token offsets with 0 <= t0 < t1")
        if not self.sink_positions or any(int(p) < 0 for p in self.sink_positions):
            raise InputError(f"{name}: sink_positions must be a non-empty tuple of positions >= 0")


class ReferenceZ:
    """Replacement values of one site from a reference forward.

    Args:
        z: ``[R, Nr, *rest]`` clean per-head outputs of the reference batch (e.g. ``[R, Nr, d]``).
        mask: ``[R, Nr]`` bool, real tokens.

    Rules (both position-local, so a KV-cached generation sees the same values as a full rerun):
        mean: position p takes the mean over reference samples that have a real token at p;
            positions past the longest reference sample take the mean over all real positions.
            With the batch itself (or any reference of the same length) as reference this is
            exactly the per-position mean.
        resample: sample b takes reference sample ``r(b) = (b + 1) mod R`` (a cyclic shift, so a
            batch used as its own reference never keeps its own values; ``R = 1``: sample 0) at
            the same position; positions at or past that sample's length take its mean over its
            real positions.
    """

    def __init__(self, z: torch.Tensor, mask: torch.Tensor) -> None:
        z = z.detach().float()
        mask = mask.to(z.device)
        weights = mask.to(z.dtype).reshape(*mask.shape, *([1] * (z.dim() - 2)))
        self.count = mask.sum(0)  # [Nr]
        self.per_position = (z * weights).sum(0) / self.count.clamp_min(1).reshape(-1, *([1] * (z.dim() - 2)))
        self.pooled = (z * weights).sum((0, 1)) / mask.sum().clamp_min(1)
        self.lengths = mask.sum(1)  # [R]
        self.per_sample = (z * weights).sum(1) / self.lengths.clamp_min(1).reshape(-1, *([1] * (z.dim() - 2)))
        self.z = z

    def mean_at(self, positions: torch.Tensor) -> torch.Tensor:
        """``[n, *rest]`` mean values at absolute ``positions [n]``."""
        n_ref = self.per_position.shape[0]
        positions = positions.to(self.z.device)
        inside = positions < n_ref
        safe = positions.clamp(max=n_ref - 1)
        has = inside & (self.count[safe] > 0)
        shape = (-1, *([1] * (self.per_position.dim() - 1)))
        return torch.where(has.reshape(shape), self.per_position[safe], self.pooled)

    def resample_at(self, batch_size: int, positions: torch.Tensor) -> torch.Tensor:
        """``[batch_size, n, *rest]`` resampled values at absolute ``positions [n]``."""
        n_samples, n_ref = self.z.shape[:2]
        positions = positions.to(self.z.device)
        source = (torch.arange(batch_size, device=self.z.device) + 1) % n_samples
        safe = positions.clamp(max=n_ref - 1)
        values = self.z[source][:, safe]  # [b, n, *rest]
        inside = positions[None, :] < self.lengths[source][:, None]  # [b, n]
        inside = inside.reshape(*inside.shape, *([1] * (values.dim() - 2)))
        return torch.where(inside, values, self.per_sample[source][:, None])


def redistribute_delta(probs: torch.Tensor, is_sink: torch.Tensor, in_span: torch.Tensor,
                       keep: float, rho: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """VAR change of the attention on a set of columns (METRICS §3).

    Args:
        probs: ``[..., C]`` current probabilities of each query row on C columns.
        is_sink, in_span: ``[C]`` bool: the column is a sink / in the target span.
        keep: fraction p of the sink mass kept; rho: non-sink share threshold.
        valid: ``[...]`` rows that may be edited (real queries); None = all.
    Returns:
        ``[..., C]`` additive change: sinks lose ``(1-p)`` of their weight and the freed mass
        ``Ω`` goes to the non-sink span columns in proportion to their weights, for rows whose
        span mass is >= 0.2 and whose non-sink share of it is >= rho (zero elsewhere).
    """
    sink = probs * is_sink
    target = probs * (in_span & ~is_sink)
    span_mass = (probs * in_span).sum(-1, keepdim=True)
    target_mass = target.sum(-1, keepdim=True)
    selected = (span_mass >= SPAN_MASS_MIN) & (target_mass >= rho * span_mass) & (target_mass > 0)
    if valid is not None:
        selected = selected & valid[..., None]
    omega = (1.0 - keep) * sink.sum(-1, keepdim=True)
    delta = -(1.0 - keep) * sink + omega * target / target_mass.clamp_min(torch.finfo(probs.dtype).tiny)
    return torch.where(selected, delta, torch.zeros_like(delta))


def _identity_columns(positions: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``[n, C]`` float: 1 where the column is the query's own position (the ``I`` of SoftPAG)."""
    return (columns[None, :] == positions[:, None]).float()


def _sink_and_span(item: HeadIntervention, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[C]`` bool masks: the column is a sink / in the target span (``span=None``: every column)."""
    is_sink = torch.isin(columns, torch.tensor(item.sink_positions, device=columns.device))
    if item.span is None:
        return is_sink, torch.ones_like(is_sink)
    return is_sink, (columns >= item.span[0]) & (columns < item.span[1])


def _edit_pattern(item: HeadIntervention, pattern: torch.Tensor) -> torch.Tensor:
    """Apply a pattern-level edit to one head's full map ``[B, Nq, Nk]`` (query i at i + Nk - Nq)."""
    n_q, n_k = pattern.shape[-2:]
    columns = torch.arange(n_k, device=pattern.device)
    positions = columns[n_k - n_q:]
    if item.kind == "softpag":
        return (1 - item.u) * pattern + item.u * _identity_columns(positions, columns).to(pattern.dtype)
    is_sink, in_span = _sink_and_span(item, columns)
    return pattern + redistribute_delta(pattern.float(), is_sink, in_span, item.keep, item.rho).to(pattern.dtype)


def _edit_output(item: HeadIntervention, z: torch.Tensor, positions: torch.Tensor,
                 reference: ReferenceZ | None) -> torch.Tensor:
    """Apply an output-level edit to one head's ``z [B, n, d]`` at absolute ``positions [n]``."""
    if item.kind == "zero":
        return torch.zeros_like(z)
    if item.kind == "scale":
        return z * item.alpha
    if item.kind == "mean":
        return reference.mean_at(positions.cpu()).to(z)[None].expand_as(z)
    return reference.resample_at(z.shape[0], positions.cpu()).to(z)


class InterventionSet:
    """An ordered, composable collection of :class:`HeadIntervention`.

    Args:
        items: the interventions (applied in list order; pattern-level before output-level on
            one head).
        reference: the batch whose clean per-head outputs feed ``mean`` / ``resample``.
    """

    def __init__(self, items: Iterable[HeadIntervention] = (), *, reference: TokenBatch | None = None) -> None:
        self.items: tuple[HeadIntervention, ...] = tuple(items)
        self.reference = reference
        for item in self.items:
            if not isinstance(item, HeadIntervention):
                raise InputError(f"interventions must be HeadIntervention objects, got {type(item).__name__}")

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"InterventionSet({self.text!r}, reference={'yes' if self.reference is not None else 'no'})"

    @property
    def text(self) -> str:
        """Comma-separated text form (round-trips through :func:`parse_interventions`)."""
        return ", ".join(item.label for item in self.items)

    def with_reference(self, reference: TokenBatch | None) -> "InterventionSet":
        return InterventionSet(self.items, reference=reference)

    def validate(self, model: HookedModel, batch: TokenBatch | None = None) -> None:
        """Raise :class:`InputError` before anything runs (indices, parameters, spans, reference)."""
        for item in self.items:
            item.check(model)
            if item.kind in ("mean", "resample") and self.reference is None:
                raise InputError(f"{item.label}: {item.kind} ablation needs a reference batch: "
                                 "pass InterventionSet(..., reference=batch)")
            if item.kind == "redistribute" and batch is not None and item.span is not None \
                    and item.span[1] > batch.tokens.shape[1]:
                raise InputError(f"{item.label}: span end {item.span[1]} is past the input length "
                                 f"{batch.tokens.shape[1]}: give token offsets inside the prompt")
        if self.reference is not None and not isinstance(self.reference, TokenBatch):
            raise InputError("the reference must be a TokenBatch: build it with model.tokenize(prompts)")
        if self.reference is not None and len(self.reference) == 0:
            raise InputError("the reference batch is empty: give at least one sample")

    # ------------------------------------------------------------ reference values
    def _needed_reference(self) -> list[tuple[int, int]]:
        return sorted({(i.layer, i.head) for i in self.items if i.kind in ("mean", "resample")})

    def reference_values(self, model: HookedModel, mode: str = "patterns") -> dict[tuple[int, int], ReferenceZ]:
        """Clean per-head outputs of the reference batch for every mean/resample head."""
        needed = self._needed_reference()
        if not needed:
            return {}
        layers = sorted({layer for layer, _ in needed})
        store: dict[int, torch.Tensor] = {}
        ref = self.reference
        if mode == "patterns":
            def keep(z, hook, layer):
                store[layer] = z.detach().float().cpu()
                return z
            hooks = [(hook_name(layer, "z"), bind_hook(keep, layer=layer)) for layer in layers]
            model.run(ref, fwd_hooks=hooks, stop_at_layer=layers[-1] + 1)
        else:
            def record(z, call):
                if call.layer in layers:
                    store[call.layer] = z.detach().float().cpu()
                return z
            with model.lock, torch.no_grad(), kernel_forward(ref.mask, z_editors=[record]):
                device = model.kernel_model.device
                model.kernel_model(input_ids=ref.tokens.to(device), attention_mask=ref.mask.long().to(device))
        return {(layer, head): ReferenceZ(store[layer][:, :, head], ref.mask.cpu()) for layer, head in needed}

    # ------------------------------------------------------------ patterns mode
    def hooks(self, model: HookedModel, batch: TokenBatch | None = None) -> list[Hook]:
        """TransformerLens hooks (``hook_pattern`` / ``hook_z``) for ``model.run(fwd_hooks=...)``."""
        self.validate(model, batch)
        refs = self.reference_values(model, "patterns")
        hooks: list[Hook] = []
        for layer in sorted({i.layer for i in self.items}):
            pattern_items = [i for i in self.items if i.layer == layer and i.kind in PATTERN_KINDS]
            output_items = [i for i in self.items if i.layer == layer and i.kind not in PATTERN_KINDS]
            if pattern_items:
                hooks.append((hook_name(layer, "pattern"), bind_hook(_pattern_hook, items=pattern_items)))
            if output_items:
                hooks.append((hook_name(layer, "z"), bind_hook(_z_hook, items=output_items, refs=refs)))
        return hooks

    # ------------------------------------------------------------ stats mode
    def z_editors(self, model: HookedModel, batch: TokenBatch | None = None) -> list[ZEditor]:
        """Editors ``(z, call) -> z`` for :func:`workbench.kernel_attention.kernel_forward`."""
        self.validate(model, batch)
        if not self.items:
            return []
        refs = self.reference_values(model, "stats")
        by_layer: dict[int, list[HeadIntervention]] = {}
        for item in self.items:
            by_layer.setdefault(item.layer, []).append(item)

        def edit(z: torch.Tensor, call: AttentionCall) -> torch.Tensor:
            items = by_layer.get(call.layer)
            if not items:
                return z
            z = z.clone()
            offset = call.key.shape[2] - call.query.shape[2]
            positions = torch.arange(z.shape[1], device=z.device) + offset
            for head in dict.fromkeys(i.head for i in items):
                mine = [i for i in items if i.head == head]
                zh = z[:, :, head].float()
                pattern_items = [i for i in mine if i.kind in PATTERN_KINDS]
                if pattern_items:
                    zh = _stats_pattern_edits(pattern_items, zh, call, head, positions)
                for item in mine:
                    if item.kind not in PATTERN_KINDS:
                        zh = _edit_output(item, zh, positions, refs.get((item.layer, head)))
                z[:, :, head] = zh.to(z.dtype)
            return z
        return [edit]



def _pattern_hook(pattern: torch.Tensor, hook, *, items: list[HeadIntervention]) -> torch.Tensor:
    """``hook_pattern [B, Hq, Nq, Nk]``: pattern edits in list order."""
    pattern = pattern.clone()
    for item in items:
        pattern[:, item.head] = _edit_pattern(item, pattern[:, item.head])
    return pattern


def _z_hook(z: torch.Tensor, hook, *, items: list[HeadIntervention],
            refs: dict[tuple[int, int], ReferenceZ]) -> torch.Tensor:
    """``hook_z [B, N, Hq, d]``: output edits in list order."""
    z = z.clone()
    positions = torch.arange(z.shape[1], device=z.device)
    for item in items:
        z[:, :, item.head] = _edit_output(item, z[:, :, item.head], positions, refs.get((item.layer, item.head)))
    return z


def _stats_pattern_edits(items: list[HeadIntervention], zh: torch.Tensor, call: AttentionCall,
                         head: int, positions: torch.Tensor) -> torch.Tensor:
    """Pattern edits of one head as exact ``z`` corrections (stats mode).

    ``zh [B, Nq, d]`` fp32. SoftPAG: ``z <- (1-u) z + u v_self``. Redistribute: ``z += Σ_j ΔA_ij v_j``
    over the sink and span columns, with ``A_ij = exp(scale q_i·k_j - LSE_i)`` recomputed on those
    columns only; without a span the non-sink remainder is one aggregate column whose weighted
    value is ``z - Σ_{j in C} A_ij v_j``. Earlier edits are tracked on the columns so later ones
    see the edited pattern.
    """
    kv_head = head // (call.query.shape[1] // call.key.shape[1])
    values = call.value[:, kv_head].float()  # [B, Nk, d]
    n_k = values.shape[1]
    v_self = values[:, positions]
    redistributes = [i for i in items if i.kind == "redistribute"]
    cols = sorted({p for i in redistributes for p in i.sink_positions if p < n_k}
                  | {p for i in redistributes if i.span is not None for p in range(i.span[0], min(i.span[1], n_k))})
    columns = torch.tensor(cols, dtype=torch.long, device=zh.device)
    with_rest = any(i.span is None for i in redistributes)
    probs = rest_mass = rest_sum = valid = None
    if redistributes:
        probs, valid = _column_probs(call, head, kv_head, columns, positions)
        v_cols = values[:, columns]  # [B, C, d]
        if with_rest:
            rest_mass = torch.where(valid, 1.0 - probs.sum(-1), torch.zeros_like(valid, dtype=probs.dtype))
            rest_sum = zh - probs @ v_cols
    outside = (~torch.isin(positions, columns)).float()[None, :, None]  # the own column lies in the rest
    for item in items:
        if item.kind == "softpag":
            zh = (1 - item.u) * zh + item.u * v_self
            if probs is not None:
                probs = (1 - item.u) * probs + item.u * _identity_columns(positions, columns)[None]
            if rest_mass is not None:
                rest_mass = (1 - item.u) * rest_mass + item.u * outside[..., 0]
                rest_sum = (1 - item.u) * rest_sum + item.u * outside * v_self
            continue
        is_sink, in_span = _sink_and_span(item, columns)
        full = probs
        if with_rest:
            full = torch.cat([probs, rest_mass[..., None]], -1)
            is_sink = torch.cat([is_sink, is_sink.new_zeros(1)])
            in_span = torch.cat([in_span, in_span.new_full((1,), item.span is None)])
        delta = redistribute_delta(full, is_sink, in_span, item.keep, item.rho, valid)
        zh = zh + delta[..., :len(cols)] @ v_cols
        probs = probs + delta[..., :len(cols)]
        if with_rest:
            grow = torch.where(rest_mass > 0, delta[..., -1] / rest_mass.clamp_min(1e-30), torch.zeros_like(rest_mass))
            zh = zh + grow[..., None] * rest_sum
            rest_sum = rest_sum * (1 + grow[..., None])
            rest_mass = rest_mass + delta[..., -1]
    return zh


def _column_probs(call: AttentionCall, head: int, kv_head: int, columns: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A[:, :, columns] [B, Nq, C] fp32, real-row mask [B, Nq])`` of one head from q, k, LSE.

    The LSE comes from :func:`kernels.attention_with_stats` on this head alone (streaming, no map).
    """
    from kernels import attention_with_stats

    q = call.query[:, head:head + 1]
    k = call.key[:, kv_head:kv_head + 1]
    lse = attention_with_stats(q, k, call.value[:, kv_head:kv_head + 1], causal=call.causal,
                               key_padding_mask=call.key_padding_mask, scale=call.scale).lse[:, 0]
    logits = call.scale * torch.einsum("bqd,bcd->bqc", q[:, 0].float(), k[:, 0, columns].float())
    visible = torch.ones(len(positions), len(columns), dtype=torch.bool, device=q.device)
    if call.causal:
        visible = columns[None, :] <= positions[:, None]
    visible = visible[None] & torch.isfinite(lse)[..., None]
    if call.key_padding_mask is not None:
        visible = visible & call.key_padding_mask[:, None, columns]
    probs = torch.where(visible, torch.exp(logits - lse[..., None].float()), torch.zeros_like(logits))
    return probs, torch.isfinite(lse)


_ITEM = re.compile(r"^L(\d+)H(\d+):([a-z]+)(?:=([^;]+))?((?:;[a-z_]+=[^;]+)*)$")
_MAIN = {"scale": "alpha", "softpag": "u", "redistribute": "keep"}


def parse_interventions(text: str, *, reference: TokenBatch | None = None) -> InterventionSet:
    """Parse ``"L3H2:zero, L5H1:scale=2, L7H0:softpag=0.5, L4H4:mean"`` into a set.

    Redistribute takes options after ``;``: ``L4H1:redistribute=0.6;rho=0.5;span=3:9;sinks=0+1``.
    """
    items = []
    for part in (p.strip() for p in text.replace("\n", ",").split(",")):
        if not part:
            continue
        match = _ITEM.match(part.replace(" ", ""))
        if match is None:
            raise InputError(f"cannot parse intervention '{part}': write L<layer>H<head>:<kind>[=value], "
                             f"kind one of {', '.join(KINDS)} (e.g. L3H2:zero, L5H1:scale=2)")
        layer, head, kind, value, options = match.groups()
        if kind not in KINDS:
            raise InputError(f"'{part}': unknown intervention '{kind}': use one of {', '.join(KINDS)}")
        fields: dict = {}
        try:
            if value is not None:
                if kind not in _MAIN:
                    raise InputError(f"'{part}': {kind} takes no value: write L{layer}H{head}:{kind}")
                fields[_MAIN[kind]] = float(value)
            for option in filter(None, (options or "").split(";")):
                key, raw = option.split("=", 1)
                if key in ("alpha", "u", "keep", "rho"):
                    fields[key] = float(raw)
                elif key == "span":
                    t0, t1 = raw.split(":")
                    fields["span"] = (int(t0), int(t1))
                elif key == "sinks":
                    fields["sink_positions"] = tuple(int(p) for p in raw.split("+"))
                else:
                    raise InputError(f"'{part}': unknown option '{key}': use alpha, u, keep, rho, span, sinks")
        except ValueError:
            raise InputError(f"'{part}': a value is not a number (span is t0:t1, sinks is 0+1)") from None
        items.append(HeadIntervention(int(layer), int(head), kind, **fields))
    if not items:
        raise InputError("no intervention given: write e.g. 'L3H2:zero, L5H1:scale=2'")
    return InterventionSet(items, reference=reference)


__all__ = ["HeadIntervention", "InterventionKind", "InterventionSet", "ReferenceZ", "parse_interventions",
           "redistribute_delta"]
