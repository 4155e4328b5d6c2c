"""Sharded runs of the one pipeline: per-shard mergeable aggregates that merge into the same table.

A shard is a contiguous slice of the dataset's samples. :func:`run_shard` runs
:func:`probes.pipeline.analyze` on it and keeps, per probe and metric, the moments
(:class:`probes.aggregate.MomentSums`) of the per-sample values ``per_sample_ [S, L, H]``;
:func:`finish` merges every shard's moments and gives the table the one-process run gives
(the same mean and interval, docs/metrics.md §9). Nothing bigger than ``[L, H]`` per metric
leaves a shard.

What merges exactly (each probe's dataset-level value, and its mergeable state):

- ``stats``, ``detectors``, ``vhd``: mean over samples of an independent per-sample value -> moments.
- ``sinks``: ``sink_score`` and ``first4_mass`` likewise. ``noop_score`` is per sample too once the
  sink dimensions ``D_sink`` are fixed, but ``D_sink`` is discovered on the whole dataset: a
  dimension is flagged in a layer when ANY real token passes, so the flags ``[L, D]`` merge by OR.
  Each shard returns its flags and the dimensions it used; the shards whose own ``D_sink``
  differs from the merged one are re-run (sinks only) with the merged ``D_sink`` given.
- ``importance``: ``ablation_zero`` is per sample. ``gradient`` divides each layer by the norm of
  the dataset mean, so a shard returns the moments of the raw ``|∂L/∂ξ|`` on every head and the
  merged mean is normalised after the merge (the division by a per-layer constant scales mean
  and deviations alike). ``attribution_patching`` is per sample when every sample brings its
  ``corrupt_prompt``. ``ablation_mean`` / ``ablation_resample`` (and attribution patching without
  corrupt prompts) take their reference from the other samples of the batch: a shard would
  change them, so a sharded run refuses them.
- ``hess`` scores its own calibration sets (the first ``n_calibration`` samples, normalised by
  ratio of means with a bootstrap interval), not the dataset's shards: refused.
- ``resample`` interventions pair sample ``b`` with reference sample ``b + 1``: refused.
- ``retrieval`` and ``sparsity`` (docs/metrics.md §10): every metric is a mean over per-sample values,
  each sample taken at its real length (NaN, left out, where a sample has no needle or no generated
  answer) -> moments. A shard without any needle sample scores NaN for all of them without a
  forward (:meth:`probes.retrieval.Retrieval.fit_without_needles`). The dataset-level facts are
  per sample too: each shard returns in ``info`` the sparsity probe's KV saliency shares and the
  retrieval probe's needle count and greedy answers, and :func:`finish` concatenates them in sample
  order and rebuilds ``kv_saliency_`` (mean and interval over samples), ``generated_`` and
  ``answer_correct_`` as one process gives them.

Shard results are written as safetensors (with a JSON header), never pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from probes.aggregate import MomentSums, merge_all
from probes.base import Probe, concat_frames
from workbench.batch import TokenBatch
from workbench.errors import InputError

__all__ = ["ShardResult", "check_shardable", "finish", "load_shard", "plan_shards", "run_shard",
           "save_shard", "sinks_reruns"]

# probe -> metrics a shard cannot compute on its own (their reference is the rest of the batch)
_NOT_SHARDABLE = {"importance": ("ablation_mean", "ablation_resample")}
_SHARDABLE_PROBES = ("stats", "detectors", "sinks", "importance", "vhd", "retrieval", "sparsity")


@dataclass
class ShardResult:
    """What one shard sends back.

    Attributes:
        index: shard number; start, stop: its sample range ``[start, stop)`` in the dataset.
        moments: ``"probe/metric"`` -> moments ``[L_sel, H_sel]`` (``"importance/gradient_raw"``:
            ``[n_layers, Hq]`` raw gradients).
        flags: ``"sinks/flagged"`` -> ``[n_layers, D]`` bool (dimension passed in that layer).
        info: JSON-able facts: per probe ``metrics``, ``layers``, ``heads`` (and ``sink_dims``;
            ``retrieval``: ``n_needle_samples``, with generation ``generated``/``answer_correct``
            per sample; ``sparsity``: ``kv_saliency``, the per-sample KV saliency shares),
            ``mode``, ``notes``, ``compute_s``.
    """

    index: int
    start: int
    stop: int
    moments: dict[str, MomentSums] = field(default_factory=dict)
    flags: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def plan_shards(n_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` sample ranges of at most ``shard_size`` samples."""
    if shard_size < 1:
        raise InputError(f"shard size {shard_size}: give at least 1 sample per shard")
    return [(start, min(start + shard_size, n_samples)) for start in range(0, n_samples, shard_size)]


