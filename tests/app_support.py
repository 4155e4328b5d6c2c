"""Shared pieces of the app-service tests (their ``ws`` and ``analysis`` fixtures are in conftest.py)."""

from __future__ import annotations

from app.web.services.workspace import Workspace

PROMPT = "When Mary and John went to the store, John gave a drink to"


def run_job(ws: Workspace, job_id: str, timeout: float = 300.0):
    """Wait for a job and return its result (the job must finish as "done")."""
    status = ws.jobs.wait(job_id, timeout)
    assert status["state"] == "done", status
    return ws.jobs.result(job_id)
