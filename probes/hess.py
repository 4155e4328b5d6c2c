"""HeSS: head sensitivity to attention sparsification (docs/metrics.md §6).

``F_e(h) = E_samples ‖∂e/∂W_Q^h‖_F²`` (empirical Fisher of an error ``e`` w.r.t. the head's
slice of the query projection), normalised within the layer ``HeSS_e(h) = F_e(h) / Σ_h' F_e(h')``
and mixed ``HeSS = λ·HeSS_e1 + (1−λ)·HeSS_e2`` (λ = 0.5).

How it is computed: the one forward (:func:`workbench.forward.run`, differentiable fused SDPA,
padding masked) runs with two TransformerLens hooks per layer on the bridged query projection
(``blocks.L.attn.q``, or GPT-2's fused ``blocks.L.attn.qkv``): ``hook_in`` keeps its input
``X [B, N, D]`` and ``hook_out`` replaces its output ``Y`` by ``Y + Z`` with ``Z = 0`` a leaf that
requires grad; one backward of ``Σ_b e_b`` gives
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
import torch

from probes.base import Probe
from workbench.batch import TokenBatch
from workbench.capture import Capture
from workbench.errors import InputError
from workbench.forward import run
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
def query_sites(model: HookedModel) -> list[tuple[str, torch.Tensor, slice]]:
    """Per layer: the bridged module computing the queries (its hook-name prefix), its weight, and
    the slice of its output features that holds the queries.

    Llama-style ``q_proj`` (``blocks.L.attn.q``) outputs exactly the ``Hq·d`` query features (GQA:
    query head ``h`` owns rows ``h·d:(h+1)·d`` of its weight); GPT-2's fused ``c_attn``
    (``blocks.L.attn.qkv``) outputs ``[q | k | v]``, the query of head ``h`` being columns
    ``h·d:(h+1)·d`` of its ``Conv1D`` weight.

    Raises:
        InputError: an architecture other than the supported ones.
    """
    hf = model.bridge.original_model
    model_type = getattr(hf.config, "model_type", "?")
    queries = slice(0, model.n_heads * model.d_head)
    sites = []
    for layer, block in enumerate(model.bridge.blocks):
        attn = block.attn
        inside = {id(m) for m in attn.original_component.modules()}
        for name in ("q", "qkv"):
            module = getattr(attn, name, None)
            if module is not None and id(module) in inside:
                sites.append((f"blocks.{layer}.attn.{name}", module.original_component.weight, queries))
                break
        else:
            raise InputError(f"HeSS does not support model type '{model_type}': it supports {SUPPORTED}")
    return sites


def query_fisher(model: HookedModel, batch: TokenBatch, error: ErrorFn, *, batch_size: int = 4) -> torch.Tensor:
    """Per-sample ``‖∂e/∂W_Q^h‖_F²`` for every layer and query head. Returns ``[S, L, Hq]`` float64.

    Runs the one forward with TransformerLens hooks; restores every ``requires_grad`` flag and removes every hook
    even when a forward or the error function raises. Parameters get no ``.grad``.
    """
    if not model.causal:
        raise InputError(f"{model.name} is an encoder: HeSS errors need a causal language model")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}: use at least 1")
    sites = query_sites(model)
    out = torch.zeros(len(batch), len(sites), model.n_heads, dtype=torch.float64)
    params = list(model.bridge.parameters())
    with model.lock:
        flags = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(False)
            row = 0
            for chunk in batch.chunks(batch_size):
                out[row:row + len(chunk)] = _chunk_fisher(model, chunk, error, sites)
                row += len(chunk)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
    return out


def _site_hooks(sites, store: dict) -> list:
    """``hook_in`` keeps ``X``; ``hook_out`` adds a zero leaf whose gradient is ``∂e/∂Y`` (all paths kept)."""
    hooks = []
    for index, (prefix, _, _) in enumerate(sites):
        def keep_input(x, hook, index=index):
            store[("x", index)] = x.detach()
            return x

        def add_leaf(y, hook, index=index):
            leaf = torch.zeros_like(y, requires_grad=True)
            store[("leaf", index)] = leaf
            return y + leaf
        hooks += [(f"{prefix}.hook_in", keep_input), (f"{prefix}.hook_out", add_leaf)]
    return hooks


def _chunk_fisher(model: HookedModel, chunk: TokenBatch, error: ErrorFn, sites) -> torch.Tensor:
    store: dict = {}
    mask = chunk.mask.to(model.device)
    logits = run(model, chunk, backend="sdpa", fwd_hooks=_site_hooks(sites, store), grad=True)
    with torch.enable_grad():
        errors = error(logits, chunk)
        if errors.shape != (len(chunk),) or not torch.isfinite(errors).all():
            raise InputError(f"the HeSS error must return one finite value per sample, got shape "
                             f"{tuple(errors.shape)}: check the error function and the data")
        leaves = [store[("leaf", i)] for i in range(len(sites))]
        grads = torch.autograd.grad(errors.sum(), leaves, allow_unused=True)
    fisher = torch.zeros(len(chunk), len(sites), model.n_heads, dtype=torch.float64)
    for layer, ((_, _, cols), grad) in enumerate(zip(sites, grads)):
        if grad is None:
            continue
        x = store[("x", layer)].double() * mask[..., None]  # [B, N, D]
        grad = grad.flatten(2) if grad.dim() == 4 else grad  # hook_out may show [B, N, H, d]
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
    """Head sensitivity to attention sparsification (docs/metrics.md §6).

    Args:
        metrics: subset of ``hess``, ``hess_e1``, ``hess_e2`` to report (all computed).
        n_calibration: samples per error (natural text for e1, repeated sequences for e2).
        lam: λ of ``HeSS = λ·HeSS_e1 + (1−λ)·HeSS_e2``.
        e1, e2: error names (``next_token``, ``copy``) or callables ``(logits [B,N,V], batch) -> [B]``.
        seq_len: length of the bundled calibration windows (e1) when no batch is given.
        copy_seq_len: total length of the bundled repeated sequences (e2) when none are given.
        batch_size: samples per forward/backward.
        seed: induction-sequence seed and bootstrap seed.
        layers, heads: restrict the reported layers/heads (default all; the scores are normalised
            over every head of a layer either way).

    Attributes (after ``fit``):
        metrics_: the metrics reported; layers_, heads_: the indices reported.
        fisher_: ``{"hess_e1"|"hess_e2": [S, L, H]}`` per-sample Fisher traces (every layer and head).
        per_sample_: the same normalised per sample (``[S, L_sel, H_sel]``).
        mean_, ci_low_, ci_high_: metric -> ``[L_sel, H_sel]``.
        n_samples_: metric -> number of samples used.
    """

    name: ClassVar[str] = "hess"
    metrics: ClassVar[tuple[str, ...]] = ("hess", "hess_e1", "hess_e2")
    needs_capture: ClassVar[bool] = False
    needs_model: ClassVar[bool] = True

    def __init__(self, metrics: Sequence[MetricName] | None = None, *, n_calibration: int = 8,
                 lam: float = 0.5, e1: ErrorName | ErrorFn = "next_token", e2: ErrorName | ErrorFn = "copy",
                 seq_len: int = 256, copy_seq_len: int = 257, batch_size: int = 4, n_boot: int = 1000,
                 seed: int = 0, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> None:
        self.metrics = metrics
        self.n_calibration, self.lam, self.seq_len, self.copy_seq_len = n_calibration, lam, seq_len, copy_seq_len
        self.e1, self.e2 = e1, e2
        self.batch_size, self.n_boot, self.seed = batch_size, n_boot, seed
        self.layers, self.heads = layers, heads

    def check_params(self) -> None:
        self.check_metrics(self.metrics)
        if not isinstance(self.n_calibration, int) or self.n_calibration < 1:
            raise InputError(f"n_calibration={self.n_calibration}: HeSS needs at least 1 calibration sample")
        if not 0.0 <= self.lam <= 1.0:
            raise InputError(f"lam={self.lam}: the HeSS mixing weight must lie in [0, 1]")
        resolve_error(self.e1), resolve_error(self.e2)
        if self.batch_size < 1:
            raise InputError(f"batch_size={self.batch_size}: use at least 1")

    def cost_forwards(self, n_layers: int, n_heads: int, n_tokens: int, samples: int) -> float | None:
        """A forward + backward (3 forward-equivalents) of each sample of both error sets: the run's
        batch (its first ``n_calibration`` samples) and the bundled other set, ``n_calibration``
        sequences of ``copy_seq_len`` tokens (converted to inputs of ``n_tokens``)."""
        bundled = self.n_calibration * self.copy_seq_len / max(1, n_tokens)
        return 3.0 * (min(samples, self.n_calibration) + bundled)

    def fit(self, capture: Capture | None = None, *, model: HookedModel | None = None,
            batch: TokenBatch | None = None, calibration: TokenBatch | None = None,
            copy: TokenBatch | None = None) -> "HeSS":
        """Compute HeSS on ``calibration`` (e1) and ``copy`` (e2); bundled sets when None.

        ``batch`` (a run's data) serves as the e2 set when it holds repeated sequences (meta
        ``repeat_period`` on every sample), otherwise as the e1 calibration text. ``capture`` is
        not used. Only the first ``n_calibration`` samples of each set are used. The scores are
        computed (and normalised) over every head; ``layers``/``heads`` restrict what is reported.
        """
        from workbench.data import load_dataset

        self.check_inputs(capture, model, batch)
        self.check_params()
        self.metrics_ = self.check_metrics(self.metrics)
        layers, heads = model.check_heads(self.layers, self.heads)
        if batch is not None:
            if batch.meta and all("repeat_period" in m for m in batch.meta):
                if copy is not None:
                    raise InputError("batch holds repeated sequences (the e2 data) and copy= was given too: pass one")
                copy = batch
            else:
                if calibration is not None:
                    raise InputError("batch is calibration text (the e1 data) and calibration= was given too: "
                                     "pass one")
                calibration = batch
        if calibration is None:
            calibration = load_dataset("calibration", model, n=self.n_calibration, seq_len=self.seq_len)
        if copy is None:
            copy = load_dataset("induction", model, n=self.n_calibration, seq_len=self.copy_seq_len, seed=self.seed)
        calibration = calibration.select(slice(0, self.n_calibration))
        copy = copy.select(slice(0, self.n_calibration))
        e1, e2 = resolve_error(self.e1), resolve_error(self.e2)
        self.fisher_ = {"hess_e1": query_fisher(model, calibration, e1, batch_size=self.batch_size),
                        "hess_e2": query_fisher(model, copy, e2, batch_size=self.batch_size)}
        rows, cols = torch.tensor(layers)[:, None], torch.tensor(heads)[None, :]
        self.per_sample_ = {k: normalise(v)[:, rows, cols] for k, v in self.fisher_.items()}
        intervals = bootstrap_hess(self.fisher_["hess_e1"], self.fisher_["hess_e2"], self.lam,
                                   n_boot=self.n_boot, seed=self.seed)
        pick = np.ix_(layers, heads)
        self.mean_ = {k: v[0][pick] for k, v in intervals.items()}
        self.ci_low_ = {k: v[1][pick] for k, v in intervals.items()}
        self.ci_high_ = {k: v[2][pick] for k, v in intervals.items()}
        self.n_samples_ = {"hess_e1": len(calibration), "hess_e2": len(copy),
                           "hess": min(len(calibration), len(copy))}
        self.layers_, self.heads_ = layers, heads
        return self