def check_shardable(probes: dict[str, Probe], batch: TokenBatch, interventions=None) -> None:
    """Refuse (one line, with the fix) what a sharded run cannot reproduce exactly (module docstring).

    Raises:
        InputError: a probe, metric or intervention whose value depends on the other samples.
    """
    for name, probe in probes.items():
        if name not in _SHARDABLE_PROBES:
            raise InputError(f"probe '{name}' cannot be split into shards (its score is not a mean over the "
                             "dataset's samples): run it with --engine local")
        wanted = probe.metrics if probe.metrics is not None else type(probe).metrics
        bad = [m for m in wanted if m in _NOT_SHARDABLE.get(name, ())]
        if name == "importance" and "attribution_patching" in wanted and \
                not all("corrupt_prompt" in m for m in batch.meta):
            bad.append("attribution_patching")
        if bad:
            keep = [m for m in wanted if m not in bad]
            fix = f"--metrics {','.join(keep)}" if keep else "another probe"
            raise InputError(f"{name} metric '{bad[0]}' takes its reference from the other samples of the batch, "
                             f"so a shard would change it: use {fix}, or --engine local")
    if interventions is not None and any(item.kind == "resample" for item in interventions):
        raise InputError("a resample intervention pairs each sample with the next one in the batch, so shards would "
                         "change it: use --engine local, or a zero/mean intervention")


def fresh_probes(probes: Sequence[Probe]) -> list[Probe]:
    """Unfitted copies with the same parameters (a shard never reuses fitted state)."""
    return [type(p)(**p.get_params()) for p in probes]


def run_shard(model, shard: TokenBatch, probes: Sequence[Probe], index: int, start: int, stop: int, *,
              mode: str | None, layers: Sequence[int], heads: Sequence[int], interventions=None,
              batch_size: int = 8, local_window: int = 8, on_error: str = "raise") -> ShardResult:
    """Run the one pipeline on one shard and keep its mergeable aggregates."""
    from probes.pipeline import analyze

    began = time.perf_counter()
    probes = fresh_probes(probes)
    # the retrieval probe refuses a batch without needles; on a shard of the whole (checked) batch
    # such samples only score NaN, so a shard without any is "fitted" without a forward
    has_needle = any(m.get("kind") == "needle" for m in shard.meta)
    needle_free = [p for p in probes if p.name == "retrieval" and not has_needle]
    rest = [p for p in probes if p not in needle_free]
    fitted, notes, used_mode = {}, {}, mode
    if rest:
        result = analyze(model, shard, probes=rest, mode=mode or "auto", layers=layers, heads=heads,
                         interventions=interventions, batch_size=batch_size, local_window=local_window,
                         progress=False, on_error=on_error)
        fitted, notes, used_mode = dict(result.probes), dict(result.notes), result.mode
    fitted |= {p.name: p.fit_without_needles(len(shard), layers, heads) for p in needle_free}
    out = ShardResult(index, start, stop, info={"probes": {}, "notes": notes, "mode": used_mode})
    for name, probe in fitted.items():
        facts = {"metrics": list(probe.metrics_), "layers": [int(x) for x in probe.layers_],
                 "heads": [int(x) for x in probe.heads_], **_per_sample_facts(probe)}
        for metric, values in probe.per_sample_.items():
            out.moments[f"{name}/{metric}"] = MomentSums.from_samples(values)
        if name == "importance" and hasattr(probe, "gradient_raw_"):
            out.moments["importance/gradient_raw"] = MomentSums.from_samples(probe.gradient_raw_)
        if name == "sinks" and hasattr(probe, "scan_"):
            facts["sink_dims"] = [int(d) for d in probe.sink_dims_]
            out.flags["sinks/flagged"] = probe.scan_.flagged_layers(probe.dim_threshold_, probe.min_abs).numpy()
        out.info["probes"][name] = facts
    out.info["compute_s"] = time.perf_counter() - began
    return out


