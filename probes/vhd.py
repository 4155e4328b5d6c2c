"""VHD, head divergence to a context span (docs/metrics.md §5; "Vision-aware Head Divergence", ACL 2025).

At generation step t (query position ``n - 1 + t`` of the prompt plus the tokens ``y_<t``)::

    VHD[l, h] = ‖ z[l, h](y_t | y_<t, context, prompt) − z[l, h](y_t | y_<t, prompt) ‖₂

with ``z`` the per-head attention output before ``W_O`` (TransformerLens ``hook_z``), the second
branch being the same ids with the context span removed (for a vision-language model: the
image placeholders dropped and no image). ``T-VHD = Σ_l Σ_{top-k h} VHD[l, h]``.

Text models run through :meth:`HookedModel.run`; LLaVA-style models through the same
``TransformerBridge`` with ``pixel_values`` (its hooks are scoped by ``bridge.hooks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from probes.base import Probe
from probes.vhd_inputs import ContextPrompt, prompts_from_batch
from workbench.batch import TokenBatch
from workbench.capture import Capture
from workbench.errors import InputError
from workbench.forward import run
from workbench.model import bind_hook, Hook, hook_name, HookedModel


def run_with_hooks(model: HookedModel, batch: TokenBatch, hooks: Sequence[Hook], *,
                   pixel_values: torch.Tensor | None = None, stop_at_layer: int | None = None,
                   edits=None) -> torch.Tensor:
    """Forward ``batch`` (and its images) with ``hooks`` and compiled interventions ``edits``
    scoped to the call (the one forward, :func:`workbench.forward.run`); returns the output."""
    extra = {} if pixel_values is None else {"pixel_values": pixel_values}
    return run(model, batch, fwd_hooks=hooks, edits=edits, stop_at_layer=stop_at_layer, **extra)


def z_at(model: HookedModel, sequences: Sequence[torch.Tensor], positions: Sequence[Sequence[int]], *,
         layers: Sequence[int], pixel_values: Sequence[torch.Tensor | None] | None = None,
         edits=None, batch_size: int = 8) -> list[torch.Tensor]:
    """Per-head outputs ``z`` at chosen positions of each sequence.

    Args:
        sequences: 1-D id tensors.
        positions: per sequence, the query positions to read.
        layers: layers to read (the forward stops after the last one).
        pixel_values: per sequence ``[1, 3, S, S]`` or None (vision-language prompts).
        edits: compiled interventions active in every forward (the readers see the edited ``z``).
    Returns:
        per sequence ``[len(positions_i), len(layers), H, d]`` fp32.
    """
    pixel_values = list(pixel_values) if pixel_values is not None else [None] * len(sequences)
    out: list[torch.Tensor | None] = [None] * len(sequences)
    stop = max(layers) + 1
    stop = None if stop >= model.n_layers else stop
    groups = [[i for i, p in enumerate(pixel_values) if p is None], [i for i, p in enumerate(pixel_values) if p is not None]]
    for group in groups:
        for begin in range(0, len(group), batch_size):
            rows = group[begin:begin + batch_size]
            batch = model.batch_from_ids([sequences[i] for i in rows])
            images = None if pixel_values[rows[0]] is None else torch.cat([pixel_values[i] for i in rows])
            store: dict[int, torch.Tensor] = {}

            def read(z, hook, layer):
                store[layer] = z.detach().float()
                return z

            readers = [(hook_name(layer, "z"), bind_hook(read, layer=layer)) for layer in layers]
            run_with_hooks(model, batch, readers, pixel_values=images, stop_at_layer=stop, edits=edits)
            stacked = torch.stack([store[layer] for layer in layers], dim=2)  # [b, N, L, H, d]
            for row, i in enumerate(rows):
                out[i] = stacked[row, torch.as_tensor(list(positions[i]), dtype=torch.long)].cpu()
    return out  # type: ignore[return-value]


def compute_vhd(model: HookedModel, prompts: Sequence[ContextPrompt], *,
                continuations: Sequence[torch.Tensor] | None = None, layers: Sequence[int] | None = None,
                edits=None, batch_size: int = 8) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """VHD and the no-context output energy ``‖z‖²`` at every step of each prompt.

    Args:
        prompts: prompts with their context span.
        continuations: per prompt, the generated/teacher-forced tokens ``y`` (``[T]``); VHD is
            read at steps ``t = 0..T-1`` (position ``n - 1 + t``). None: step 0 only.
        layers: layers to read (default all).
        edits: compiled interventions active in both branches (e.g. reinforcement of earlier layers).
    Returns:
        ``(vhd, energy)``, per prompt ``[T, L, H]`` each (``T = 1`` without continuations).
    """
    if not prompts:
        raise InputError("no prompt given: VHD needs at least one prompt with a context span")
    layers, _ = model.check_heads(layers, None)
    if continuations is not None and len(continuations) != len(prompts):
        raise InputError(f"{len(continuations)} continuations for {len(prompts)} prompts: give one per prompt")
    sequences, positions, images = [], [], []
    for index, prompt in enumerate(prompts):
        y = torch.as_tensor(continuations[index], dtype=torch.long) if continuations is not None else torch.empty(0, dtype=torch.long)
        steps = max(1, y.numel())
        for ids, image in ((prompt.ids, prompt.pixel_values), (prompt.without_context(), None)):
            sequences.append(torch.cat([ids, y[:steps - 1]]))
            positions.append([ids.numel() - 1 + t for t in range(steps)])
            images.append(image)
    z = z_at(model, sequences, positions, layers=layers, pixel_values=images, edits=edits, batch_size=batch_size)
    vhd = [(z[2 * i] - z[2 * i + 1]).norm(dim=-1) for i in range(len(prompts))]
    energy = [z[2 * i + 1].pow(2).sum(-1) for i in range(len(prompts))]
    return vhd, energy


def t_vhd(vhd: torch.Tensor, k: int) -> torch.Tensor:
    """Token-level T-VHD ``Σ_l Σ_{top-k h} VHD[l, h]`` of ``vhd [..., L, H]`` -> ``[...]``."""
    if not 1 <= k <= vhd.shape[-1]:
        raise InputError(f"top-k={k} must be between 1 and the number of heads ({vhd.shape[-1]})")
    return vhd.topk(k, dim=-1).values.sum((-1, -2))


def default_top_k(n_heads: int) -> int:
    """The workbench's default k of T-VHD: a quarter of the heads (at least 1)."""
    return max(1, round(n_heads / 4))


