"""Long-context benchmark: plain SDPA forward vs all patterns vs stats capture (time, peak RSS).

Configurations, each measured in a fresh child process (``ru_maxrss`` of that child, so one
configuration's peak never hides another's):

- ``sdpa``:  the Hugging Face model (``attn_implementation="sdpa"``), one plain forward with logits;
- ``sdpa_body``: the same forward without the LM head (the part stats capture runs);
- ``bridge``: ``TransformerBridge.run_with_cache`` keeping every ``hook_pattern`` (skipped when the
  projected pattern memory exceeds the free RAM, or above ``--skip-bridge-above``);
- ``stats``: ``capture(model, batch, mode="stats", detectors=False)``: every METRICS §1 statistic
  (the nine row statistics and the received mass, raw and normalised) for all heads, no ``[q, k]`` map;
- ``stats_detectors``: the same plus the METRICS §2 detector rows (induction / duplicate mass,
  an exact gather at their target pairs): the default ``capture(..., mode="stats")``.

Each child reports wall time and CPU time (``time.process_time``). On a shared machine the wall
time depends on the other processes; with ``--threads 1`` the CPU time is what the run would take
on an idle core, so ratios of CPU times are the stable comparison.

Usage::

    python benchmarks/bench_long_context.py --lengths 1024,2048,4096,8192 --threads 1 --json runs.jsonl
    python benchmarks/bench_long_context.py --lengths 16384,32768 --configs sdpa,stats --threads 1
    python benchmarks/bench_long_context.py --table-from runs.jsonl

Input: the bundled calibration + held-out text, tokenized and tiled to each length (lengths past
the model's context window are fine for timing; their statistics are not meaningful).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import the checkout's packages
    sys.path.insert(0, str(REPO))

CONFIGS = ("sdpa", "sdpa_body", "bridge", "stats", "stats_detectors")
STATS_CONFIGS = ("stats", "stats_detectors")
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


def _maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: kB


def _folder(model_name: str) -> Path:
    """The model's local Hugging Face folder (pulled into the cache on first use)."""
    from workbench.pull import pull_model
    from workbench.registry import ModelSpec, resolve_spec

    spec = resolve_spec(model_name)
    return pull_model(spec) if isinstance(spec, ModelSpec) else spec


