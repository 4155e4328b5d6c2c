"""One attention layer on the CPU: the statistics strategies against a plain fused SDPA call.

For a SmolLM2-shaped layer (9 query heads, 3 KV heads, d = 64, causal, fp32) at each length, in one
process, ``--repeats`` interleaved rounds of

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (output only; the reference);
- ``sdpa_recompute``: ``attention_with_stats(..., backend="sdpa_recompute", received=True)``: the
  fused kernel for out + LSE, then the exact pass for every statistic and the received mass;
- ``row_pass``: the same outputs from ``backend="row_pass"`` (the CPU default).

CPU time (``time.process_time``, all threads) is the stable measure on a shared machine; the table
prints the median CPU seconds and the median per-round ratio to ``sdpa``::

    python benchmarks/bench_row_pass.py --lengths 2048,8192 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kernels import attention_with_stats


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 9, n, 64, generator=g), torch.randn(1, 3, n, 64, generator=g),
            torch.randn(1, 3, n, 64, generator=g))


def _cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; CPU s per layer, median of {args.repeats}")
    print("| tokens | sdpa | sdpa_recompute | row_pass | sdpa_recompute / sdpa | row_pass / sdpa |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.lengths.split(",")):
        q, k, v = _inputs(n)
        kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
        runs = {
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True),
            "sdpa_recompute": lambda: attention_with_stats(q, k, v, received=True, backend="sdpa_recompute"),
            "row_pass": lambda: attention_with_stats(q, k, v, received=True, backend="row_pass"),
        }
        for fn in runs.values():  # warm-up: builds the C loops, touches the allocator
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(_cpu_seconds(fn))
        med = {name: statistics.median(t) for name, t in times.items()}
        ratio = {name: statistics.median(a / b for a, b in zip(times[name], times["sdpa"])) for name in runs}
        print(f"| {n} | {med['sdpa']:.2f} | {med['sdpa_recompute']:.2f} | {med['row_pass']:.2f} | "
              f"{ratio['sdpa_recompute']:.2f}× | {ratio['row_pass']:.2f}× |")


if __name__ == "__main__":
    main()
