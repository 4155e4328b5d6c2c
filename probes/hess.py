"""HeSS: head sensitivity to attention sparsification (METRICS §6).

``F_e(h) = E_samples ‖∂e/∂W_Q^h‖_F²`` (empirical Fisher of an error ``e`` w.r.t. the head's
slice of the query projection), normalised within the layer ``HeSS_e(h) = F_e(h) / Σ_h' F_e(h')``
and mixed ``HeSS = λ·HeSS_e1 + (1−λ)·HeSS_e2`` (λ = 0.5).

How it is computed: the plain Hugging Face copy ``model.kernel_model`` is run (differentiable
SDPA through :func:`workbench.kernel_attention.kernel_forward`, padding masked); a forward hook
on each layer's query projection keeps its input ``X [B, N, D]`` and replaces its output ``Y``
by ``Y + Z`` with ``Z = 0`` a leaf that requires grad; one backward of ``Σ_b e_b`` gives
``∂e_b/∂Y_b = ∂e_b/∂Z_b`` per sample and layer, all paths kept (samples never mix: the rows
``Y_b`` only feed sample ``b``), and the per-sample weight gradient
of head ``h`` is ``X_bᵀ ∂e_b/∂Y_b[..., h·d:(h+1)·d]`` ``[D, d]``. No parameter ever gets a
``.grad``; ``requires_grad`` flags are switched off for the forward and restored after it,
hooks removed, even on error. Intervals: percentile bootstrap over calibration samples of the
normalised score (ratio of mean Fisher traces), see ``docs/hess.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
import torch

from probes.base import Probe, concat_frames, head_table
from workbench.batch import TokenBatch
from workbench.errors import InputError
from workbench.kernel_attention import exact_attention, kernel_forward
from workbench.model import HookedModel

ErrorFn = Callable[[torch.Tensor, TokenBatch], torch.Tensor]
ErrorName = Literal["next_token", "copy"]
MetricName = Literal["hess", "hess_e1", "hess_e2"]
SUPPORTED = "llama-style (self_attn.q_proj: Llama, Mistral, Qwen2, ...) and gpt2 (fused c_attn)"


# ----------------------------------------------------------------------------- errors
def next_token_error(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy over real positions. ``logits [B, N, V]`` -> ``[B]``."""
    valid = batch.mask[:, 1:] & batch.mask[:, :-1]
    return _masked_ce(logits, batch.tokens, valid, "next-token error needs sequences of 2 or more tokens")