def _per_sample_facts(probe: Probe) -> dict:
    """Per-sample values a fitted probe keeps beyond its metrics (the merge concatenates them):
    the sparsity probe's KV saliency shares, the retrieval probe's needle count and greedy answers."""
    if probe.name == "sparsity":
        return {"kv_saliency": probe.kv_saliency_["per_sample"]}
    if probe.name != "retrieval":
        return {}
    facts = {"n_needle_samples": int(probe.n_needle_samples_)}
    if hasattr(probe, "generated_"):
        facts |= {"generated": list(probe.generated_), "answer_correct": list(probe.answer_correct_)}
    return facts


def _merge_per_sample_facts(probe: Probe, facts: Sequence[dict]) -> None:
    """Set on the merged ``probe`` what :func:`_per_sample_facts` kept, over the shards in sample order."""
    if "kv_saliency" in facts[0]:
        shares = [x for f in facts for x in f["kv_saliency"]]
        probe.set_kv_saliency(torch.tensor(shares, dtype=torch.float64))
    if "n_needle_samples" in facts[0]:
        probe.n_needle_samples_ = sum(f["n_needle_samples"] for f in facts)
    if "generated" in facts[0]:
        probe.generated_ = [x for f in facts for x in f["generated"]]
        probe.answer_correct_ = [x for f in facts for x in f["answer_correct"]]


def sinks_reruns(probes: dict[str, Probe], results: Sequence[ShardResult]) -> tuple[Probe | None, list[int]]:
    """The sinks probe to re-run with the merged ``D_sink`` and the shards that need it.

    Returns ``(None, [])`` when no shard's ``noop_score`` depends on a ``D_sink`` other than the
    merged one (no sinks probe, ``sink_dims`` given, no ``noop_score``, or every shard agrees).
    """
    from probes.sink_tokens import discover_sink_dims

    probe = probes.get("sinks")
    if probe is None or probe.sink_dims is not None:
        return None, []
    shards = [r for r in results if "sinks/noop_score" in r.moments and "sinks/flagged" in r.flags]
    if not shards:
        return None, []
    flagged = np.logical_or.reduce([r.flags["sinks/flagged"] for r in shards])
    dims = discover_sink_dims(torch.from_numpy(flagged), probe.min_layer_frac)
    redo = [r.index for r in shards if r.info["probes"]["sinks"].get("sink_dims") != dims]
    if not redo:
        return None, []
    rerun = type(probe)(**probe.get_params())
    rerun.set_params(metrics=["noop_score"], sink_dims=dims)
    return rerun, redo


def merge_rerun(result: ShardResult, rerun: ShardResult) -> ShardResult:
    """``result`` with its ``noop_score`` moments replaced by those of the sinks re-run."""
    result.moments["sinks/noop_score"] = rerun.moments["sinks/noop_score"]
    result.info["probes"]["sinks"]["sink_dims"] = rerun.info["probes"]["sinks"]["sink_dims"]
    return result


