"""Housekeeping tasks (beat-driven, light, idempotent): the outbox dispatcher, the stale-run
reaper, the webhook drain with a retrain-policy sweep, and the nightly retrain.

The database is the truth and these tasks only move it forward; running any of them twice, or
in two workers at once, changes nothing more than running it once.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import Task, shared_task
from sqlalchemy import select

from backend.db.base import utcnow
from backend.db.models import TrainingRun
from backend.db.session import unit_of_work
from backend.services import scheduler
from backend.services.training import execute, queue, requests
from backend.services.webhooks import process_pending_events
from workers.celery_app import runtime_of
from workers.names import (
    TASK_DISPATCH,
    TASK_DRAIN_WEBHOOKS,
    TASK_REAP,
    TASK_SCHEDULED_RETRAIN,
    TASK_SCORE_NEW_IMAGES,
    TASK_SCORE_PROJECT,
)
from workers.schedules import HOUSEKEEPING_PERIOD_SECONDS
from workers.tasks.training import send_run

log = logging.getLogger(__name__)


@shared_task(name=TASK_DISPATCH, bind=True, acks_late=True, ignore_result=True)
def dispatch_due_runs(self: Task) -> list[int]:
    """Apply the retrain policy to idle projects, then send every queued run whose debounce has
    passed and that was not sent recently.

    A message lost between commit and send, or with a broker that dies with an unacknowledged
    message (the embedded SQLite transport), is re-sent after ``train_stale_after_seconds``.

    Each tick first records the scheduler heartbeat (its own transaction, so a failing sweep
    cannot hide a live scheduler): ``sonoseg status``, ``/health`` and workers read it.
    """
    rt = runtime_of(self.app)
    host, pid = sender_identity(getattr(self.request, "origin", None))
    with unit_of_work(rt.factory) as session:
        scheduler.record_heartbeat(session, host=host, pid=pid, now=utcnow())
    with unit_of_work(rt.factory) as session:
        requests.sweep_retrain_policy(session, rt.settings)
    with unit_of_work(rt.factory) as session:
        due = queue.runs_to_dispatch(
            session, now=utcnow(), redispatch_after_seconds=rt.settings.train_stale_after_seconds
        )
    for run_id in due:
        send_run(self.app, run_id)
        log.info("run %s dispatched to the train queue", run_id)
    return due


def sender_identity(origin: str | None) -> tuple[str, int | None]:
    """(host, pid) of the process that sent a message: Celery's ``origin`` header is
    ``gen<pid>@<host>`` for a non-worker sender such as beat; else this worker's own."""
    if origin and "@" in origin:
        node, _, host = origin.partition("@")
        if node.startswith("gen") and node[3:].isdigit() and host:
            return host, int(node[3:])
    return socket.gethostname(), os.getpid()


@shared_task(name=TASK_REAP, bind=True, acks_late=True, ignore_result=True)
def reap_stale_runs(self: Task) -> list[dict[str, Any]]:
    """Re-queue or fail runs whose worker stopped heartbeating; re-queued ones go out at once."""
    rt = runtime_of(self.app)
    settings = rt.settings
    with unit_of_work(rt.factory) as session:
        reaped = queue.reap_stale_runs(
            session,
            now=utcnow(),
            stale_after_seconds=settings.train_stale_after_seconds,
            max_attempts=settings.train_max_attempts,
        )
        running = set(session.scalars(select(TrainingRun.id).where(TrainingRun.status == "running")))
    for path in execute.sweep_run_dirs(settings, running):
        log.info("removed scratch files of a run that is not running: %s", path)
    for item in reaped:
        if item.requeued:
            send_run(self.app, item.run_id)
    return [{"run_id": r.run_id, "requeued": r.requeued, "message": r.message} for r in reaped]


@shared_task(name=TASK_DRAIN_WEBHOOKS, bind=True, acks_late=True, ignore_result=True)
def drain_webhook_events(self: Task) -> dict[str, int]:
    """Apply webhook events the server recorded but has not processed yet, then sweep the policy."""
    rt = runtime_of(self.app)
    report = process_pending_events(rt.mirror, rt.settings)
    with unit_of_work(rt.factory) as session:
        queued = requests.sweep_retrain_policy(session, rt.settings)
    if report.total or queued:
        log.info(
            "webhook drain: %d processed, %d ignored, %d failed; %d run(s) queued",
            report.processed,
            report.ignored,
            report.failed,
            len(queued),
        )
    return {
        "processed": report.processed,
        "ignored": report.ignored,
        "failed": report.failed,
        "runs_queued": len(queued),
    }


@shared_task(name=TASK_SCHEDULED_RETRAIN, bind=True, acks_late=True, ignore_result=True)
def scheduled_retrain(self: Task) -> list[int]:
    """The nightly run for every automatic project whose labels changed; sent at once."""
    rt = runtime_of(self.app)
    with unit_of_work(rt.factory) as session:
        queued = requests.request_scheduled_all(session, rt.settings)
    for run_id in queued:
        send_run(self.app, run_id)
    log.info("scheduled retrain: %d project(s) queued", len(queued))
    return queued


@shared_task(name=TASK_SCORE_NEW_IMAGES, bind=True, acks_late=True, ignore_result=True)
def score_new_images(self: Task) -> list[int]:
    """Hand each project whose serving model has unscored pool images to the ``predict`` queue
    (frames imported, pushed or first seen in Label Studio since the last promotion)."""
    from backend.services.scores import projects_awaiting_scores

    rt = runtime_of(self.app)
    with unit_of_work(rt.factory) as session:
        waiting = projects_awaiting_scores(session)
    for project_id in waiting:
        self.app.send_task(TASK_SCORE_PROJECT, args=(project_id,), expires=2 * HOUSEKEEPING_PERIOD_SECONDS)
    return waiting
