"""Benchmark: Triton stats forward vs torch SDPA (GPU only).

Times ``kernels.attention_with_stats(..., backend="triton")`` (output + LSE + all per-row
statistics in one pass) against ``torch.nn.functional.scaled_dot_product_attention`` (output
only), causal, bf16, and checks the Triton results against the chunked torch path at one size.

    python benchmarks/bench_triton_vs_sdpa.py                 # N = 4k, 8k, 16k, 32k
    python benchmarks/bench_triton_vs_sdpa.py --sizes 4096 8192 --heads 16 --kv-heads 4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import STAT_NAMES, attention_with_stats, received_mass  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _time_ms(fn, reps: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds, measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _inputs(n: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, n, dim, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, kv_heads, n, dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, kv_heads, n, dim, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def check_against_chunked(n: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> bool:
    """Triton vs chunked torch (fp32 math) at one size; prints the max errors."""
    q, k, v = _inputs(n, heads, kv_heads, dim, dtype, seed=1)
    tri = attention_with_stats(q, k, v, backend="triton")
    ref = attention_with_stats(q, k, v, backend="chunked")
    sd = _sdpa(q, k, v)
    out_tol = 2 * (sd.float() - ref.out.float()).abs().max().item() + 1e-3
    rows = [("out", (tri.out.float() - ref.out.float()).abs().max().item(), out_tol)]
    rows.append(("lse", (tri.lse - ref.lse).abs().max().item(), 1e-2))
    for name in STAT_NAMES:
        scale = 1.0 + ref.stats[name].abs().max().item()
        rows.append((name, (tri.stats[name] - ref.stats[name]).abs().max().item(), 2e-3 * scale))
    col_t, _ = received_mass(q, k, tri.lse, backend="triton")
    col_c, _ = received_mass(q, k, ref.lse, backend="chunked")
    rows.append(("received_mass", (col_t - col_c).abs().max().item(), 2e-3 * (1.0 + col_c.abs().max().item())))
    ok = True
    print(f"\ncorrectness at N={n} (Triton vs chunked torch; SDPA-vs-chunked out error sets the out tolerance)")
    for name, err, tol in rows:
        status = "ok" if err <= tol else "FAIL"
        ok &= err <= tol
        print(f"  {name:20s} max|err| {err:10.3e}  tol {tol:9.2e}  {status}")
    return ok


def _timing_row(n: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, reps: int) -> str:
    """One table row: SDPA, Triton stats and Triton received-mass times at ``n`` tokens."""
    q, k, v = _inputs(n, heads, kv_heads, dim, dtype)
    flops = 4.0 * n * n / 2 * dim * heads  # causal: half of QK^T and PV
    t_sdpa = _time_ms(lambda: _sdpa(q, k, v), reps)
    t_tri = _time_ms(lambda: attention_with_stats(q, k, v, backend="triton"), reps)
    lse = attention_with_stats(q, k, v, backend="triton").lse
    t_recv = _time_ms(lambda: received_mass(q, k, lse, backend="triton"), reps)
    return (f"{n:>7} {t_sdpa:9.2f} {t_tri:10.2f} {t_recv:9.2f} {flops / t_sdpa / 1e9:10.1f} "
            f"{flops / t_tri / 1e9:12.1f} {t_sdpa / t_tri:17.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--check-size", type=int, default=4096)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_triton_vs_sdpa.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to do.")
        return 2
    dtype = DTYPES[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}  "
          f"B=1 Hq={args.heads} Hkv={args.kv_heads} D={args.dim} causal")
    print("throughput ratio = SDPA time / Triton time (1.0 = as fast as SDPA; Triton also computes LSE + 9 stats)")
    header = (f"{'N':>7} {'sdpa ms':>9} {'triton ms':>10} {'recv ms':>9} {'sdpa TF/s':>10} {'triton TF/s':>12} "
              f"{'throughput ratio':>17}")
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        print(_timing_row(n, args.heads, args.kv_heads, args.dim, dtype, args.reps))
        torch.cuda.empty_cache()  # the row's inputs are gone with its frame
    ok = check_against_chunked(args.check_size, args.heads, args.kv_heads, args.dim, dtype)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
