"""Workbench process for the memory benchmark: load SmolLM2, capture one input in both modes, exit.

What one run of this process does (and so what ``/usr/bin/time -v`` around it measures): start
Python, ``workbench.load_model(MODEL)``, ``workbench.load_dataset("calibration", model, n=1,
seq_len=N)`` (default 256 tokens: the same ids as ``sdpa_forward_process.py --eager-attentions``),
then ``workbench.capture(model, batch, mode="patterns")`` followed by ``mode="stats"`` (default
options otherwise, progress bar off), both captures kept until exit; print one short JSON line.

Usage::

    python benchmarks/capture_both_modes_process.py --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import the checkout's packages
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)

    import workbench as wb

    model = wb.load_model(args.model)
    batch = wb.load_dataset("calibration", model, n=1, seq_len=args.seq_len)
    seconds, captures = {}, []
    for mode in ("patterns", "stats"):
        start = time.perf_counter()
        captures.append(wb.capture(model, batch, mode=mode, progress=False))
        seconds[mode] = round(time.perf_counter() - start, 3)
    print(json.dumps({"tokens": int(batch.tokens.shape[1]), "capture_s": seconds}), flush=True)


if __name__ == "__main__":
    main()
