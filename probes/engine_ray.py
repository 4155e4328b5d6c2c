"""The Ray engine: the one pipeline over dataset shards on Ray actors, merged on the driver.

``analyze(model, inputs, probes=..., engine="ray")`` (or ``engine=RayEngine(workers=4)``) and
``workbench analyze --engine ray [--workers N] [--address ADDR] [--resume]`` run here:

1. the driver joins a Ray cluster (``address``) or starts a local one (``ray.init(num_cpus=...)``),
   or uses the one this process already started;
2. ``workers`` actors each load the model once (``num_gpus=1`` each on CUDA); the first one
   tokenizes the inputs and runs every cheap check (layers, heads, interventions, probes);
3. the dataset is cut into contiguous shards (:func:`probes.sharded.plan_shards`); each actor runs
   :func:`probes.pipeline.analyze` on one shard at a time and returns only mergeable aggregates
   (:class:`probes.sharded.ShardResult`: moments ``[L, H]`` per metric, sink flags, and the
   long-context probes' per-sample KV saliency shares and greedy answers);
4. the driver merges them (:func:`probes.sharded.finish`) into the table a one-process run gives.

With ``resume_dir`` every finished shard is written there (safetensors, never pickle) and a
later run with the same settings and data reads them back instead of recomputing them.
Ctrl-C, a cancel callback or a worker error kill the actors; the error is one line naming the
shard, and nothing else is returned.

Ray is optional: without it, asking for this engine raises one line naming the install command.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from probes.sharded import (ShardResult, batch_fingerprint, check_shardable, default_shard_size, finish,
                            load_shard, merge_rerun, plan_shards, run_shard, save_shard, sinks_reruns)
from workbench.batch import TokenBatch
from workbench.errors import InputError, WorkbenchError, check_int
from workbench.progress import Progress

__all__ = ["DatasetSpec", "RayEngine", "as_engine", "import_ray", "release_workers"]

INSTALL_HINT = 'pip install -e ".[distributed]"'
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
# actors kept between calls on a cluster this process joined or started itself (notebook, tests):
# (model, device, dtype, workers, threads, gpus) -> actor handles
_POOLS: dict[tuple, list] = {}


def release_workers() -> None:
    """Kill the actors kept between calls (their models stay loaded until then)."""
    ray = import_ray()
    for actors in _POOLS.values():
        for actor in actors:
            ray.kill(actor)
    _POOLS.clear()


def import_ray():
    """The ``ray`` module, or :class:`InputError` naming the install command."""
    try:
        import ray
    except ImportError:
        raise InputError(f"the ray engine needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset the first worker loads (:func:`workbench.data.load_dataset`), so the driver
    never loads the model: bundled name or file path, ``n``, ``seq_len``, ``seed``."""

    name: str
    n: int | None = None
    seq_len: int | None = None
    seed: int | None = None


class ShardWorker:
    """One Ray actor: loads the model once, then analyses shards (see the module docstring)."""

    def __init__(self, model: str, device: str, dtype: str, threads: int) -> None:
        import torch

        from workbench.model import load_model

        torch.set_num_threads(max(1, threads))
        device = "cuda" if device.startswith("cuda") else device  # Ray shows the actor its one GPU as cuda:0
        self.model = load_model(model, device=device, dtype=dtype)

    def prepare(self, inputs, probes, layers, heads, interventions, mode, patterns_max_tokens):
        """Tokenize the inputs and run every check that needs the model; returns
        ``(batch, layers, heads, interventions, mode, model folder)``."""
        import torch

        from workbench.capture import as_batch, resolve_mode
        from workbench.data import load_dataset
        from workbench.interventions import as_intervention_set

        if isinstance(inputs, DatasetSpec):
            if inputs.seed is not None:
                torch.manual_seed(inputs.seed)
            batch = load_dataset(inputs.name, self.model, n=inputs.n, seq_len=inputs.seq_len, seed=inputs.seed)
        else:
            batch = as_batch(self.model, inputs)
        layers, heads = self.model.check_heads(layers, heads)
        spec = as_intervention_set(interventions)
        if spec.reference is None and any(i.kind == "mean" for i in spec):
            spec = spec.with_reference(batch)  # mean ablations use the whole dataset, as in one process
        spec.validate(self.model, batch)
        for probe in probes:
            probe.check_run(self.model, batch)
        chosen = resolve_mode(mode, batch.tokens.shape[1], patterns_max_tokens) \
            if any(p.needs_capture for p in probes) else None
        return batch, layers, heads, (spec if len(spec) else None), chosen, str(self.model.folder)

    def run(self, shard: TokenBatch, probes, index: int, start: int, stop: int, settings: dict) -> ShardResult:
        return run_shard(self.model, shard, probes, index, start, stop, **settings)