def finish(probes: dict[str, Probe], results: Sequence[ShardResult], layers: Sequence[int],
           heads: Sequence[int]) -> tuple[pd.DataFrame, dict[str, Probe], dict[str, str]]:
    """Merge every shard and fill each probe's ``metrics_``, ``layers_``, ``heads_``, ``mean_``,
    ``ci_low_``, ``ci_high_`` (and ``moments_``: metric -> merged :class:`MomentSums`; the
    per-sample facts of :func:`_per_sample_facts`, e.g. ``kv_saliency_``).

    Returns:
        ``(table, fitted probes, notes)``; the table as :func:`probes.pipeline.analyze` builds it.
    """
    results = sorted(results, key=lambda r: r.index)
    notes: dict[str, str] = {}
    for r in results:
        for name, note in r.info.get("notes", {}).items():
            notes.setdefault(name, note)
    n_samples = sum(r.stop - r.start for r in results)
    fitted: dict[str, Probe] = {}
    for name, probe in probes.items():
        if name in notes:
            continue
        facts = results[0].info["probes"][name]
        probe.metrics_ = tuple(facts["metrics"])
        probe.layers_, probe.heads_ = facts["layers"], facts["heads"]
        probe.moments_ = {m: merge_all(r.moments[f"{name}/{m}"] for r in results)
                          for m in probe.metrics_ if f"{name}/{m}" in results[0].moments}
        if name == "importance" and "gradient" in probe.moments_:
            raw = merge_all(r.moments["importance/gradient_raw"] for r in results)
            probe.moments_["gradient"] = _normalised_gradient(raw, n_samples, probe.layers_, probe.heads_)
        probe.mean_, probe.ci_low_, probe.ci_high_ = {}, {}, {}
        for metric, moments in probe.moments_.items():
            probe.mean_[metric], probe.ci_low_[metric], probe.ci_high_[metric] = moments.mean_ci(
                bounds=probe.bounds.get(metric))
        probe.n_samples_ = n_samples
        _merge_per_sample_facts(probe, [r.info["probes"][name] for r in results])
        fitted[name] = probe
    table = concat_frames([p.to_frame() for p in fitted.values()])
    table = table[table["layer"].isin(layers) & table["head"].isin(heads)].reset_index(drop=True)
    return table, fitted, notes


def _normalised_gradient(raw: MomentSums, n_samples: int, layers: Sequence[int],
                         heads: Sequence[int]) -> MomentSums:
    """Moments of :func:`probes.importance.normalise_gradient` of the samples, from the raw ones:
    ``x / norm_l`` where the layer's norm is positive, else every sample is 0."""
    with np.errstate(invalid="ignore"):
        norm = np.sqrt((raw.mean ** 2).sum(-1, keepdims=True))  # [L, 1]; NaN when a head has no sample
    positive = norm > 0
    scaled = raw.scaled(np.where(positive, 1.0 / np.where(positive, norm, 1.0), 1.0))
    count = np.where(positive, scaled.count, n_samples)
    mean = np.where(positive, scaled.mean, 0.0)
    m2 = np.where(positive, scaled.m2, 0.0)
    pick = np.ix_(list(layers), list(heads))
    return MomentSums(count[pick], mean[pick], m2[pick])


# ----------------------------------------------------------------------------- files
def batch_fingerprint(batch: TokenBatch) -> str:
    """SHA-256 of the tokens, mask and metadata (a resumed run must see the same data)."""
    digest = hashlib.sha256()
    digest.update(batch.tokens.numpy().tobytes())
    digest.update(batch.mask.numpy().tobytes())
    digest.update(json.dumps(batch.meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def save_shard(path: Path, result: ShardResult) -> None:
    """Write one shard as safetensors (tensors) plus a JSON header (facts), atomically."""
    from safetensors.torch import save

    from workbench.atomic import atomic_file

    tensors: dict[str, torch.Tensor] = {}
    for key, moments in result.moments.items():
        tensors |= moments.to_tensors(key)
    for key, flags in result.flags.items():
        tensors[key] = torch.from_numpy(np.ascontiguousarray(flags.astype(np.uint8)))
    header = {"json": json.dumps({"index": result.index, "start": result.start, "stop": result.stop,
                                  "moments": sorted(result.moments), "flags": sorted(result.flags),
                                  "info": result.info})}
    with atomic_file(path, "wb") as handle:
        handle.write(save(tensors, metadata=header))


def load_shard(path: Path) -> ShardResult:
    """Read a shard written by :func:`save_shard`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        facts = json.loads(handle.metadata()["json"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    moments = {key: MomentSums.from_tensors(tensors, key) for key in facts["moments"]}
    flags = {key: tensors[key].numpy().astype(bool) for key in facts["flags"]}
    return ShardResult(facts["index"], facts["start"], facts["stop"], moments, flags, facts["info"])


def default_shard_size(n_samples: int, workers: int, batch_size: int) -> int:
    """At most ``batch_size`` samples per shard and at least one shard per worker."""
    return max(1, min(batch_size, math.ceil(n_samples / max(1, workers))))
