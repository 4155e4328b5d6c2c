"""Long-context benchmark: plain SDPA forward vs all patterns vs stats capture (time, peak RSS).

Configurations, each measured in a fresh child process (``ru_maxrss`` of that child, so one
configuration's peak never hides another's):

- ``sdpa``:  the Hugging Face model (``attn_implementation="sdpa"``), one plain forward with logits;
- ``sdpa_body``: the same forward without the LM head (the part stats capture runs);
- ``bridge``: ``TransformerBridge.run_with_cache`` keeping every ``hook_pattern`` (skipped when the
  projected pattern memory exceeds the free RAM, or above ``--skip-bridge-above``);
- ``stats``: ``capture(model, batch, mode="stats", detectors=False)``: every docs/metrics.md §1 statistic
  (the nine row statistics and the received mass, raw and normalised) for all heads, no ``[q, k]`` map;
- ``stats_detectors``: the same plus the docs/metrics.md §2 detector rows (induction / duplicate mass,
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

``--whole-process`` measures whole processes instead, as users run them: for each length, ``--repeats``
(default 3) interleaved pairs of

- reference: ``/usr/bin/time -v python benchmarks/sdpa_forward_process.py --folder F --seq-len N``
  (import, load with plain transformers/SDPA, ONE forward with ``logits_to_keep=1``, exit);
- workbench: ``/usr/bin/time -v workbench analyze --model M --dataset calibration --seq-len N --n 1
  --mode stats --probes stats --no-progress --out TMP/run`` (the whole CLI run, writing included),

both on the same input ids (sample 0 of the packed calibration set; ``--check-ids`` verifies that
against ``workbench.load_dataset``) and the same environment (threads: torch's default in both, or
``--threads T`` exported as ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` to both). From ``time -v``: CPU s =
user + sys, wall = "Elapsed (wall clock) time", peak = "Maximum resident set size". The table shows
medians over the pairs; the ratios are medians of the per-pair workbench/reference ratios (so a
load swing hitting one pair moves one sample, not the medians of both sides separately)::

    python benchmarks/bench_long_context.py --whole-process --lengths 512,2048 --repeats 3 --json wp.jsonl
    python benchmarks/bench_long_context.py --whole-process --table-from wp.jsonl   # reprint the table
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
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
    (one TransformerBridge), as a user of that path would.
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


_TIME_FIELDS = {"user_s": "User time (seconds)", "sys_s": "System time (seconds)",
                "wall_s": "Elapsed (wall clock) time", "peak_kb": "Maximum resident set size (kbytes)"}


def parse_time_v(text: str) -> dict:
    """``user_s``, ``sys_s``, ``cpu_s`` (their sum), ``wall_s`` and ``peak_gb`` from ``/usr/bin/time -v``."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.strip().rpartition(": ")
        for key, label in _TIME_FIELDS.items():
            if name.startswith(label):
                if key == "wall_s":  # h:mm:ss or m:ss.ss
                    out[key] = sum(float(p) * 60**i for i, p in enumerate(reversed(value.split(":"))))
                else:
                    out[key] = float(value)
    missing = [k for k in _TIME_FIELDS if k not in out]
    if missing:
        raise ValueError(f"/usr/bin/time -v output lacks {missing}")
    out["cpu_s"] = round(out["user_s"] + out["sys_s"], 2)
    out["peak_gb"] = round(out.pop("peak_kb") / 1024**2, 4)
    return out


