"""Throughput of ``analyze`` in one process vs the Ray engine with 1 and 2 workers (docs/scaleout.md).

One local Ray cluster (``ray.init(num_cpus=os.cpu_count())``) serves every Ray run. For each
worker count W the Ray actors are started once (one untimed call that loads the model in each
actor and warms it up; reported as "first call"), then ``--repeats`` interleaved pairs run the same
call in this process (``torch`` on every core) and on Ray (``engine=RayEngine(workers=W,
shard_size=S)``, each worker with ``cores // W`` torch threads, the actors reused as in a
notebook), plus the in-process call with one torch thread (what each of 2 workers gets on 2
cores). Interleaving keeps a machine shared with other jobs fair to every engine.

Columns: samples/s (dataset size / wall time of the whole call: tokenising on a worker, shards,
merge; median over the runs), the speed-up over one process (median of the per-pair ratios of
wall times), and the driver's overhead per shard: the round trip of a shard (submit, run, result
back) minus the worker's own compute time for it (scheduling, (de)serialisation, transfer), and
the merge time of the run (medians).

Usage::

    python benchmarks/bench_scaleout.py                    # SmolLM2, 8 induction samples of 32 tokens, stats
    python benchmarks/bench_scaleout.py --n 32 --repeats 5 --json results/scaleout.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="induction")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--probes", default="stats")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    args = parser.parse_args()

    import ray

    from probes.engine_ray import RayEngine, release_workers
    from probes.pipeline import analyze
    from workbench.data import load_dataset
    from workbench.model import load_model

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    model = load_model(args.model)
    batch = load_dataset(args.dataset, model, n=args.n, seq_len=args.seq_len, seed=0)
    common = dict(probes=args.probes, batch_size=args.batch_size, progress=False)

    def timed(engine, threads: int = cores) -> tuple[float, dict]:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        result = analyze(model, batch, engine=engine, **common)
        wall = time.perf_counter() - start
        torch.set_num_threads(cores)
        label = f"{engine} x{threads} threads" if isinstance(engine, str) else f"ray x{engine.workers}"
        print(f"  {label}: {wall:.2f} s", file=sys.stderr, flush=True)
        return wall, result.timings

    rows = []
    local_walls: list[float] = []
    single_walls: list[tuple[float, float]] = []  # (all cores, 1 thread) in-process pairs
    analyze(model, batch, **common)  # warm-up
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            engine = RayEngine(workers=workers, shard_size=args.shard_size)
            start = time.perf_counter()
            timed(engine)  # starts the actors (model load in each) and warms them up
            first = time.perf_counter() - start
            pairs = []
            for _ in range(args.repeats):
                local_wall = timed("local")[0]
                single_walls.append((local_wall, timed("local", threads=1)[0]))
                pairs.append((local_wall, *timed(engine)))
                local_walls.append(local_wall)
            rows.append({"engine": "ray", "workers": workers, "wall_s": statistics.median(w for _, w, _ in pairs),
                         "speedup": statistics.median(lw / w for lw, w, _ in pairs), "first_call_s": first,
                         "overhead_per_shard_ms": 1e3 * statistics.median(t["shard_overhead_s"] for *_, t in pairs),
                         "merge_ms": 1e3 * statistics.median(t["merge_s"] for *_, t in pairs),
                         "shards": -(-args.n // args.shard_size)})
            release_workers()
    finally:
        ray.shutdown()
    rows.insert(0, {"engine": "in-process", "workers": 1, "threads": cores, "wall_s": statistics.median(local_walls),
                    "speedup": 1.0})
    rows.insert(1, {"engine": "in-process", "workers": 1, "threads": 1,
                    "wall_s": statistics.median(w for _, w in single_walls),
                    "speedup": statistics.median(a / w for a, w in single_walls)})

    print(f"{args.model}, {args.dataset} n={args.n} seq_len={args.seq_len}, probes {args.probes}, "
          f"{cores} cores, shard size {args.shard_size}, {args.repeats} interleaved pairs per worker count, "
          f"ray {ray.__version__}")
    print(f"| engine | workers | torch threads each | samples/s | speed-up vs in-process ({cores} threads) "
          "| driver overhead / shard | merge | first call (actor start) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        row |= {"samples_per_s": args.n / row["wall_s"], "model": args.model, "n": args.n, "seq_len": args.seq_len,
                "probes": args.probes, "cores": cores}
        extra = (f"{row['overhead_per_shard_ms']:.1f} ms | {row['merge_ms']:.1f} ms | {row['first_call_s']:.1f} s"
                 if row["engine"] == "ray" else "– | – | –")
        threads = row.get("threads", max(1, cores // row["workers"]))
        print(f"| {row['engine']} | {row['workers']} | {threads} | {row['samples_per_s']:.2f} | {row['speedup']:.2f}× "
              f"| {extra} |")
    if args.json:
        with open(args.json, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
