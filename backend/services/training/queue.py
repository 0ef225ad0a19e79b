"""The life of a queued run: the outbox, claiming, heartbeating, reaping and finishing.

A run row is the truth; Celery messages only wake workers (the outbox): the dispatcher sends
due queued runs, a worker claims one by compare-and-set (so a duplicate message is a no-op),
heartbeats while it trains, and finishes it in a transaction that first checks it still owns the
run. A run whose worker died stops heartbeating; :func:`reap_stale_runs` re-queues it (up to
``train_max_attempts``) or marks it failed. When a run ends, :func:`finish_run` starts whatever
is due next (a pending request, or the retrain policy taken again).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.db.base import json_safe, utcnow
from backend.db.models import Project, TrainingRun
from backend.db.session import SessionFactory, unit_of_work
from backend.services.training.requests import maybe_request_retrain, request_training
from backend.settings import Settings

log = logging.getLogger(__name__)

ERROR_TEXT_LIMIT = 4000


# -- outbox: dispatch and reap -----------------------------------------------------------------
def runs_to_dispatch(session: Session, *, now: dt.datetime, redispatch_after_seconds: float) -> list[int]:
    """Queued runs that are due and were never sent, or were sent long enough ago that the
    message may be lost (a claimed run is no longer 'queued', so this cannot start it twice)."""
    resend_before = now - dt.timedelta(seconds=redispatch_after_seconds)
    rows = session.scalars(
        select(TrainingRun.id)
        .where(
            TrainingRun.status == "queued",
            (TrainingRun.not_before.is_(None)) | (TrainingRun.not_before <= now),
            (TrainingRun.dispatched_at.is_(None)) | (TrainingRun.dispatched_at <= resend_before),
        )
        .order_by(TrainingRun.id)
    )
    return list(rows)


def mark_dispatched(session: Session, run_id: int, *, now: dt.datetime) -> None:
    session.execute(
        update(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.status == "queued").values(dispatched_at=now)
    )


@dataclass(frozen=True)
class Reaped:
    run_id: int
    project_id: int
    requeued: bool
    message: str


def reap_stale_runs(
    session: Session, *, now: dt.datetime, stale_after_seconds: float, max_attempts: int
) -> list[Reaped]:
    """Runs marked running whose heartbeat stopped: re-queue (attempts left) or fail them.

    A worker killed mid-run (kill -9, OOM killer, power loss) can neither finish its run nor
    tell anyone; its heartbeat is the only witness. The serving model is untouched either way.
    """
    cutoff = now - dt.timedelta(seconds=stale_after_seconds)
    stale = session.scalars(
        select(TrainingRun)
        .where(TrainingRun.status == "running")
        .where(
            ((TrainingRun.heartbeat_at.is_not(None)) & (TrainingRun.heartbeat_at < cutoff))
            | ((TrainingRun.heartbeat_at.is_(None)) & (TrainingRun.started_at < cutoff))
        )
        .with_for_update()
    ).all()
    reaped: list[Reaped] = []
    for run in stale:
        last = run.heartbeat_at or run.started_at
        lost = (
            f"attempt {run.attempts} lost its worker {run.worker or '?'}: no heartbeat since "
            f"{last.isoformat(timespec='seconds') if last else 'start'}"
        )
        if run.attempts < max_attempts:
            run.status = "queued"
            run.not_before = now
            run.dispatched_at = None
            run.celery_task_id = None
            run.error = f"{lost}; retrying"
            run.progress = {"phase": "queued", "retry_of_attempt": run.attempts}
            reaped.append(Reaped(run.id, run.project_id, True, run.error))
            log.warning("run %s: %s; re-queued", run.id, lost)
        else:
            finish_run(session, run, "failed", error=f"{lost}; giving up after {run.attempts} attempt(s)", now=now)
            reaped.append(Reaped(run.id, run.project_id, False, run.error or lost))
    session.flush()
    return reaped


# -- claiming and finishing ----------------------------------------------------------------------
@dataclass(frozen=True)
class ClaimedRun:
    """The identity of a run this worker owns: ``attempt`` is the claim token checked on every
    heartbeat and before registering, so a run re-queued behind a slow worker's back is never
    finished twice."""

    run_id: int
    project_id: int
    attempt: int
    trigger: str
    from_scratch: bool


def claim_run(
    session: Session, run_id: int, *, worker: str, task_id: str | None, now: dt.datetime | None = None
) -> ClaimedRun | None:
    """queued -> running, once. None when the run is gone, not queued (a duplicate or redelivered
    message: another worker has it or it is over) or not due yet (debounce extended)."""
    now = now or utcnow()
    run = session.get(TrainingRun, run_id, with_for_update=True)
    if run is None or run.status != "queued":
        return None
    if run.not_before is not None and run.not_before > now:
        return None
    run.status = "running"
    run.attempts = (run.attempts or 0) + 1
    run.started_at = now
    run.heartbeat_at = now
    run.worker = worker[:200]
    run.celery_task_id = task_id
    run.progress = {"phase": "starting", "attempt": run.attempts}
    session.flush()
    log.info(
        "run %s (project %s, %s) claimed by %s, attempt %d", run.id, run.project_id, run.trigger, worker, run.attempts
    )
    return ClaimedRun(run.id, run.project_id, run.attempts, run.trigger, bool(run.from_scratch))


def owned_run(session: Session, claimed: ClaimedRun) -> TrainingRun | None:
    """The run row, locked, if this claim still owns it (running, same attempt)."""
    run = session.get(TrainingRun, claimed.run_id, with_for_update=True)
    if run is None or run.status != "running" or run.attempts != claimed.attempt:
        return None
    return run


def finish_run(
    session: Session,
    run: TrainingRun,
    status: str,
    *,
    error: str | None = None,
    model_version_id: int | None = None,
    settings: Settings | None = None,
    now: dt.datetime | None = None,
) -> TrainingRun | None:
    """End ``run`` (succeeded/failed/cancelled) and start what is due next; returns that run.

    A pending request (``project.retrain_pending``) becomes a 'manual' run at once; otherwise,
    given ``settings``, the annotation count is taken again against the newest snapshot.
    """
    now = now or utcnow()
    run.status = status
    run.finished_at = now
    run.error = error[:ERROR_TEXT_LIMIT] if error else None
    if model_version_id is not None:
        run.model_version_id = model_version_id
    run.progress = {**(run.progress or {}), "phase": status}
    session.flush()  # frees the project's single active-run slot
    log.info("run %s %s%s", run.id, status, f": {error}" if error else "")
    project = session.get(Project, run.project_id)
    if project is None:
        return None
    if project.retrain_pending:
        project.retrain_pending = False
        session.flush()
        follow_up = request_training(session, project, "manual", now=now)
        if follow_up is not None:
            follow_up.progress = {"phase": "queued", "follow_up_of": run.id}
        return follow_up
    if settings is not None and status == "succeeded":
        return maybe_request_retrain(session, project, settings, now=now)
    return None


# -- heartbeat: keeping the claim alive ---------------------------------------------------------
class Heartbeat:
    """Keeps ``training_run.heartbeat_at`` fresh from a background thread while a run executes,
    writing the latest progress with it; notices when the claim was lost.

    A thread rather than a per-epoch write: one CPU epoch can take minutes, longer than the
    stale-run cutoff. Every write is conditional on the claim (status running, same attempt).
    """

    def __init__(self, factory: SessionFactory, claimed: ClaimedRun, interval_seconds: float) -> None:
        self._factory = factory
        self._claimed = claimed
        self._interval = max(0.2, interval_seconds)
        self._progress: dict[str, Any] = {"phase": "starting", "attempt": claimed.attempt}
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-run-{claimed.run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def report(self, **progress: Any) -> None:
        with self._lock:
            self._progress = {**self._progress, **progress}

    @property
    def progress(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._progress)

    def lost(self) -> bool:
        return self._lost.is_set()

    def beat(self) -> bool:
        """One conditional write; False (and :meth:`lost` from then on) when the claim is gone."""
        try:
            with unit_of_work(self._factory) as session:
                result = session.execute(
                    update(TrainingRun)
                    .where(
                        TrainingRun.id == self._claimed.run_id,
                        TrainingRun.status == "running",
                        TrainingRun.attempts == self._claimed.attempt,
                    )
                    .values(heartbeat_at=utcnow(), progress=json_safe(self.progress))
                )
                owned = bool(result.rowcount == 1)  # type: ignore[attr-defined]
        except Exception:
            log.warning("run %s: heartbeat write failed", self._claimed.run_id, exc_info=True)
            return True
        if not owned:
            log.warning(
                "run %s: attempt %d no longer owns the run; stopping", self._claimed.run_id, self._claimed.attempt
            )
            self._lost.set()
        return owned

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            if not self.beat():
                return