class VHD(Probe):
    """VHD per head at the first generation step (t = 0), mean and 95% interval over prompts.

    Args:
        metrics: ``["vhd"]`` or None.
        top_k: k of T-VHD (default: a quarter of the heads, :func:`default_top_k`).
        batch_size: sequences per forward (each prompt runs two: with and without context).
        layers, heads: restrict the layers run / heads reported (default all).

    Attributes (after ``fit``):
        metrics_: ``("vhd",)``; layers_, heads_: the indices reported.
        per_sample_: ``{"vhd": [S, L_sel, H_sel]}``; energy_: ``[S, L_sel, H_sel]`` no-context ``‖z‖²``.
        mean_, ci_low_, ci_high_: ``{"vhd": [L_sel, H_sel]}``.
        tvhd_: ``[S]`` T-VHD at t = 0 over the selected layers (top k of all heads); top_k_: the k used.
    """

    name: ClassVar[str] = "vhd"
    metrics: ClassVar[tuple[str, ...]] = ("vhd",)
    bounds: ClassVar[dict[str, tuple[float, float]]] = {"vhd": (0.0, float("inf"))}  # a norm
    needs_capture: ClassVar[bool] = False
    needs_model: ClassVar[bool] = True
    needs_batch: ClassVar[bool] = True

    def __init__(self, metrics: Sequence[Literal["vhd"]] | None = None, *, top_k: int | None = None,
                 batch_size: int = 8, layers: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None) -> None:
        self.metrics = metrics
        self.top_k, self.batch_size = top_k, batch_size
        self.layers, self.heads = layers, heads

    def check_params(self) -> None:
        self.check_metrics(self.metrics)
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k={self.top_k} must be at least 1")
        if self.batch_size < 1:
            raise InputError(f"batch_size={self.batch_size} must be at least 1")

    def cost_forwards(self, n_layers: int, n_heads: int, n_tokens: int, samples: int) -> float | None:
        """Two forwards per prompt: with its context span and without it (up to the last read layer)."""
        read = n_layers if self.layers is None else max(self.layers) + 1
        return 2.0 * samples * read / n_layers

    def fit(self, capture: Capture | None = None, *, model: HookedModel | None = None,
            batch: TokenBatch | Sequence[ContextPrompt] | None = None) -> "VHD":
        """VHD of each prompt in ``batch`` (a batch with ``meta["span"]``, or :class:`ContextPrompt`
        objects); ``capture`` is not used. Only ``layers`` are run; T-VHD sums over them, taking
        the top k of all heads; ``heads`` restricts the reported heads."""
        self.check_inputs(capture, model, batch)
        self.check_params()
        self.metrics_ = self.check_metrics(self.metrics)
        layers, heads = model.check_heads(self.layers, self.heads)
        prompts = prompts_from_batch(batch) if isinstance(batch, TokenBatch) else list(batch)
        vhd, energy = compute_vhd(model, prompts, layers=layers, batch_size=self.batch_size)
        every_head = torch.stack([v[0] for v in vhd])                      # [S, L_sel, H]
        self.top_k_ = self.top_k if self.top_k is not None else default_top_k(model.n_heads)
        self.tvhd_ = t_vhd(every_head, min(self.top_k_, model.n_heads))
        self.per_sample_ = {"vhd": every_head[:, :, heads]}
        self.energy_ = torch.stack([e[0] for e in energy])[:, :, heads]
        self._summarise()
        self.layers_, self.heads_ = layers, heads
        return self
