"""VHR, reinforcement of the heads that read the context (docs/metrics.md §5; ACL 2025).

At t = 0, layer by layer in increasing order, with the heads already selected in earlier
layers reinforced (in both branches):

1. VHD of every head of the layer at the last prompt position (:func:`probes.vhd.compute_vhd`)
   and the no-context output energy ``E = ‖z‖²``;
2. outlier filter: heads with ``VHD > mean + std`` AND ``E > mean + std`` of the layer get
   VHD 0 (std: the unbiased sample standard deviation over the layer's heads);
3. selection: heads with VHD strictly above the layer median (linear-interpolated median);
4. their outputs are multiplied by α (``HeadIntervention(l, h, "scale", alpha=α)``).

The selection is then kept fixed for every later generation step.

Default layers (the paper's "layer index 1 plus the last 14 layers" of 32-layer LLaVA-1.5),
scaled to the depth: layer 1 plus the last ``round(14·L/32)`` layers (SmolLM2, 30 layers:
layer 1 + layers 17..29, 14 layers; 32 layers: exactly the paper's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from probes.vhd import compute_vhd, run_with_hooks
from probes.vhd_inputs import ContextPrompt
from workbench.errors import InputError
from workbench.interventions import HeadIntervention, InterventionSet
from workbench.model import HookedModel


def paper_layers(n_layers: int) -> list[int]:
    """Layer 1 plus the last ``round(14 · n_layers / 32)`` layers (the paper's choice, scaled)."""
    last = max(1, round(14 * n_layers / 32))
    chosen = {min(1, n_layers - 1)} | set(range(max(0, n_layers - last), n_layers))
    return sorted(chosen)


def check_alpha(alpha: float) -> float:
    """Validate the reinforcement factor (α >= 0; > 1 reinforces)."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise InputError(f"alpha={alpha!r} must be a number >= 0 (default 2)") from None
    if not alpha >= 0:
        raise InputError(f"alpha={alpha} must be >= 0 (> 1 reinforces, < 1 dampens; default 2)")
    return alpha


@dataclass
class VHRSelection:
    """The heads VHR reinforces for one prompt.

    Attributes:
        alpha: reinforcement factor.
        layers: reinforced layers, in selection order.
        heads: layer -> selected heads.
        vhd: layer -> ``[H]`` VHD read during selection (earlier layers reinforced).
        energy: layer -> ``[H]`` no-context ``‖z‖²``.
        outliers: layer -> heads whose VHD was set to 0 by the outlier filter.
    """

    alpha: float
    layers: list[int]
    heads: dict[int, list[int]] = field(default_factory=dict)
    vhd: dict[int, torch.Tensor] = field(default_factory=dict)
    energy: dict[int, torch.Tensor] = field(default_factory=dict)
    outliers: dict[int, list[int]] = field(default_factory=dict)

    @property
    def interventions(self) -> InterventionSet:
        return InterventionSet([HeadIntervention(layer, head, "scale", alpha=self.alpha)
                                for layer in self.layers for head in self.heads.get(layer, [])])

    @property
    def n_selected(self) -> int:
        return sum(len(h) for h in self.heads.values())


def select_layer_heads(vhd: torch.Tensor, energy: torch.Tensor) -> tuple[list[int], list[int]]:
    """Outlier filter then median selection on one layer's ``vhd [H]`` and ``energy [H]``.

    Returns:
        ``(selected heads, outlier heads)``.
    """
    vhd, energy = vhd.double().clone(), energy.double()
    if vhd.numel() > 1:
        outlier = (vhd > vhd.mean() + vhd.std()) & (energy > energy.mean() + energy.std())
    else:
        outlier = torch.zeros_like(vhd, dtype=torch.bool)
    vhd[outlier] = 0.0
    median = torch.quantile(vhd, 0.5)
    return [int(h) for h in (vhd > median).nonzero().flatten()], [int(h) for h in outlier.nonzero().flatten()]


def vhr_select(model: HookedModel, prompt: ContextPrompt, *, alpha: float = 2.0,
               layers: Sequence[int] | None = None) -> VHRSelection:
    """Sequential VHR selection at t = 0 (see module docstring)."""
    alpha = check_alpha(alpha)
    layers = paper_layers(model.n_layers) if layers is None else model.check_heads(layers, None)[0]
    selection = VHRSelection(alpha, list(layers))
    for layer in layers:
        edits = selection.interventions.compile(model) if selection.n_selected else None
        vhd, energy = compute_vhd(model, [prompt], layers=[layer], edits=edits)
        selection.vhd[layer], selection.energy[layer] = vhd[0][0, 0], energy[0][0, 0]
        selection.heads[layer], selection.outliers[layer] = select_layer_heads(vhd[0][0, 0], energy[0][0, 0])
    return selection


class VHR:
    """Vision/context-aware head reinforcement for one prompt.

    Args:
        alpha: output scale of the selected heads (default 2).
        layers: reinforced layers (default :func:`paper_layers`).

    Attributes (after ``fit``):
        selection_: the :class:`VHRSelection` made at t = 0.
        steps_ (after ``generate``): per generated token, the intervention text that was active
            (always the t = 0 selection).
    """

    def __init__(self, alpha: float = 2.0, layers: Sequence[int] | None = None) -> None:
        self.alpha = check_alpha(alpha)
        self.layers = None if layers is None else list(layers)

    def fit(self, model: HookedModel, prompt: ContextPrompt) -> "VHR":
        self.prompt_ = prompt
        self.selection_ = vhr_select(model, prompt, alpha=self.alpha, layers=self.layers)
        return self

    def generate(self, model: HookedModel, *, max_new_tokens: int = 20) -> str:
        """Greedy continuation with the t = 0 selection reinforced at every step (new text only)."""
        if not hasattr(self, "selection_"):
            raise InputError("VHR is not fitted: call fit(model, prompt) first")
        if not model.causal:
            raise InputError(f"{model.name} is an encoder: generation needs a causal language model")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens}: ask for at least one token")
        spec = self.selection_.interventions
        edits = spec.compile(model)
        tokens, eos = self.prompt_.ids.clone(), model.tokenizer.eos_token_id
        self.steps_: list[str] = []
        for _ in range(max_new_tokens):
            batch = model.batch_from_ids([tokens])
            logits = run_with_hooks(model, batch, [], pixel_values=self.prompt_.pixel_values, edits=edits)
            self.steps_.append(spec.text)
            nxt = int(logits[0, -1].argmax())
            tokens = torch.cat([tokens, torch.tensor([nxt])])
            if nxt == eos:
                break
        return model.tokenizer.decode(tokens[self.prompt_.ids.numel():], skip_special_tokens=True)
