"""Training tasks: thin. Claim the run in the database, execute it in ``backend``, then wake
whatever is due next (a follow-up run, batch re-prediction after a promotion).

A message carries only a run id. Redelivered or duplicated messages are no-ops because the
claim is a compare-and-set on the run's status; see :mod:`backend.services.training.queue`.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Celery, Task, shared_task

from backend.db.base import utcnow
from backend.db.session import unit_of_work
from backend.services.reconciliation import reconcile_stored_project
from backend.services.training import execute, queue
from workers.celery_app import runtime_of
from workers.names import TASK_PREDICT_PROJECT, TASK_TRAIN

log = logging.getLogger(__name__)


def worker_name(task: Task) -> str:
    hostname = getattr(task.request, "hostname", None) or socket.gethostname()
    return f"{hostname} pid {os.getpid()}"


def send_run(task_app: Celery, run_id: int) -> None:
    """Hand a queued run to the broker and record when (the outbox's send side)."""
    rt = runtime_of(task_app)
    task_app.send_task(TASK_TRAIN, args=[run_id])
    with unit_of_work(rt.factory) as session:
        queue.mark_dispatched(session, run_id, now=utcnow())


@shared_task(name=TASK_TRAIN, bind=True, acks_late=True, ignore_result=False)
def train_run(self: Task, run_id: int) -> dict[str, Any]:
    """Execute training run ``run_id`` if it is still queued and due; otherwise do nothing."""
    rt = runtime_of(self.app)
    with unit_of_work(rt.factory) as session:
        claimed = queue.claim_run(session, run_id, worker=worker_name(self), task_id=self.request.id)
    if claimed is None:
        log.info("run %s: not claimable (already taken, finished or not due yet); nothing to do", run_id)
        return {"run_id": run_id, "status": "skipped"}

    def progress(state: dict[str, Any]) -> None:
        if self.request.id:
            self.update_state(state="PROGRESS", meta={"run_id": run_id, **state})

    reconcile = None
    if rt.mirror.fetcher.client is not None:  # Label Studio configured: pull missed labels first

        def reconcile(project_id: int) -> None:
            reconcile_stored_project(rt.mirror, project_id)

    outcome = execute.execute_run(rt.factory, rt.store, rt.settings, claimed, on_progress=progress, reconcile=reconcile)
    if outcome.follow_up_run_id is not None:
        run_due_now(self.app, outcome.follow_up_run_id)
    if outcome.promoted and rt.settings.repredict_after_promotion and outcome.model_version_uid:
        self.app.send_task(TASK_PREDICT_PROJECT, args=[claimed.project_id, outcome.model_version_uid])
    return outcome.to_json()


def run_due_now(task_app: Celery, run_id: int) -> None:
    """Send a run whose deadline has already passed; a debounced one waits for the dispatcher."""
    from backend.db.models import TrainingRun

    rt = runtime_of(task_app)
    with unit_of_work(rt.factory) as session:
        run = session.get(TrainingRun, run_id)
        due = run is not None and run.status == "queued" and (run.not_before is None or run.not_before <= utcnow())
    if due:
        send_run(task_app, run_id)
