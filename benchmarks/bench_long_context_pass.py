"""Cost of the long-context second pass next to the stats capture's own attention call, per layer.

For SmolLM2-135M's attention shape (9 query heads, 3 KV heads, d = 64) on random q, k, v of one
sample at each length, the median over ``--repeats`` runs (after one warm-up) of

- ``stats``: ``kernels.attention_with_stats(..., received=True)`` (what every stats capture runs per layer);
- ``stats+rows``: the same call asked for the long-context rows in its own pass
  (``row_extras=RowExtras()``: arg-max, streaming mass, block-pooled mass from the row_pass loop),
  what a ``retrieval``/``sparsity`` capture runs per layer on the CPU;
- ``pass``: ``kernels.long_context.block_pass`` with the saved LSE (the same rows in a second pass:
  what the other backends need, and what row_pass captures ran before the rows moved into its loop);
- ``scorers``: ``workbench.long_context.block_metrics`` (both block scorers, densities, recalls).

The ratio columns divide by ``stats`` measured in the same run: ``rows extra`` is what asking for
the rows adds to the pass, next to what the second pass costs. CPU time (``time.process_time``)
is printed next to wall time: on a shared machine it is the steadier number.

Usage::

    python benchmarks/bench_long_context_pass.py --lengths 2048,4096 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> None:
    import torch

    from kernels import attention_with_stats
    from kernels.long_context import RowExtras, block_pass
    from workbench.long_context import LongContextSettings, block_metrics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        torch.manual_seed(0)
        q, k, v = torch.randn(1, 9, n, 64), torch.randn(1, 3, n, 64), torch.randn(1, 3, n, 64)
        lse = attention_with_stats(q, k, v, received=True).lse[0]
        mass = block_pass(q[0], k[0], lse).block_mass
        jobs = {
            "stats": lambda: attention_with_stats(q, k, v, received=True),
            "stats+rows": lambda: attention_with_stats(q, k, v, received=True, row_extras=RowExtras()),
            "pass": lambda: block_pass(q[0], k[0], lse),
            "scorers": lambda: block_metrics(mass, q[0], k[0], causal=True, scale=64 ** -0.5,
                                             settings=LongContextSettings()),
        }
        times = {name: [] for name in jobs}
        for name, fn in jobs.items():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in jobs.items():  # interleaved, so a load swing hits all three
                times[name].append(_timed(fn))
        med = {name: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
               for name, ts in times.items()}
        rows.append((n, med))
    head = ["tokens", "stats CPU s", "stats+rows CPU s", "pass CPU s", "scorers CPU s", "rows extra / stats (CPU)",
            "pass / stats (CPU)", "scorers / stats (CPU)", "stats wall s", "stats+rows wall s", "pass wall s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for n, m in rows:
        base = m["stats"][1]
        print(f"| {n} | {base:.2f} | {m['stats+rows'][1]:.2f} | {m['pass'][1]:.2f} | {m['scorers'][1]:.2f} | "
              f"{(m['stats+rows'][1] - base) / base:.2f}x | {m['pass'][1] / base:.2f}x | {m['scorers'][1] / base:.2f}x | "
              f"{m['stats'][0]:.2f} | {m['stats+rows'][0]:.2f} | {m['pass'][0]:.2f} |")
    print(f"\nrepeats: {args.repeats}, torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
