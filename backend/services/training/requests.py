"""Requesting training runs: what changed since the last trained version, and single flight.

Per project (see ``docs/workers.md``):

- **annotations**: once ``retrain_after`` (default 20) labelled *training* images are new or
  changed since the snapshot of the project's last trained version, a run is queued with a
  debounce deadline (``not_before``); every further save while it waits pushes the deadline out
  (capped), so a burst of saves makes one run. Validation and test labels never count: they are
  held out. The baseline is the last trained version whatever its gate outcome, so a rejected
  candidate does not make every later save start another run.
- **start_training** / **manual**: queued at once; while a run is active, the request is kept
  as ``project.retrain_pending`` and one more run starts when the active one ends.
- **schedule**: the nightly beat queues a run only if anything changed.

Single flight lives in the database (the partial unique index ``uq_training_run_one_active``),
not in a lock or in the broker, so two server processes, a Celery beat and a webhook racing
each other still create one run. A trigger that arrives while a run is active is not lost: it
sets ``project.retrain_pending`` so the worker starts one more run when the current one ends.

The thresholds themselves are pure (:mod:`backend.services.training.policy`). What happens to a
queued run is elsewhere: :mod:`backend.services.training.queue` (dispatching, claiming, reaping,
finishing) and :mod:`backend.services.training.execute` (training, registering).
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.db.base import utcnow
from backend.db.models import (
    ACTIVE_RUN_STATUSES,
    RUN_TRIGGER_VALUES,
    Image,
    MaskVersion,
    ModelVersion,
    Project,
    TrainingRun,
    model_version_mask,
)
from backend.errors import InvalidInput
from backend.services.training.policy import debounce_until, policy_for, retrain_due
from backend.settings import Settings

log = logging.getLogger(__name__)

TRAINED_STATUSES = ("candidate", "serving", "retired")


# -- what changed: queries ---------------------------------------------------------------------
def current_labels(session: Session, project_id: int, split: str) -> dict[int, int]:
    """``{image_id: mask_version_id}`` of the current label masks of one split."""
    rows = session.execute(
        select(Image.id, MaskVersion.id)
        .join(MaskVersion, (MaskVersion.image_id == Image.id) & MaskVersion.is_current)
        .where(Image.project_id == project_id, Image.split == split)
    ).all()
    return {image_id: mv_id for image_id, mv_id in rows}


def last_trained_version(session: Session, project_id: int) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.project_id == project_id, ModelVersion.status.in_(TRAINED_STATUSES))
        .order_by(ModelVersion.id.desc())
    ).first()


def training_snapshot(version: ModelVersion) -> dict[int, int]:
    return {mv.image_id: mv.id for mv in version.training_masks}


def changed_since_last_version(session: Session, project: Project) -> int:
    """Training labels new, changed or removed since the last trained version's snapshot.

    :func:`count_changes` in SQL (this runs on every dispatcher tick): current training masks
    outside the snapshot, plus snapshot masks whose image has no current label any more (an
    image whose label was replaced is already counted once by the first term).
    """
    last = last_trained_version(session, project.id)
    current = (
        select(MaskVersion.id)
        .join(Image, Image.id == MaskVersion.image_id)
        .where(Image.project_id == project.id, Image.split == "train", MaskVersion.is_current)
    )
    if last is None:
        return session.scalar(select(func.count()).select_from(current.subquery())) or 0
    snapshot_ids = select(model_version_mask.c.mask_version_id).where(model_version_mask.c.model_version_id == last.id)
    added = (
        session.scalar(select(func.count()).select_from(current.where(MaskVersion.id.not_in(snapshot_ids)).subquery()))
        or 0
    )
    still_current = select(MaskVersion.image_id).where(MaskVersion.is_current)
    removed = (
        session.scalar(
            select(func.count())
            .select_from(MaskVersion)
            .where(MaskVersion.id.in_(snapshot_ids), MaskVersion.image_id.not_in(still_current))
        )
        or 0
    )
    return int(added) + int(removed)


# -- requesting runs ---------------------------------------------------------------------------
def maybe_request_retrain(
    session: Session, project: Project, settings: Settings, *, now: dt.datetime | None = None
) -> TrainingRun | None:
    """Queue an 'annotations' run if enough training labels changed; call after recording labels.

    Idempotent and cheap (two indexed queries). A queued run that is still waiting has its
    debounce deadline pushed out; a running one is left alone (when it ends, the count is taken
    again against its snapshot). Returns the newly queued run, if any. The caller commits.
    """
    now = now or utcnow()
    policy = policy_for(project, settings)
    if not policy.auto:
        return None
    active = active_run(session, project)
    if active is not None:
        if active.status == "queued" and active.trigger == "annotations" and active.not_before is not None:
            active.not_before = debounce_until(now, active.created_at, policy.debounce_seconds)
            active.dispatched_at = None  # the dispatcher sends it again once the new deadline passes
            session.flush()
        return None
    changed = changed_since_last_version(session, project)
    if not retrain_due(changed, policy):
        return None
    run = request_run(session, project, "annotations")
    if run is not None:
        run.not_before = now + dt.timedelta(seconds=policy.debounce_seconds)
        run.progress = {"phase": "queued", "changed_labels": changed}
        session.flush()
        log.info(
            "project %s: %d training labels changed (>= %d): run %s queued",
            project.id,
            changed,
            policy.retrain_after,
            run.id,
        )
    return run


def request_training(
    session: Session, project: Project, trigger: str, *, from_scratch: bool = False, now: dt.datetime | None = None
) -> TrainingRun | None:
    """Queue a run now (``manual``, ``start_training``); None: one is active and another is now
    pending (``from_scratch`` then applies only if a new request is made afterwards)."""
    run = request_run(session, project, trigger)
    if run is not None:
        run.from_scratch = from_scratch
        run.not_before = now or utcnow()
        run.progress = {"phase": "queued"}
        session.flush()
    return run


def request_scheduled(session: Session, project: Project, settings: Settings) -> TrainingRun | None:
    """The nightly run: only for automatic projects, only if anything changed, never on top of
    an active run (that run already covers the changes)."""
    if not project.auto_retrain or active_run(session, project) is not None:
        return None
    if changed_since_last_version(session, project) == 0:
        return None
    return request_training(session, project, "schedule")


# -- single flight: at most one queued or running run per project --------------------------------
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


def sweep_retrain_policy(session: Session, settings: Settings) -> list[int]:
    """Queue an 'annotations' run for every automatic project past its threshold and idle.

    The server calls :func:`maybe_request_retrain` right after it records labels; this sweep
    (every dispatcher tick and webhook drain: three indexed counts per project) also covers labels
    that arrived another way (imports, reconciliation, an event drained by a worker) and never
    extends a waiting run's debounce. Returns the ids of the runs it queued.
    """
    queued: list[int] = []
    for project in session.scalars(select(Project).where(Project.auto_retrain).order_by(Project.id)):
        if active_run(session, project) is not None:
            continue
        run = maybe_request_retrain(session, project, settings)
        if run is not None:
            queued.append(run.id)
    return queued


def request_scheduled_all(session: Session, settings: Settings) -> list[int]:
    """The nightly run for every automatic project whose labels changed (see :func:`request_scheduled`)."""
    queued: list[int] = []
    for project in session.scalars(select(Project).order_by(Project.id)):
        run = request_scheduled(session, project, settings)
        if run is not None:
            queued.append(run.id)
    return queued
