"""Long-context rows of a capture: arg-max key, streaming mass and block-sparsity profile per head.

:class:`LongContextRecorder` rides along the one forward of :func:`workbench.capture.capture`
(requested with ``long_context=LongContextSettings(...)``; the pipeline asks for it only when the
``retrieval`` or ``sparsity`` probe runs) and handles each sample at its real length:

- stats mode (``AttentionStats``): the recorder's ``row_extras`` asks the kernel for the rows in
  its own pass (the CPU ``row_pass`` backend computes them while each row is in cache); where the
  backend does not, :func:`kernels.long_context.block_pass` recomputes the exact probabilities tile
  by tile from q, k and the saved LSE (no ``[q, k]`` map is kept either way);
- patterns mode (``EagerResult`` with the map): the same quantities straight from the map.

Both then score the cheap block selectors (XAttention's antidiagonal scorer and the HeSS
mean-pooled scorer, from q and k) against the true pooled mass. Written into ``Capture.extras``
(docs/metrics.md §10):

- ``lc.argmax`` int32 ``[B, L, H, N]`` arg-max key of each row (-1 on padding), ``lc.argmax_prob``;
- ``lc.streaming`` ``[B, L, H, N]`` mass on the first ``sinks`` keys plus the last ``window`` keys;
- with ``blocks``: ``lc.density_90`` / ``lc.density_95`` / ``lc.xattn_recall`` / ``lc.xattn_density`` /
  ``lc.hess_recall`` / ``lc.hess_density`` ``[B, L, H]`` (means over query blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kernels import long_context as lck
from workbench.batch import TokenBatch
from workbench.errors import InputError

BLOCK_METRICS = ("density_90", "density_95", "xattn_recall", "xattn_density", "hess_recall", "hess_density")


@dataclass(frozen=True)
class LongContextSettings:
    """What the long-context recorder computes.

    Attributes:
        blocks: also the block-pooled mass and the block metrics (off: arg-max and streaming only).
        block_size: ``B`` of the key/query blocks (64).
        sinks, window: streaming-mass keys: the first ``sinks`` (4) and the row's last ``window`` (256).
        stride, tau: XAttention antidiagonal stride (8) and the selectors' mass threshold (0.9).
    """

    blocks: bool = True
    block_size: int = 64
    sinks: int = 4
    window: int = 256
    stride: int = 8
    tau: float = 0.9

    def check(self) -> "LongContextSettings":
        """Raise :class:`InputError` on a bad setting (named, with the fix)."""
        for name in ("block_size", "stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}={value!r} must be a positive integer (default "
                                 f"{getattr(LongContextSettings, name)})")
        for name in ("sinks", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name}={value!r} must be an integer >= 0 (default {getattr(LongContextSettings, name)})")
        if self.block_size % self.stride:
            raise InputError(f"stride={self.stride} must divide block_size={self.block_size} (defaults 8 and 64)")
        if not 0 < self.tau <= 1:
            raise InputError(f"tau={self.tau} must be in (0, 1] (default 0.9)")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def merge_settings(requests: Sequence[LongContextSettings]) -> LongContextSettings | None:
    """One setting for several probes: the block settings of the probes that need blocks (they
    must agree), else the first request; None when nothing is requested."""
    if not requests:
        return None
    with_blocks = [r for r in requests if r.blocks]
    for other in with_blocks[1:]:
        if other != with_blocks[0]:
            raise InputError(f"two probes ask for different long-context settings ({with_blocks[0]} vs {other}): "
                             "give them the same block_size, sinks, window, stride and tau")
    return with_blocks[0] if with_blocks else requests[0]


def map_rows(probs: torch.Tensor, *, causal: bool, settings: LongContextSettings) -> lck.BlockPass:
    """The :class:`kernels.long_context.BlockPass` of one materialised map ``probs [H, n, n]``
    (masked entries 0): the straightforward computation the kernel pass must equal."""
    h, n, _ = probs.shape
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    visible = (j <= i) if causal else torch.ones(n, n, dtype=torch.bool)
    masked = probs.float().masked_fill(~visible, -1.0)
    prob, arg = masked.max(dim=-1)
    near = (j < settings.sinks) | ((i - j < settings.window) & (j <= i))
    streaming = (probs.float() * (near & visible)).sum(-1)
    mass = None
    if settings.blocks:
        bs = settings.block_size
        nb = -(-n // bs)
        padded = torch.nn.functional.pad(probs.float() * visible, (0, nb * bs - n, 0, nb * bs - n))
        mass = padded.view(h, nb, bs, nb, bs).sum(dim=(2, 4))
    return lck.BlockPass(argmax=arg, argmax_prob=prob, streaming=streaming, block_mass=mass)


def block_metrics(mass: torch.Tensor, q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float,
                  settings: LongContextSettings) -> dict[str, torch.Tensor]:
    """``{name: [H]}`` for :data:`BLOCK_METRICS` of one sample: pooled mass ``[H, nqb, nkb]``,
    ``q [H, n, d]``, ``k [Hkv, n, d]`` (means over query blocks)."""
    n, bs = q.shape[1], settings.block_size
    counts = lck.visible_blocks(n, bs, causal).to(mass.device)
    vis = lck.visible_block_mask(n, bs, causal).to(mass.device)
    out = {"density_90": lck.block_density(mass, counts, 0.9).nanmean(-1),
           "density_95": lck.block_density(mass, counts, 0.95).nanmean(-1)}
    scorers = {
        "xattn": lck.antidiagonal_block_scores(q, k, stride=settings.stride, block_size=bs, causal=causal, scale=scale),
        "hess": lck.mean_pooled_block_probs(q, k, block_size=bs, causal=causal, scale=scale),
    }
    for name, scores in scorers.items():
        keep = lck.threshold_select(scores, settings.tau, visible=vis)
        out[f"{name}_recall"] = lck.selected_recall(mass, keep).nanmean(-1)
        out[f"{name}_density"] = (keep.sum(-1).float() / counts.float()).mean(-1)
    return out


def _sample_rows(rows: lck.BlockPass, b: int, heads: torch.Tensor, n: int, block_size: int) -> lck.BlockPass:
    """Sample ``b``'s selected heads, first ``n`` positions, of the kernel's batched rows."""
    nb = -(-n // block_size)
    mass = None if rows.block_mass is None else rows.block_mass[b, heads, :nb, :nb]
    return lck.BlockPass(argmax=rows.argmax[b, heads, :n], argmax_prob=rows.argmax_prob[b, heads, :n],
                         streaming=rows.streaming[b, heads, :n], block_mass=mass)


class LongContextRecorder:
    """Forward recorder filling the ``lc.*`` extras (module docstring) for the selected heads.

    Shapes: outputs ``[B, L_sel, H_sel, N]`` / ``[B, L_sel, H_sel]``; :meth:`start` points the
    recorder at the rows of the next chunk.
    """

    def __init__(self, model, n_samples: int, width: int, layers: Sequence[int], heads: Sequence[int],
                 settings: LongContextSettings) -> None:
        B, L, H, N = n_samples, len(layers), len(heads), width
        self.settings = settings.check()
        self.layer_pos = {layer: li for li, layer in enumerate(layers)}
        self.heads = torch.tensor(list(heads))
        self.kv_of_head = self.heads // (model.n_heads // model.n_kv_heads)
        self.argmax = torch.full((B, L, H, N), -1, dtype=torch.int32)
        self.argmax_prob = torch.zeros(B, L, H, N)
        self.streaming = torch.zeros(B, L, H, N)
        self.blocks = {name: torch.full((B, L, H), float("nan")) for name in BLOCK_METRICS} if settings.blocks else {}
        self.chunk: TokenBatch | None = None
        self.first = 0
        self.row_extras = lck.RowExtras(settings.sinks, settings.window, settings.block_size if settings.blocks else None)

    def start(self, chunk: TokenBatch, first_row: int) -> None:
        """Point the recorder at the samples ``chunk`` (rows from ``first_row``)."""
        self.chunk, self.first = chunk, first_row

    def __call__(self, call, result) -> None:
        li = self.layer_pos.get(call.layer)
        if li is None:
            return
        from workbench.attention_backend import check_cancelled

        st = self.settings
        for b, n in enumerate(self.chunk.lengths.tolist()):
            check_cancelled()
            row = self.first + b
            q = call.query[b, self.heads, :n].float()
            k = call.key[b, self.kv_of_head, :n].float()
            probs = getattr(result, "probs", None)
            if probs is not None:
                rows = map_rows(probs[b, self.heads, :n, :n].detach(), causal=call.causal, settings=st)
            elif getattr(result, "rows", None) is not None:
                rows = _sample_rows(result.rows, b, self.heads, n, st.block_size)
            else:
                lse = result.lse[b, self.heads, :n].float()
                rows = lck.block_pass(q, k, lse, causal=call.causal, scale=call.scale, block_size=st.block_size,
                                      blocks=st.blocks, sinks=st.sinks, window=st.window)
            self.argmax[row, li, :, :n] = rows.argmax.to(torch.int32).cpu()
            self.argmax_prob[row, li, :, :n] = rows.argmax_prob.cpu()
            self.streaming[row, li, :, :n] = rows.streaming.cpu()
            if st.blocks:
                values = block_metrics(rows.block_mass, q, k, causal=call.causal, scale=call.scale, settings=st)
                for name, value in values.items():
                    self.blocks[name][row, li] = value.cpu()

    def extras(self) -> dict[str, torch.Tensor]:
        """The ``lc.*`` tensors for ``Capture.extras``."""
        out = {"lc.argmax": self.argmax, "lc.argmax_prob": self.argmax_prob, "lc.streaming": self.streaming}
        out |= {f"lc.{name}": value for name, value in self.blocks.items()}
        return out