def _tokens(folder: Path, length: int):
    """``[1, length]`` ids: the bundled texts tokenized with the model's tokenizer, then tiled."""
    import torch
    from transformers import AutoTokenizer

    from workbench.data import datasets_dir

    text = "\n\n".join((datasets_dir() / f).read_text() for f in ("calibration.txt", "heldout.txt"))
    ids = AutoTokenizer.from_pretrained(str(folder))(text, return_tensors="pt").input_ids[0]
    return torch.cat([ids] * -(-length // ids.numel()))[:length][None]


def run_child(config: str, model_name: str, length: int, repeats: int = 1, threads: int | None = None) -> dict:
    """Run one configuration in this (fresh) process; returns the best of ``repeats`` timings.

    The SDPA configurations load only the Hugging Face model; the others load the workbench model
    (bridge, plus the kernel copy for stats), as a user of that path would.
    """
    import torch

    from workbench.batch import TokenBatch

    if threads:
        torch.set_num_threads(threads)
    folder = _folder(model_name)
    tokens = _tokens(folder, length)
    if config in ("sdpa", "sdpa_body"):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()
        module = hf.model if config == "sdpa_body" else hf

        def work(t):
            with torch.no_grad():
                return module(input_ids=t)
    elif config == "bridge":
        from workbench.model import load_model

        model = load_model(model_name)

        def work(t):
            with torch.no_grad():
                return model.bridge.run_with_cache(t, names_filter=lambda name: name.endswith("hook_pattern"))
    elif config in STATS_CONFIGS:
        from workbench.capture import capture
        from workbench.model import load_model

        model = load_model(model_name)
        model.kernel_model  # noqa: B018 - load it before timing
        detectors = config == "stats_detectors"

        def work(t):
            return capture(model, TokenBatch(t, torch.ones_like(t, dtype=torch.bool)), mode="stats",
                           progress=False, detectors=detectors)
    else:
        raise SystemExit(f"unknown configuration {config!r}: use one of {CONFIGS}")
    work(tokens[:, :64])  # warm-up (lazy imports, allocator)
    rss_before = _maxrss_gb()
    walls, cpus, loads = [], [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = work(tokens)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
        loads.append(os.getloadavg()[0])
        del result
    return {"config": config, "length": length, "wall_s": min(walls), "walls_s": walls, "cpu_s": min(cpus),
            "peak_gb": _maxrss_gb(), "peak_before_run_gb": rss_before, "threads": torch.get_num_threads(),
            "load_avg_1min": loads}


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return float("inf")


def bridge_projection_gb(length: int, n_layers: int, n_heads: int) -> float:
    """Patterns kept by run_with_cache (fp32) plus one layer's transient scores/probabilities (x3)."""
    per_layer = n_heads * length * length * 4 / 1024**3
    return per_layer * (n_layers + 3)


def measure(config: str, model_name: str, length: int, timeout: float, repeats: int = 1,
            threads: int | None = None) -> dict:
    """Run one configuration in a fresh subprocess (best wall time of ``repeats`` runs)."""
    cmd = [sys.executable, __file__, "--child", config, "--model", model_name, "--lengths", str(length),
           "--repeats", str(repeats)] + (["--threads", str(threads)] if threads else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"config": config, "length": length, "skipped": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return {"config": config, "length": length, "skipped": f"failed (rc {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


def _cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return "-"
    if "skipped" in row:
        return "skip"
    return format(row[key], fmt)


def print_table(results: list[dict], lengths: list[int], configs: list[str]) -> str:
    """Markdown table: wall and CPU seconds, peak RSS, and stats/SDPA ratios of both times."""
    by = {(r["config"], r["length"]): r for r in results}
    head = ["tokens"]
    for c in configs:
        head += [f"{c} wall s", f"{c} CPU s", f"{c} peak GB"]
    refs = [c for c in ("sdpa", "sdpa_body") if c in configs]
    pairs = [(st, ref) for st in STATS_CONFIGS if st in configs for ref in refs]
    for st, ref in pairs:
        head += [f"{st}/{ref} wall", f"{st}/{ref} CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in lengths:
        row = [str(n)]
        for c in configs:
            r = by.get((c, n))
            row += [_cell(r, "wall_s", ".1f"), _cell(r, "cpu_s", ".1f"), _cell(r, "peak_gb", ".2f")]
        for st, ref in pairs:
            stats, base = by.get((st, n)), by.get((ref, n))
            ok = stats and base and "skipped" not in stats and "skipped" not in base
            row += [f"{stats[k] / base[k]:.2f}x" if ok else "-" for k in ("wall_s", "cpu_s")]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"- {r['config']} @ {r['length']}: {r['skipped']}" for r in results if "skipped" in r]
    text = "\n".join(lines + ([""] + notes if notes else []))
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)),
                        help="comma-separated token counts (default: %(default)s)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="subset of %(default)s")
    parser.add_argument("--skip-bridge-above", type=int, default=None,
                        help="never run the all-patterns bridge above this many tokens")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (best wall time kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per configuration")
    parser.add_argument("--json", type=Path, default=None, help="also append every measurement here (JSON lines)")
    parser.add_argument("--table-from", type=Path, default=None,
                        help="print the table of a --json file (no runs) and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if args.child:
        print(json.dumps(run_child(args.child, args.model, lengths[0], args.repeats, args.threads)), flush=True)
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.table_from:
        rows = [json.loads(line) for line in args.table_from.read_text().splitlines() if line.strip()]
        print_table(rows, sorted({r["length"] for r in rows}), [c for c in configs if any(r["config"] == c for r in rows)])
        return
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown configuration {bad[0]!r}: use some of {', '.join(CONFIGS)}")
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(_folder(args.model)))
    n_layers, n_heads = hf_config.num_hidden_layers, hf_config.num_attention_heads
    print(f"# {args.model} on {os.cpu_count()} CPU cores, {_available_gb():.1f} GB available; "
          f"lengths {lengths}; configs {configs}", flush=True)
    results = []
    for n in lengths:
        for config in configs:
            if config == "bridge":
                need, free = bridge_projection_gb(n, n_layers, n_heads), _available_gb()
                if args.skip_bridge_above is not None and n > args.skip_bridge_above:
                    results.append({"config": config, "length": n,
                                    "skipped": f"above --skip-bridge-above (projected {need:.1f} GB of patterns)"})
                    continue
                if need > 0.9 * free:
                    results.append({"config": config, "length": n,
                                    "skipped": f"projected {need:.1f} GB of patterns > free RAM {free:.1f} GB"})
                    continue
            result = measure(config, args.model, n, args.timeout, args.repeats, args.threads)
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.json:
                with args.json.open("a") as fh:
                    fh.write(json.dumps(result) + "\n")
    print()
    print_table(results, lengths, configs)


if __name__ == "__main__":
    main()
