"""Long-context head taxonomy benchmark: retrieval heads, block densities, streaming mass per length.

For each length (default 4k, 8k, 16k, 32k tokens) on SmolLM2-135M:

1. **Cost pairs** (``--repeats`` interleaved pairs, whole processes under ``/usr/bin/time -v``):
   - reference: ``benchmarks/sdpa_forward_process.py --seq-len N`` (import, load with plain
     transformers/SDPA, ONE forward with ``logits_to_keep=1``, exit; its input is the packed
     calibration text of the same length: a dense forward costs the same for any ids);
   - workbench: this script's ``--child`` on ONE needle sample (depth 50 %): import, load, build the
     sample, ``probes.analyze(..., probes="retrieval,sparsity", mode="stats")`` (the stats capture
     with the long-context rows: arg-max key, streaming mass, block-pooled mass and both scorers, for
     all 270 heads), write the results, exit.
   The table shows medians; ratios (CPU and wall) are medians of the per-pair ratios (the same
   table as ``bench_long_context.py --whole-process``: :func:`pair_table_lines`).
2. **Depth sweep**: one ``--child`` process over needles at ``--depths`` (default 10, 30, 50, 70,
   90 %), timed the same way; prints the heads with the highest mean retrieval score (95 % interval
   over the depths), the mean block density / streaming mass over all heads, the share of heads
   with ``streaming_mass > 0.95`` and the dataset KV-saliency share (docs/metrics.md §10).

Lengths past the model's 8192-token context run with ``beyond_context=True`` (RoPE extrapolation):
their cost is what it is, their scores describe a model outside its training range.

Usage::

    python benchmarks/bench_long_context_taxonomy.py --lengths 4096 --repeats 2 --json lc.jsonl
    python benchmarks/bench_long_context_taxonomy.py --lengths 16384,32768 --repeats 1 --json lc.jsonl
    python benchmarks/bench_long_context_taxonomy.py --table-from lc.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_long_context import _folder, pair_table_lines, run_timed  # noqa: E402

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


# ------------------------------------------------------------------ child: one analysis process
def child(model_name: str, length: int, depths: list[float], out: Path) -> None:
    """Load, build the needle samples, run the two probes in stats mode, write a JSON summary."""
    import time

    import numpy as np

    import workbench as wb
    from probes.base import mean_and_ci
    from probes.pipeline import analyze
    from workbench.data import datasets_dir
    from workbench.needle import generate_needles

    start = time.perf_counter()
    model = wb.load_model(model_name)
    batch = generate_needles(model, datasets_dir() / "calibration.txt", seq_len=length, depths=depths,
                             beyond_context=length > model.n_ctx)
    result = analyze(model, batch, probes="retrieval,sparsity", mode="stats", batch_size=1, progress=False)
    retrieval = result.probes["retrieval"].per_sample_["retrieval_score"]  # [S, L, H]
    mean, low, high = mean_and_ci(retrieval, bounds=(0.0, 1.0))
    order = np.argsort(-np.nan_to_num(mean, nan=-1).ravel())[:10]
    H = len(result.heads)
    sparsity = result.probes["sparsity"]
    summary = {
        "length": length, "depths": [m["depth"] for m in batch.meta], "beyond_context": length > model.n_ctx,
        "top_retrieval": [{"layer": result.layers[i // H], "head": result.heads[i % H], "mean": float(mean.ravel()[i]),
                           "ci_low": float(low.ravel()[i]), "ci_high": float(high.ravel()[i])} for i in order],
        "heads_retrieval_ge_0.5": int((np.nan_to_num(mean) >= 0.5).sum()),
        "mean": {m: float(np.nanmean(sparsity.mean_[m])) for m in sparsity.metrics_},
        "streaming_heads_gt_0.95": int((sparsity.mean_["streaming_mass"] > 0.95).sum()),
        "n_heads": int(mean.size),
        "kv_saliency": sparsity.kv_saliency_,
        "timings": result.timings, "inside_s": time.perf_counter() - start,
    }
    out.write_text(json.dumps(summary))


# ------------------------------------------------------------------ parent: timed processes
def _child_cmd(model_name: str, length: int, depths: list[float], out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model_name, "--length", str(length),
            "--depths", ",".join(map(str, depths)), "--child-out", str(out)]


def run(model_name: str, lengths: list[int], depths: list[float], repeats: int, timeout: float,
        json_path: Path | None, sweep: bool) -> list[dict]:
    folder = _folder(model_name)
    env = dict(os.environ)
    rows = []

    def keep(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if json_path:
            with json_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    for n in lengths:
        for pair in range(repeats):
            with tempfile.TemporaryDirectory(prefix="bench-lc-") as tmp:
                ref = [sys.executable, str(REPO / "benchmarks" / "sdpa_forward_process.py"), "--folder", str(folder),
                       "--seq-len", str(n)]
                keep({"kind": "pair", "side": "reference", "length": n, "pair": pair,
                      "load_avg_1min": os.getloadavg()[0], **run_timed(ref, env, timeout)})
                out = Path(tmp) / "child.json"
                timed = run_timed(_child_cmd(model_name, n, [0.5], out), env, timeout)
                keep({"kind": "pair", "side": "workbench", "length": n, "pair": pair,
                      "load_avg_1min": os.getloadavg()[0], **timed})
        if sweep:
            with tempfile.TemporaryDirectory(prefix="bench-lc-") as tmp:
                out = Path(tmp) / "child.json"
                timed = run_timed(_child_cmd(model_name, n, depths, out), env, timeout)
                summary = json.loads(out.read_text()) if out.exists() else {}
                keep({"kind": "sweep", "length": n, "load_avg_1min": os.getloadavg()[0], **timed, "summary": summary})
    print()
    print_tables(rows)
    return rows


def print_tables(rows: list[dict]) -> str:
    """Markdown tables: cost pairs (medians) and the depth sweeps."""
    pairs = [r for r in rows if r["kind"] == "pair"]
    lines = pair_table_lines(pairs, sorted({r["length"] for r in pairs}), names=("SDPA", "taxonomy"))
    notes = [f"- sweep @ {r['length']}: {r['error']}" for r in rows if r["kind"] == "sweep" and "error" in r]
    sweep_head = ["tokens", "depths", "wall s", "peak GB", "top retrieval heads (mean [95% CI over depths])",
                  "heads >= 0.5", "block_density_90", "block_density_95", "xattn_recall", "hess_recall",
                  "streaming_mass", "streaming heads > 0.95", "KV saliency 90%"]
    lines += ["", "| " + " | ".join(sweep_head) + " |", "|" + "---|" * len(sweep_head)]
    for r in sorted(rows, key=lambda r: r["length"]):
        s = r.get("summary")
        if r["kind"] != "sweep" or not s or "error" in r:
            continue
        top = ", ".join(f"L{t['layer']}H{t['head']} {t['mean']:.2f} [{t['ci_low']:.2f}, {t['ci_high']:.2f}]"
                        for t in s["top_retrieval"][:3])
        m = s["mean"]
        lines.append("| " + " | ".join([
            str(r["length"]) + (" (beyond context)" if s["beyond_context"] else ""), str(len(s["depths"])),
            f"{r['wall_s']:.0f}", f"{r['peak_gb']:.2f}", top, str(s["heads_retrieval_ge_0.5"]),
            f"{m['block_density_90']:.3f}", f"{m['block_density_95']:.3f}", f"{m['xattn_recall']:.3f}",
            f"{m['hess_recall']:.3f}", f"{m['streaming_mass']:.3f}", f"{s['streaming_heads_gt_0.95']}/{s['n_heads']}",
            f"{s['kv_saliency']['mean']:.3f}"]) + " |")
    text = "\n".join(lines + ([""] + notes if notes else []))
    print(text, flush=True)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default=",".join(map(str, DEFAULT_LENGTHS)))
    parser.add_argument("--depths", default=",".join(map(str, DEFAULT_DEPTHS)))
    parser.add_argument("--repeats", type=int, default=2, help="cost pairs per length")
    parser.add_argument("--no-sweep", action="store_true", help="cost pairs only")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per process")
    parser.add_argument("--json", type=Path, default=None, help="append every row to this JSONL file")
    parser.add_argument("--table-from", type=Path, default=None, help="reprint the tables of a JSONL file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    depths = [float(d) for d in args.depths.split(",")]
    if args.child:
        child(args.model, args.length, depths, args.child_out)
        return
    if args.table_from:
        print_tables([json.loads(line) for line in args.table_from.read_text().splitlines() if line.strip()])
        return
    lengths = [int(n) for n in args.lengths.split(",")]
    run(args.model, lengths, depths, args.repeats, args.timeout, args.json, not args.no_sweep)


if __name__ == "__main__":
    main()
