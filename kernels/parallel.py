"""Block-level parallelism for the chunked torch path on the CPU.

Many small intra-op parallel regions (one per torch op) stall whenever a core is busy elsewhere:
each op waits at an OpenMP barrier for its slowest thread. Instead the chunked path runs whole
query blocks on a thread pool, with torch's intra-op threads set to 1 while any such pool runs
(torch ops release the GIL, so the workers run concurrently). Results are written to disjoint
slices, so they do not depend on scheduling.

``torch.set_num_threads`` is process-wide, so concurrent callers (two app jobs) share one
reference-counted setting under a lock: the first caller saves the thread count, the last one
restores it, and no caller ever writes back another's temporary 1.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

SCRATCH_BUDGET_BYTES = 512 * 2**20
"""Cap on the per-worker scratch memory (logits tiles and the worker's copy of V_aug)."""


def worker_count(device: torch.device, n_tasks: int, scratch_bytes: int) -> int:
    """Workers for ``n_tasks`` blocks: torch's thread count on the CPU, 1 on other devices."""
    if device.type != "cpu" or n_tasks <= 1:
        return 1
    by_memory = max(1, SCRATCH_BUDGET_BYTES // max(1, scratch_bytes))
    return max(1, min(torch.get_num_threads(), n_tasks, by_memory))


_THREADS_LOCK = threading.Lock()
_users = 0
_saved_threads = 1


@contextlib.contextmanager
def single_intra_op_thread() -> Iterator[None]:
    """torch's intra-op threads at 1 while any caller is inside; restored when the last one leaves."""
    global _users, _saved_threads
    with _THREADS_LOCK:
        if _users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _users += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _users -= 1
            if _users == 0:
                torch.set_num_threads(_saved_threads)


def run_blocks(fn: Callable[[T], None], items: Sequence[T], workers: int) -> None:
    """Call ``fn(item)`` for every item, on ``workers`` threads when ``workers > 1``."""
    if workers <= 1:
        for item in items:
            fn(item)
        return
    with single_intra_op_thread():
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kernels")
        try:
            for _ in pool.map(fn, items):  # re-raises the first worker exception
                pass
        except BaseException:  # an error or Ctrl+C: drop the queued blocks, wait only for the running ones
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