def run_timed(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v`` (report to a file, so the child's stderr cannot mix in)."""
    with tempfile.TemporaryDirectory(prefix="bench-time-") as tmp:
        report = Path(tmp) / "time.txt"
        try:
            proc = subprocess.run(["/usr/bin/time", "-v", "-o", str(report), *cmd], capture_output=True,
                                  text=True, cwd=REPO, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            return {"error": f"rc {proc.returncode}: {tail}"}
        return parse_time_v(report.read_text())


def whole_process_commands(model_name: str, folder: Path, length: int, out_dir: Path) -> dict[str, list[str]]:
    """The two commands of one pair (without the ``time -v`` prefix)."""
    bindir = Path(sys.executable).parent
    return {
        "reference": [sys.executable, str(REPO / "benchmarks" / "sdpa_forward_process.py"),
                      "--folder", str(folder), "--seq-len", str(length)],
        "workbench": [str(bindir / "workbench"), "analyze", "--model", model_name, "--dataset", "calibration",
                      "--seq-len", str(length), "--n", "1", "--mode", "stats", "--probes", "stats",
                      "--no-progress", "--out", str(out_dir / "run")],
    }


def check_ids(model_name: str, folder: Path, lengths: list[int]) -> None:
    """Fail unless the reference's ids equal ``workbench.load_dataset("calibration", ...)`` sample 0."""
    import workbench as wb

    model = wb.load_model(model_name)
    for n in lengths:
        batch = wb.load_dataset("calibration", model, n=1, seq_len=n)
        ours = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sdpa_forward_process.py"), "--folder",
                               str(folder), "--seq-len", str(n), "--print-ids"], capture_output=True, text=True,
                              check=True).stdout
        if batch.tokens[0][batch.mask[0]].tolist() != json.loads(ours):
            raise SystemExit(f"reference ids differ from workbench.load_dataset at seq_len {n}")
        print(f"# ids identical at {n} tokens", flush=True)


def whole_process(model_name: str, lengths: list[int], repeats: int, threads: int | None, timeout: float,
                  json_path: Path | None, verbose: bool) -> list[dict]:
    """Interleaved reference/workbench pairs per length; prints the median table, returns the raw rows."""
    folder = _folder(model_name)
    env = dict(os.environ)
    if threads:  # the same for both children
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    rows = []
    for n in lengths:
        for pair in range(repeats):
            with tempfile.TemporaryDirectory(prefix="bench-wp-") as tmp:
                for side, cmd in whole_process_commands(model_name, folder, n, Path(tmp)).items():
                    row = {"side": side, "length": n, "pair": pair, "load_avg_1min": os.getloadavg()[0],
                           "threads_env": env.get("OMP_NUM_THREADS"), **run_timed(cmd, env, timeout)}
                    rows.append(row)
                    if verbose:
                        print(json.dumps(row), flush=True)
                    if json_path:
                        with json_path.open("a") as fh:
                            fh.write(json.dumps(row) + "\n")
    print()
    print_whole_process_table(rows, lengths)
    return rows


def pair_table_lines(rows: list[dict], lengths: list[int], names: tuple[str, str] = ("ref", "wb")) -> list[str]:
    """Markdown lines of a pair table: per length, medians of the reference and workbench sides and
    medians of the per-pair workbench/reference ratios (CPU and wall), peak memory; the error rows
    of either side as notes below. ``rows``: ``{"side", "length", "pair", "cpu_s", ...}`` each;
    ``names``: the two sides' column labels."""
    ref, wb = names
    head = ["tokens", "pairs", f"{ref} CPU s", f"{wb} CPU s", "CPU ratio", f"{ref} wall s", f"{wb} wall s",
            "wall ratio", f"{ref} peak GB", f"{wb} peak GB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = [f"- {r['side']} @ {r['length']} pair {r['pair']}: {r['error']}" for r in rows if "error" in r]
    for n in lengths:
        by_pair: dict[int, dict] = {}
        for r in rows:
            if r["length"] == n and "error" not in r:
                by_pair.setdefault(r["pair"], {})[r["side"]] = r
        pairs = [p for p in by_pair.values() if len(p) == 2]
        if not pairs:
            lines.append(f"| {n} | 0 |" + " - |" * (len(head) - 2))
            continue

        def med(side, key):
            return statistics.median(p[side][key] for p in pairs)

        def ratio(key):
            return statistics.median(p["workbench"][key] / p["reference"][key] for p in pairs)

        cells = [str(n), str(len(pairs)), f"{med('reference', 'cpu_s'):.1f}", f"{med('workbench', 'cpu_s'):.1f}",
                 f"{ratio('cpu_s'):.2f}x", f"{med('reference', 'wall_s'):.1f}", f"{med('workbench', 'wall_s'):.1f}",
                 f"{ratio('wall_s'):.2f}x", f"{med('reference', 'peak_gb'):.2f}", f"{med('workbench', 'peak_gb'):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ([""] + notes if notes else [])


def print_whole_process_table(rows: list[dict], lengths: list[int]) -> str:
    """Markdown table of medians; ratios are medians of per-pair workbench/reference ratios."""
    text = "\n".join(pair_table_lines(rows, lengths))
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
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per configuration, best wall time kept (default 1); with --whole-process: "
                        "interleaved reference/workbench pairs per length, medians kept (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per configuration")
    parser.add_argument("--json", type=Path, default=None, help="also append every measurement here (JSON lines)")
    parser.add_argument("--table-from", type=Path, default=None,
                        help="print the table of a --json file (no runs) and exit")
    parser.add_argument("--whole-process", action="store_true",
                        help="time whole processes: plain-transformers reference vs `workbench analyze`")
    parser.add_argument("--check-ids", action="store_true",
                        help="with --whole-process: first verify both sides get the same token ids")
    parser.add_argument("--verbose", action="store_true", help="with --whole-process: print every run's row")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if args.whole_process:
        if args.table_from:
            rows = [json.loads(line) for line in args.table_from.read_text().splitlines() if line.strip()]
            print_whole_process_table(rows, sorted({r["length"] for r in rows}))
            return
        if args.check_ids:
            check_ids(args.model, _folder(args.model), lengths)
        print(f"# whole processes, {args.model} on {os.cpu_count()} CPU cores; lengths {lengths}", flush=True)
        whole_process(args.model, lengths, args.repeats or 3, args.threads, args.timeout, args.json, args.verbose)
        return
    args.repeats = args.repeats or 1
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
