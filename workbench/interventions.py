"""Per-head interventions (docs/metrics.md §7): the spec, its parsing and validation.

Every intervention acts on one query head ``(layer, head)`` of a forward:

- output-level (at the per-head output ``z [B, N, Hq, d]`` before ``W_O``, TransformerLens
  ``hook_z``): ``zero`` (z_h <- 0), ``mean`` (z_h <- the reference mean, see
  :class:`ReferenceZ`), ``resample`` (z_h <- the value on another input), ``scale``
  (z_h <- alpha z_h);
- pattern-level (on the head's attention ``A``): ``softpag`` (A <- (1-u) A + u I) and
  ``redistribute`` (the VAR rule of docs/metrics.md §3, :func:`redistribute_delta`).

:meth:`InterventionSet.compile` turns a set into the :class:`workbench.head_edits.HeadEdits` that
the one attention function applies in every backend (the exact rules live there), so a capture,
a loss, a gradient or a generated token sees the same edits whatever the attention backend.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from workbench.batch import TokenBatch
from workbench.errors import InputError
from workbench.head_edits import PATTERN_KINDS, SPAN_MASS_MIN, HeadEdits, redistribute_delta

InterventionKind = Literal["zero", "mean", "resample", "scale", "softpag", "redistribute"]
KINDS: tuple[str, ...] = ("zero", "mean", "resample", "scale", "softpag", "redistribute")


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

    def __post_init__(self) -> None:
        name = f"L{self.layer}H{self.head}"
        for field in ("layer", "head"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InputError(f"HeadIntervention {field}={value!r} must be an integer index")
        for field in ("alpha", "u", "keep", "rho"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
                raise InputError(f"{name}: {field}={value!r} is not a number: give e.g. {field}=0.5")

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

    def check(self, model) -> None:
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
            raise InputError(f"{name}: redistribute leaves the last layer unmodified (docs/metrics.md §3): "
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

    def validate(self, model, batch: TokenBatch | None = None) -> None:
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

    # ------------------------------------------------------------ compiled for a forward
    def _needed_reference(self) -> list[tuple[int, int]]:
        return sorted({(i.layer, i.head) for i in self.items if i.kind in ("mean", "resample")})

    def reference_values(self, model) -> dict[tuple[int, int], ReferenceZ]:
        """Clean per-head outputs of the reference batch for every mean/resample head."""
        from workbench.forward import run

        needed = self._needed_reference()
        if not needed:
            return {}
        layers = sorted({layer for layer, _ in needed})
        store: dict[int, torch.Tensor] = {}

        def keep(call, result) -> None:
            if call.layer in layers:
                store[call.layer] = result.out.detach().transpose(1, 2).float().cpu()  # [R, N, Hq, d]

        run(model, self.reference, recorders=[keep], stop_at_layer=layers[-1] + 1)
        ref_mask = self.reference.mask.cpu()
        return {(layer, head): ReferenceZ(store[layer][:, :, head], ref_mask) for layer, head in needed}

    def compile(self, model, batch: TokenBatch | None = None) -> HeadEdits | None:
        """Validate against ``model`` (and ``batch``) and return the edits a forward applies (None when empty)."""
        self.validate(model, batch)
        if not self.items:
            return None
        return HeadEdits(self.items, self.reference_values(model))


def as_intervention_set(interventions) -> InterventionSet:
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


_ITEM = re.compile(r"^L(\d+)H(\d+):([a-z]+)(?:=([^;]+))?((?:;[a-z_]+=[^;]+)*)$")
_MAIN = {"scale": "alpha", "softpag": "u", "redistribute": "keep"}
_OPTIONS = {"zero": (), "mean": (), "resample": (), "scale": ("alpha",), "softpag": ("u",),
            "redistribute": ("keep", "rho", "span", "sinks")}
_ALL_OPTIONS = ("alpha", "u", "keep", "rho", "span", "sinks")


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
        allowed = _OPTIONS[kind]
        try:
            if value is not None:
                if kind not in _MAIN:
                    raise InputError(f"'{part}': {kind} takes no value: write L{layer}H{head}:{kind}")
                fields[_MAIN[kind]] = float(value)
            elif kind == "scale":  # alpha = 1 would be a silent no-op
                raise InputError(f"'{part}': scale needs its factor: write L{layer}H{head}:scale=2")
            for option in filter(None, (options or "").split(";")):
                key, raw = option.split("=", 1)
                if key not in allowed and key in _ALL_OPTIONS:
                    takes = f"takes only {', '.join(allowed)}" if allowed else "takes no options"
                    raise InputError(f"'{part}': {kind} {takes}, not '{key}'")
                if key in fields or (key == "sinks" and "sink_positions" in fields):
                    raise InputError(f"'{part}': {key} is given twice: give each value once")
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


__all__ = ["HeadIntervention", "InterventionKind", "InterventionSet", "PATTERN_KINDS", "ReferenceZ", "SPAN_MASS_MIN",
           "as_intervention_set", "parse_interventions", "redistribute_delta"]