def copy_error(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Per-sample cross-entropy on the second copy of a repeated sequence -> ``[B]``.

    Needs ``meta`` ``repeat_period`` L and ``first_copy_start`` s (as the ``induction`` loader
    writes). Counted: predictions from query positions ``i ∈ [s+L, s+2L−1)`` of the token at
    ``i+1`` (every token of the second copy after its first, which no head can predict).
    """
    return _masked_ce(logits, batch.tokens, copy_positions(batch), "copy error needs repeated sequences")


def copy_positions(batch: TokenBatch) -> torch.Tensor:
    """Bool ``[B, N−1]``: query positions ``i`` whose next token lies in the second copy."""
    valid = torch.zeros(batch.tokens.shape[0], batch.tokens.shape[1] - 1, dtype=torch.bool)
    for row, item in enumerate(batch.meta):
        if "repeat_period" not in item:
            raise InputError("copy error needs repeated random sequences (meta 'repeat_period'): "
                             "load them with load_dataset('induction', model, ...)")
        period, start = int(item["repeat_period"]), int(item.get("first_copy_start", 0))
        valid[row, start + period:start + 2 * period - 1] = True
    return valid & batch.mask[:, 1:]


def _masked_ce(logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, problem: str) -> torch.Tensor:
    valid = valid.to(logits.device)
    if not valid.any(1).all():
        raise InputError(f"{problem}: a sample has no position to score")
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:].to(logits.device), reduction="none")
    return (losses * valid).sum(1) / valid.sum(1)


ERRORS: dict[str, ErrorFn] = {"next_token": next_token_error, "copy": copy_error}


def resolve_error(error: str | ErrorFn) -> ErrorFn:
    """An error callable ``(logits [B, N, V], batch) -> [B]`` from a name or a callable."""
    if callable(error):
        return error
    if error not in ERRORS:
        raise InputError(f"unknown HeSS error '{error}': use one of {', '.join(ERRORS)} or a callable")
    return ERRORS[error]


# ----------------------------------------------------------------------------- query sites
def query_sites(hf_model, n_heads: int, d_head: int) -> list[tuple[torch.nn.Module, slice]]:
    """Per layer: the module computing the queries and the slice of its output that holds them.

    Llama-style ``q_proj`` outputs exactly the ``Hq·d`` query features (GQA: query head ``h`` owns
    rows ``h·d:(h+1)·d`` of its weight); GPT-2's fused ``c_attn`` outputs ``[q | k | v]``, the
    query of head ``h`` being columns ``h·d:(h+1)·d`` of its ``Conv1D`` weight.

    Raises:
        InputError: an architecture other than the supported ones.
    """
    model_type = getattr(hf_model.config, "model_type", "?")
    inner = getattr(hf_model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is not None and all(hasattr(getattr(b, "self_attn", None), "q_proj") for b in layers):
        sites = [(b.self_attn.q_proj, slice(0, n_heads * d_head)) for b in layers]
    elif model_type == "gpt2":
        sites = [(b.attn.c_attn, slice(0, n_heads * d_head)) for b in hf_model.transformer.h]
    else:
        raise InputError(f"HeSS does not support model type '{model_type}': it supports {SUPPORTED}")
    return sites



def query_fisher(model: HookedModel, batch: TokenBatch, error: ErrorFn, *, batch_size: int = 4) -> torch.Tensor:
    """Per-sample ``‖∂e/∂W_Q^h‖_F²`` for every layer and query head. Returns ``[S, L, Hq]`` float64.

    Uses ``model.kernel_model``; restores every ``requires_grad`` flag and removes every hook
    even when a forward or the error function raises. Parameters get no ``.grad``.
    """
    if not model.causal:
        raise InputError(f"{model.name} is an encoder: HeSS errors need a causal language model")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}: use at least 1")
    hf = model.kernel_model
    sites = query_sites(hf, model.n_heads, model.d_head)
    out = torch.zeros(len(batch), len(sites), model.n_heads, dtype=torch.float64)
    with model.lock:
        flags = {p: p.requires_grad for p in hf.parameters()}
        was_training = hf.training
        handles = []
        try:
            for p in flags:
                p.requires_grad_(False)
            hf.eval()
            store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for index, (module, _) in enumerate(sites):
                handles.append(module.register_forward_hook(_leaf_hook(index, store)))
            row = 0
            for chunk in batch.chunks(batch_size):
                store.clear()
                out[row:row + len(chunk)] = _chunk_fisher(model, hf, chunk, error, sites, store)
                row += len(chunk)
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)
            hf.train(was_training)
    return out


def _leaf_hook(index: int, store: dict):
    """Add a zero leaf to the projection output: its gradient is ``∂e/∂Y`` (all paths kept)."""
    def hook(module, inputs, output):
        leaf = torch.zeros_like(output, requires_grad=True)
        store[index] = (inputs[0].detach(), leaf)
        return output + leaf
    return hook


def _chunk_fisher(model, hf, chunk: TokenBatch, error: ErrorFn, sites, store) -> torch.Tensor:
    device = next(hf.parameters()).device
    tokens, mask = chunk.tokens.to(device), chunk.mask.to(device)
    with torch.enable_grad(), kernel_forward(mask, attention=exact_attention):
        logits = hf(input_ids=tokens, attention_mask=mask.long()).logits
        errors = error(logits, chunk)
        if errors.shape != (len(chunk),) or not torch.isfinite(errors).all():
            raise InputError(f"the HeSS error must return one finite value per sample, got shape "
                             f"{tuple(errors.shape)}: check the error function and the data")
        leaves = [store[i][1] for i in range(len(sites))]
        grads = torch.autograd.grad(errors.sum(), leaves, allow_unused=True)
    fisher = torch.zeros(len(chunk), len(sites), model.n_heads, dtype=torch.float64)
    for layer, ((_, cols), grad) in enumerate(zip(sites, grads)):
        if grad is None:
            continue
        x = store[layer][0].double() * mask[..., None]  # [B, N, D]
        dq = grad[..., cols].double().unflatten(-1, (model.n_heads, model.d_head))  # [B, N, H, d]
        per_head = torch.einsum("bnD,bnhd->bhDd", x, dq)  # per-sample weight gradient per head
        fisher[:, layer] = per_head.pow(2).sum((-1, -2)).cpu()
    return fisher


# ----------------------------------------------------------------------------- normalising
def normalise(fisher: torch.Tensor) -> torch.Tensor:
    """``F [..., L, H]`` -> ``F / Σ_h F`` per layer (NaN where a layer's total is 0)."""
    total = fisher.sum(-1, keepdim=True)
    return torch.where(total > 0, fisher / total.clamp_min(1e-300), torch.full_like(fisher, float("nan")))


def bootstrap_hess(f1: torch.Tensor, f2: torch.Tensor, lam: float, *, n_boot: int = 1000, level: float = 0.95,
                   seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Point values and percentile bootstrap intervals of ``hess``, ``hess_e1``, ``hess_e2``.

    ``f1 [S1, L, H]``, ``f2 [S2, L, H]`` per-sample Fisher traces; each draw resamples the two
    sample sets independently and recomputes the normalised scores from the resampled means.
    Intervals are NaN when a set has a single sample.
    """
    point1, point2 = normalise(f1.mean(0)), normalise(f2.mean(0))
    points = {"hess_e1": point1, "hess_e2": point2, "hess": lam * point1 + (1 - lam) * point2}
    generator = torch.Generator().manual_seed(seed)
    draws1 = normalise(f1[torch.randint(len(f1), (n_boot, len(f1)), generator=generator)].mean(1))
    draws2 = normalise(f2[torch.randint(len(f2), (n_boot, len(f2)), generator=generator)].mean(1))
    draws = {"hess_e1": draws1, "hess_e2": draws2, "hess": lam * draws1 + (1 - lam) * draws2}
    single = {"hess_e1": len(f1) < 2, "hess_e2": len(f2) < 2, "hess": len(f1) < 2 or len(f2) < 2}
    result = {}
    for name, point in points.items():
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
        low, high = torch.nanquantile(draws[name], q, dim=0) if not single[name] else (
            torch.full_like(point, float("nan")),) * 2
        result[name] = (point.numpy(), low.numpy(), high.numpy())
    return result


# ----------------------------------------------------------------------------- probe
class HeSS(Probe):
    """Head sensitivity to attention sparsification (METRICS §6).

    Args:
        metrics: subset of ``hess``, ``hess_e1``, ``hess_e2`` to report (all computed).
        n_calibration: samples per error (natural text for e1, repeated sequences for e2).
        lam: λ of ``HeSS = λ·HeSS_e1 + (1−λ)·HeSS_e2``.
        e1, e2: error names (``next_token``, ``copy``) or callables ``(logits [B,N,V], batch) -> [B]``.
        seq_len: length of the bundled calibration windows (e1) when no batch is given.
        copy_seq_len: total length of the bundled repeated sequences (e2) when none are given.
        batch_size: samples per forward/backward.
        seed: induction-sequence seed and bootstrap seed.

    Attributes (after ``fit``):
        fisher_: ``{"hess_e1"|"hess_e2": [S, L, H]}`` per-sample Fisher traces.
        per_sample_: the same normalised per sample (``[S, L, H]``).
        mean_, ci_low_, ci_high_: metric -> ``[L, H]``.
        n_samples_: metric -> number of samples used.
    """

    name: ClassVar[str] = "hess"
    metrics: ClassVar[tuple[str, ...]] = ("hess", "hess_e1", "hess_e2")
    needs_capture: ClassVar[bool] = False

    def __init__(self, metrics: Sequence[MetricName] | None = None, *, n_calibration: int = 8,
                 lam: float = 0.5, e1: ErrorName | ErrorFn = "next_token", e2: ErrorName | ErrorFn = "copy",
                 seq_len: int = 256, copy_seq_len: int = 257, batch_size: int = 4, n_boot: int = 1000,
                 seed: int = 0) -> None:
        self.metrics_selected = self.check_metrics(metrics)
        if not isinstance(n_calibration, int) or n_calibration < 1:
            raise InputError(f"n_calibration={n_calibration}: HeSS needs at least 1 calibration sample")
        if not 0.0 <= lam <= 1.0:
            raise InputError(f"lam={lam}: the HeSS mixing weight must lie in [0, 1]")
        self.n_calibration, self.lam, self.seq_len, self.copy_seq_len = n_calibration, lam, seq_len, copy_seq_len
        self.e1, self.e2 = resolve_error(e1), resolve_error(e2)
        self.batch_size, self.n_boot, self.seed = batch_size, n_boot, seed

    def fit(self, model: HookedModel, calibration: TokenBatch | None = None,
            copy: TokenBatch | None = None) -> "HeSS":
        """Compute HeSS on ``calibration`` (e1) and ``copy`` (e2); bundled sets when None.

        Only the first ``n_calibration`` samples of each set are used.
        """
        from workbench.data import load_dataset

        if calibration is None:
            calibration = load_dataset("calibration", model, n=self.n_calibration, seq_len=self.seq_len)
        if copy is None:
            copy = load_dataset("induction", model, n=self.n_calibration, seq_len=self.copy_seq_len, seed=self.seed)
        calibration = calibration.select(slice(0, self.n_calibration))
        copy = copy.select(slice(0, self.n_calibration))
        self.fisher_ = {"hess_e1": query_fisher(model, calibration, self.e1, batch_size=self.batch_size),
                        "hess_e2": query_fisher(model, copy, self.e2, batch_size=self.batch_size)}
        self.per_sample_ = {k: normalise(v) for k, v in self.fisher_.items()}
        intervals = bootstrap_hess(self.fisher_["hess_e1"], self.fisher_["hess_e2"], self.lam,
                                   n_boot=self.n_boot, seed=self.seed)
        self.mean_ = {k: v[0] for k, v in intervals.items()}
        self.ci_low_ = {k: v[1] for k, v in intervals.items()}
        self.ci_high_ = {k: v[2] for k, v in intervals.items()}
        self.n_samples_ = {"hess_e1": len(calibration), "hess_e2": len(copy),
                           "hess": min(len(calibration), len(copy))}
        self.layers_, self.heads_ = list(range(model.n_layers)), list(range(model.n_heads))
        return self

    def fit_run(self, model, batch, capture) -> "HeSS":
        """From a CLI/app run: the run's batch serves as e2 data when it holds repeated
        sequences (meta ``repeat_period``), otherwise as e1 calibration text; the other set is
        the bundled one."""
        if batch is not None and batch.meta and all("repeat_period" in m for m in batch.meta):
            return self.fit(model, copy=batch)
        return self.fit(model, calibration=batch)

    def to_frame(self) -> pd.DataFrame:
        self._check_fitted("mean_")
        return concat_frames([
            head_table(self.name, m, self.layers_, self.heads_, self.mean_[m], self.ci_low_[m], self.ci_high_[m])
            for m in self.metrics_selected
        ])
