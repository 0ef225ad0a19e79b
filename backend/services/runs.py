"""Training runs requested by people or events: at most one queued or running per project.

Single-flight lives in the database (the partial unique index ``uq_training_run_one_active``),
not in a lock or in the broker, so two server processes, a Celery beat and a webhook racing
each other still create one run. A trigger that arrives while a run is active is not lost: it
sets ``project.retrain_pending`` so the worker starts one more run when the current one ends.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.db.models import ACTIVE_RUN_STATUSES, RUN_TRIGGER_VALUES, Project, TrainingRun
from backend.errors import InvalidInput

log = logging.getLogger(__name__)


def active_run(session: Session, project: Project) -> TrainingRun | None:
    """The project's queued or running run, if any."""
    return session.scalars(
        select(TrainingRun).where(TrainingRun.project_id == project.id, TrainingRun.status.in_(ACTIVE_RUN_STATUSES))
    ).first()


def request_run(session: Session, project: Project, trigger: str) -> TrainingRun | None:
    """Queue a training run for ``project``; None when one is already queued or running.

    In that case ``project.retrain_pending`` is set instead, so the request is remembered. The
    insert happens in a savepoint: losing the race against another process on the unique index
    is the same outcome as finding the active run, and leaves the caller's transaction usable.
    The caller commits; enqueueing to Celery must happen after that commit.
    """
    if trigger not in RUN_TRIGGER_VALUES:
        raise InvalidInput(f"unknown training trigger {trigger!r}; expected one of {RUN_TRIGGER_VALUES}")
    if active_run(session, project) is None:
        run = TrainingRun(project_id=project.id, trigger=trigger, status="queued")
        try:
            with session.begin_nested():
                session.add(run)
                session.flush()
        except IntegrityError:
            log.info("project %s: lost the race for a training run; marking a retrain as pending", project.id)
        else:
            log.info("project %s: training run %s queued (trigger %s)", project.id, run.id, trigger)
            return run
    project.retrain_pending = True
    session.flush()
    log.info("project %s: a run is already active; retrain pending (trigger %s)", project.id, trigger)
    return None
