"""A small in-process job manager: long work runs off the request thread.

The app submits a function ``fn(ctx) -> result`` and hands the job id to the browser (a
``dcc.Store``); a ``dcc.Interval`` polls :meth:`JobManager.status`; the Cancel button calls
:meth:`JobManager.cancel`, which sets a flag the job checks between steps
(:meth:`JobContext.check`). A job publishes its result only by returning it, so a cancelled
or failed job leaves the app's caches untouched. Everything lives in this process, so the
model is loaded once and shared (forwards are serialised by ``model.lock``).

Jobs that run the model (``uses_model=True``, the default) take turns in submission order: a
job whose turn has not come says "waiting for the model (another job is running): position N
in the queue" and can be cancelled there at once. A cancel asked of a running job shows
"cancelling…" until the job reaches its next check (every attention call of every forward, and
the probes' own long loops); progress reports never overwrite it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from workbench.errors import InputError, WorkbenchError
from workbench.progress import Cancelled, Progress, reporting

JobState = Literal["queued", "waiting", "running", "cancelling", "done", "error", "cancelled"]
FINISHED: tuple[JobState, ...] = ("done", "error", "cancelled")
WAIT_POLL_S = 0.1  # how often a job waiting for the model checks its turn and Cancel
log = logging.getLogger(__name__)


@dataclass
class Job:
    """One submitted job and what the UI shows about it."""

    id: str
    kind: str
    state: JobState = "queued"
    progress: float = 0.0
    message: str = "queued"
    error: str | None = None
    result: Any = None
    started: float = field(default_factory=time.time)
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    uses_model: bool = True

    def snapshot(self, position: int | None = None) -> dict:
        """JSON-able status for the browser (no result payload).

        ``position``: the job's place in the model queue (1 = next), when it waits for its turn.
        """
        state, message = self.state, self.message
        if state not in FINISHED and self.cancel_flag.is_set():
            state, message = "cancelling", "cancelling… (stops at the next check)"
        elif state in ("queued", "waiting") and position is not None:
            state = "waiting"
            message = f"waiting for the model (another job is running): position {position} in the queue"
        return {"id": self.id, "kind": self.kind, "state": state, "progress": round(self.progress, 3),
                "message": message, "error": self.error, "elapsed_s": round(time.time() - self.started, 1),
                "position": position}


class JobContext:
    """What a running job sees: progress reporting and the cancellation check."""

    def __init__(self, job: Job) -> None:
        self._job = job

    def progress(self, fraction: float, message: str) -> None:
        """Report ``fraction`` in [0, 1] done and a short message; also a cancellation point."""
        self.check()
        self._job.progress = min(max(float(fraction), 0.0), 1.0)
        self._job.message = message

    def note(self, message: str) -> None:
        """Sub-progress inside the current step (the fraction stays); also a cancellation point."""
        self.check()
        self._job.message = message

    def check(self) -> None:
        """Raise :class:`Cancelled` when the user pressed Cancel (call between steps)."""
        if self._job.cancel_flag.is_set():
            raise Cancelled()

    @property
    def cancelled(self) -> bool:
        return self._job.cancel_flag.is_set()


class JobManager:
    """A thread pool, a bounded table of jobs (oldest finished jobs are forgotten) and the
    first-come-first-served queue of jobs that run the model."""

    def __init__(self, max_workers: int = 2, keep: int = 64) -> None:
        # jobs waiting for their model turn sit in a worker, so keep workers for the rest
        self._pool = ThreadPoolExecutor(max_workers=max_workers + 2, thread_name_prefix="workbench-job")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._keep = keep
        self._model_queue: list[str] = []  # ids of model jobs, the one holding the model first
        self._turn = threading.Condition(self._lock)

    def submit(self, kind: str, fn: Callable[[JobContext], Any], *, uses_model: bool = True) -> str:
        """Queue ``fn(ctx)``; returns the job id (unguessable, so only its session knows it).

        ``uses_model``: the job runs the model, so it waits for the jobs submitted before it
        (a tokenizer-only job, such as loading an example, does not).
        """
        job = Job(id=uuid.uuid4().hex, kind=kind, uses_model=uses_model)
        with self._lock:
            self._jobs[job.id] = job
            if uses_model:
                self._model_queue.append(job.id)
            self._forget_old()
        self._pool.submit(self._run, job, fn)
        return job.id

    def _position(self, job: Job) -> int | None:
        """1-based place among the jobs waiting for the model; None when running or not queued (lock held)."""
        if job.id not in self._model_queue:
            return None
        index = self._model_queue.index(job.id)
        return index if index > 0 else None

    def _wait_turn(self, job: Job) -> None:
        """Block until ``job`` is first in the model queue, or raise :class:`Cancelled`."""
        with self._turn:
            while self._model_queue and self._model_queue[0] != job.id:
                if job.cancel_flag.is_set():
                    raise Cancelled()
                job.state = "waiting"
                self._turn.wait(WAIT_POLL_S)
            if job.cancel_flag.is_set():
                raise Cancelled()

    def _release_turn(self, job: Job) -> None:
        with self._turn:
            if job.id in self._model_queue:
                self._model_queue.remove(job.id)
            self._turn.notify_all()

    def _run(self, job: Job, fn: Callable[[JobContext], Any]) -> None:
        try:
            if job.cancel_flag.is_set():
                job.state, job.message = "cancelled", "cancelled before it started"
                return
            try:
                if job.uses_model:
                    self._wait_turn(job)
            except Cancelled:
                job.state, job.message = "cancelled", "cancelled while waiting: nothing was run"
                return
            job.state, job.message, job.started = "running", "started", time.time()
            self._execute(job, fn)
        finally:
            self._release_turn(job)

    def _execute(self, job: Job, fn: Callable[[JobContext], Any]) -> None:
        ctx = JobContext(job)
        # every forward of the job checks Cancel at each attention call, and sub-progress of long
        # loops (workbench.progress.Estimate) shows in the job's message
        tracker = Progress(lambda _fraction, message: ctx.note(message), cancel=job.cancel_flag.is_set)
        try:
            with reporting(tracker):
                result = fn(ctx)
        except Cancelled:
            job.state, job.message = "cancelled", "cancelled: nothing was changed"
        except WorkbenchError as err:
            job.state, job.error, job.message = "error", str(err), "failed"
        except Exception as err:  # a bug must not kill the worker; the page shows one line
            log.exception("job %s (%s) failed", job.id, job.kind)
            job.state, job.message = "error", "failed"
            job.error = f"internal error ({type(err).__name__}: {str(err)[:300]}); see the server log"
        else:
            job.result, job.progress, job.state, job.message = result, 1.0, "done", "done"

    def _forget_old(self) -> None:
        while len(self._jobs) > self._keep:
            oldest = next((k for k, j in self._jobs.items() if j.state in FINISHED), None)
            if oldest is None:
                return
            del self._jobs[oldest]

    def _get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise InputError("unknown or expired job: start it again")
        return job

    def status(self, job_id: str) -> dict:
        """The job's JSON-able status (see :meth:`Job.snapshot`), with its place in the model queue."""
        job = self._get(job_id)
        with self._lock:
            position = self._position(job) if job.state not in FINISHED else None
        return job.snapshot(position)

    def result(self, job_id: str) -> Any:
        """The return value of a finished job.

        Raises:
            InputError: unknown job, or not finished successfully.
        """
        job = self._get(job_id)
        if job.state != "done":
            raise InputError(f"job is {job.state}, it has no result: {job.error or 'run it again'}")
        return job.result

    def cancel(self, job_id: str) -> bool:
        """Ask a job to stop at its next check; True if it was still queued or running."""
        job = self._get(job_id)
        if job.state in FINISHED:
            return False
        job.cancel_flag.set()
        with self._turn:
            if job.state in ("queued", "waiting") and job.id in self._model_queue:
                self._model_queue.remove(job.id)  # a job that never started blocks nobody
            self._turn.notify_all()
        return True

    def wait(self, job_id: str, timeout: float = 60.0) -> dict:
        """Block until the job finishes (tests and scripts); returns its status."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status(job_id)
            if status["state"] in FINISHED:
                return status
            time.sleep(0.02)
        raise TimeoutError(f"job {job_id} still {self.status(job_id)['state']} after {timeout} s")

    def shutdown(self) -> None:
        """Cancel everything and stop the workers."""
        with self._lock:
            for job in self._jobs.values():
                job.cancel_flag.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
