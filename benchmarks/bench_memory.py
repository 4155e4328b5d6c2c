"""Whole-process peak memory: a plain transformers process returning attention patterns vs the workbench.

Two processes, each run as its own ``/usr/bin/time -v`` child, ``--repeats`` interleaved pairs
(default 3), same environment for both:

- reference: ``python benchmarks/sdpa_forward_process.py --folder F --eager-attentions --seq-len N``
  (plain transformers, ``attn_implementation="eager"``, one forward with ``output_attentions=True``,
  ``logits_to_keep=1``: every layer's fp32 ``[1, H, N, N]`` pattern is returned);
- workbench: ``python benchmarks/capture_both_modes_process.py --seq-len N`` (``workbench.load_model``,
  the same calibration ids, ``workbench.capture`` in ``mode="patterns"`` then ``mode="stats"``).

Measured from ``time -v``: "Maximum resident set size" (peak RSS of the whole process: interpreter,
imports, weights, forward), and CPU s (user + sys) and wall for context. The table gives medians
over the pairs; the ratios are medians of the per-pair workbench/reference ratios. N defaults to 256.

Usage::

    python benchmarks/bench_memory.py                      # 256 tokens, 3 pairs
    python benchmarks/bench_memory.py --seq-len 512 --repeats 1 --verbose --json mem.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from bench_long_context import REPO, _folder, run_timed


def commands(model_name: str, folder: Path, length: int) -> dict[str, list[str]]:
    bench = REPO / "benchmarks"
    return {
        "reference": [sys.executable, str(bench / "sdpa_forward_process.py"), "--folder", str(folder),
                      "--eager-attentions", "--seq-len", str(length)],
        "workbench": [sys.executable, str(bench / "capture_both_modes_process.py"), "--model", model_name,
                      "--seq-len", str(length)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved reference/workbench pairs")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--json", type=Path, default=None, help="append every run's row here (JSON lines)")
    parser.add_argument("--verbose", action="store_true", help="print every run's row")
    args = parser.parse_args(argv)
    cmds = commands(args.model, _folder(args.model), args.seq_len)
    print(f"# peak RSS, {args.model}, {args.seq_len} tokens, {args.repeats} pairs on {os.cpu_count()} CPU cores",
          flush=True)
    rows = []
    for pair in range(args.repeats):
        for side, cmd in cmds.items():
            row = {"side": side, "length": args.seq_len, "pair": pair, **run_timed(cmd, timeout=args.timeout)}
            rows.append(row)
            if args.verbose:
                print(json.dumps(row), flush=True)
            if args.json:
                with args.json.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    for r in rows:
        if "error" in r:
            print(f"- {r['side']} pair {r['pair']}: {r['error']}")
    pairs = [(a, b) for a, b in zip(rows[::2], rows[1::2]) if "error" not in a and "error" not in b]
    if not pairs:
        raise SystemExit("no complete pair")
    print(f"\n| process ({args.seq_len} tokens, {len(pairs)} pairs) | peak RSS GB | CPU s | wall s |")
    print("|---|---|---|---|")
    for i, name in enumerate(("reference: transformers eager + output_attentions",
                              "workbench: capture patterns, then stats")):
        cells = [f"{statistics.median(p[i][k] for p in pairs):.{d}f}" for k, d in
                 (("peak_gb", 2), ("cpu_s", 1), ("wall_s", 1))]
        print(f"| {name} | " + " | ".join(cells) + " |")
    ratios = [f"{statistics.median(p[1][k] / p[0][k] for p in pairs):.2f}x" for k in ("peak_gb", "cpu_s", "wall_s")]
    print("| ratio workbench/reference | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