@dataclass
class RayEngine:
    """Settings of a Ray run (see the module docstring).

    Args:
        workers: actors (default: the GPUs of the cluster on CUDA, else 2).
        address: a running cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); None starts
            a local one (or uses the one this process already started).
        shard_size: samples per shard (default: at most ``batch_size`` and one shard per worker).
        resume_dir: folder for finished shards; a run with the same settings reads them back.
        device, dtype: where the actors load the model (default: the given model's, else cpu / float32).
    """

    workers: int | None = None
    address: str | None = None
    shard_size: int | None = None
    resume_dir: Path | None = None
    device: str | None = None
    dtype: str | None = None

    def analyze(self, model, inputs, *, probes="stats,detectors", metrics=None, mode: str = "auto",
                layers: Sequence[int] | None = None, heads: Sequence[int] | None = None, interventions=None,
                batch_size: int = 8, local_window: int = 8, keep_patterns: bool = False, keep_qk: bool = False,
                progress: bool | Callable[[float, str], None] | Progress = True,
                cancel: Callable[[], bool] | None = None, on_error: str = "raise",
                patterns_max_tokens: int | None = None):
        """:func:`probes.pipeline.analyze` on Ray; returns its :class:`AnalysisResult` (``capture``
        None, ``engine`` filled in)."""
        from probes.pipeline import AnalysisResult, build_probes
        from workbench.model import HookedModel

        if keep_patterns or keep_qk:
            raise InputError("the ray engine returns per-head aggregates, not attention maps: "
                             "use engine='local' for keep_patterns / keep_qk")
        if on_error not in ("raise", "note"):
            raise InputError(f"on_error='{on_error}': use 'raise' or 'note'")
        check_int("batch_size", batch_size)
        built = build_probes(probes, metrics, layers=layers, heads=heads)
        name, device, dtype = self._model_args(model)
        if not isinstance(model, HookedModel):
            from workbench.registry import resolve_spec

            resolve_spec(name)  # an unknown model fails here, before any worker starts
        ray = import_ray()
        timings: dict[str, float] = {}
        began = time.perf_counter()
        started_here, keep, self._lost, key, tracker = False, False, False, None, None
        actors: list = []
        try:
            if not ray.is_initialized():
                self._init(ray)
                started_here = True
            timings["ray_init_s"] = time.perf_counter() - began
            workers, threads, gpus = self._placement(ray, device)
            start = time.perf_counter()
            key = (name, device, dtype, workers, threads, gpus)
            actors = _POOLS.pop(key, None) or []
            if not actors:
                release_workers()  # one pool at a time: a kept pool holds the cluster's CPUs
                remote = ray.remote(ShardWorker).options(num_cpus=threads, num_gpus=gpus)
                actors = [remote.remote(name, device, dtype, threads) for _ in range(workers)]
            probe_list = list(built.values())
            prepared = self._get(ray, actors[0].prepare.remote(inputs, probe_list, layers, heads, interventions,
                                                               mode, patterns_max_tokens), "preparing the run")
            batch, layers, heads, spec, chosen_mode, folder = prepared
            self._get(ray, [a.__ray_ready__.remote() for a in actors], "loading the model")
            timings["actors_s"] = time.perf_counter() - start
            check_shardable(built, batch, spec)
            size = self.shard_size or default_shard_size(len(batch), workers, batch_size)
            check_int("shard_size", size)
            bounds = plan_shards(len(batch), size)
            settings = {"mode": chosen_mode, "layers": layers, "heads": heads, "interventions": spec,
                        "batch_size": batch_size, "local_window": local_window, "on_error": on_error}
            store = _ShardStore(self.resume_dir, {
                "model": name, "device": device, "dtype": dtype, "data": batch_fingerprint(batch),
                "shards": bounds, "probes": {k: repr(sorted(p.get_params().items())) for k, p in built.items()},
                "settings": {k: (v.text if k == "interventions" and v is not None else v) for k, v in settings.items()},
            })
            results = store.load()
            tracker = progress if isinstance(progress, Progress) else \
                Progress(progress if callable(progress) else None, bar=progress is True)
            if cancel is not None:
                tracker.cancel = cancel
            start = time.perf_counter()
            todo = [(i, a, b, probe_list) for i, (a, b) in enumerate(bounds) if i not in results]
            tracker.stage(f"shards on {workers} Ray workers", max(1, len(todo)))
            overhead = self._dispatch(ray, actors, batch, todo, settings, tracker,
                                      lambda r: results.__setitem__(r.index, store.save(r)))
            rerun, redo = sinks_reruns(built, list(results.values()))
            if redo:
                tracker.stage("sinks: re-run with the merged sink dimensions", len(redo))
                again = [(i, bounds[i][0], bounds[i][1], [rerun]) for i in redo]
                overhead += self._dispatch(ray, actors, batch, again, settings, tracker,
                                           lambda r: merge_rerun(results[r.index], r))
            tracker.close()
            timings["shards_s"] = time.perf_counter() - start
            start = time.perf_counter()
            table, fitted, notes = finish(built, list(results.values()), layers, heads)
            timings["merge_s"] = time.perf_counter() - start
            if overhead:
                timings["shard_overhead_s"] = statistics.median(overhead)
            engine = {"engine": "ray", "ray_version": ray.__version__, "workers": workers,
                      "address": self.address or ("local" if started_here else ray.get_runtime_context().gcs_address),
                      "shards": len(bounds), "shard_size": size,
                      "resumed_shards": len(bounds) - len(todo), "threads_per_worker": threads,
                      "gpus_per_worker": gpus, "model_folder": folder}
            keep = not started_here
        except WorkbenchError:
            keep = not started_here and not self._lost  # a task's error leaves its actor healthy
            raise
        finally:
            if tracker is not None:
                tracker.close()
            if keep and key is not None:  # the caller's cluster: the next call reuses the loaded models
                _POOLS[key] = actors
            else:  # done with our own cluster, or an error / Ctrl-C / cancel: stop the workers
                for actor in actors:
                    ray.kill(actor)
            if started_here:
                ray.shutdown()
        return AnalysisResult(table, fitted, None, batch, chosen_mode, layers, heads, timings, notes, engine)

    # ------------------------------------------------------------------ helpers
    def _model_args(self, model) -> tuple[str, str, str]:
        from workbench.model import HookedModel

        if isinstance(model, HookedModel):
            name = model.name
            device = self.device or str(model.device)
            dtype = self.dtype or str(model.dtype).replace("torch.", "")
        elif isinstance(model, (str, Path)):
            name, device, dtype = str(model), self.device or "cpu", self.dtype or "float32"
        else:
            raise InputError(f"the ray engine loads the model on each worker: pass its name or folder, "
                             f"not a {type(model).__name__}")
        if not _DEVICE.fullmatch(device):
            raise InputError(f"unknown device '{device}' for the ray engine: use cpu or cuda")
        return name, device, dtype

    def _init(self, ray) -> None:
        options = {"log_to_driver": False, "configure_logging": False}
        try:
            if self.address:
                ray.init(address=self.address, **options)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **options)
        except ConnectionError as err:
            raise InputError(f"cannot reach the Ray cluster at {self.address} ({_first_line(err)}): "
                             "check --address (start one with 'ray start --head')") from None

    def _placement(self, ray, device: str) -> tuple[int, int, int]:
        """``(workers, CPUs per worker, GPUs per worker)`` that the cluster can place now."""
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        on_gpu = device.startswith("cuda")
        workers = self.workers or (gpus if on_gpu and gpus else 2)
        check_int("workers", workers)
        if on_gpu and gpus < workers:
            raise InputError(f"--device cuda gives each of the {workers} workers one GPU, but the Ray cluster has "
                             f"{gpus}: lower --workers or add GPU nodes")
        if cpus < workers:
            raise InputError(f"the Ray cluster has {cpus} CPUs for {workers} workers: lower --workers")
        threads = 1 if on_gpu else max(1, cpus // workers)
        return workers, threads, (1 if on_gpu else 0)

    def _get(self, ray, refs, what: str, shard: bool = False):
        """``ray.get`` with a worker's error as one line (an input error as itself; on a shard,
        prefixed with the shard and its samples)."""
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else None
            if isinstance(cause, WorkbenchError):
                message = _first_line(cause)
                raise type(cause)(f"Ray worker failed on {what}: {message}" if shard else message) from None
            raise WorkbenchError(f"Ray worker failed on {what}: {_describe(cause or err)}") from None
        except ray.exceptions.RayActorError as err:
            self._lost = True
            raise WorkbenchError(f"a Ray worker died while {what}: {_describe(err)}") from None

    def _dispatch(self, ray, actors, batch: TokenBatch, todo, settings: dict, tracker: Progress,
                  done: Callable[[ShardResult], object]) -> list[float]:
        """Keep every actor busy with one shard until ``todo`` is empty; ``done`` takes each result.
        Returns the driver-side overhead per shard (round trip minus the worker's compute time)."""
        queue, idle, running, overhead = list(todo), list(actors), {}, []
        settings_ref = ray.put(settings)
        while queue or running:
            while queue and idle:
                index, start, stop, probes = queue.pop(0)
                actor = idle.pop()
                ref = actor.run.remote(batch.select(slice(start, stop)), probes, index, start, stop, settings_ref)
                running[ref] = (actor, index, start, stop, time.perf_counter())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
            tracker.check()
            for ref in ready:
                actor, index, start, stop, sent = running.pop(ref)
                where = f"shard {index} (samples {start}..{stop - 1})"
                result = self._get(ray, ref, where, shard=True)
                overhead.append(time.perf_counter() - sent - result.info["compute_s"])
                done(result)
                idle.append(actor)
                tracker.advance(1, info=f"shard {index}")
        return overhead


class _ShardStore:
    """Finished shards in ``folder`` (``plan.json`` + ``shard-NNNNN.safetensors``); no-op without one."""

    def __init__(self, folder: Path | None, plan: dict) -> None:
        self.folder = None if folder is None else Path(folder)
        self.plan = json.loads(json.dumps(plan, default=str))

    def load(self) -> dict[int, ShardResult]:
        if self.folder is None:
            return {}
        plan_file = self.folder / "plan.json"
        if plan_file.is_file():
            try:
                saved = json.loads(plan_file.read_text())
            except ValueError:
                saved = None
            if saved != self.plan:
                raise InputError(f"--resume: {self.folder} holds shards of another run (other settings or data): "
                                 "run with the same settings, or delete that folder")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            from workbench.atomic import atomic_file

            with atomic_file(plan_file) as handle:
                handle.write(json.dumps(self.plan, indent=1))
        results = {}
        for path in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                result = load_shard(path)
            except Exception:  # a file cut short by a kill: recompute that shard
                path.unlink(missing_ok=True)
                continue
            results[result.index] = result
        return results

    def save(self, result: ShardResult) -> ShardResult:
        if self.folder is not None:
            save_shard(self.folder / f"shard-{result.index:05d}.safetensors", result)
        return result


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {_first_line(err)}"


def as_engine(engine) -> RayEngine:
    """``"ray"`` or a :class:`RayEngine` -> the engine; anything else is one clear error."""
    if isinstance(engine, RayEngine):
        return engine
    if engine == "ray":
        return RayEngine()
    raise InputError(f"unknown engine '{engine}': use 'local' or 'ray' (or a probes.engine_ray.RayEngine)")
