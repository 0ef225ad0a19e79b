"""When to retrain: the policy, what changed since the last trained version, requesting runs.

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

What happens to a queued run is elsewhere: :mod:`backend.services.run_queue` (dispatching,
claiming, reaping, finishing) and :mod:`backend.services.run_execution` (training, registering).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.db.base import utcnow
from backend.db.models import (
    Image,
    MaskVersion,
    ModelVersion,
    Project,
    TrainingRun,
    model_version_mask,
)
from backend.services import runs
from backend.settings import Settings

log = logging.getLogger(__name__)

MAX_DEBOUNCE_FACTOR = 5.0
"""A burst of saves may delay a queued run by at most this many debounce periods in total."""
TRAINED_STATUSES = ("candidate", "serving", "retired")


# -- policy: pure ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrainPolicy:
    """A project's effective policy: its overrides, else the settings."""

    retrain_after: int
    debounce_seconds: float
    max_minutes: float
    auto: bool


def policy_for(project: Project, settings: Settings) -> RetrainPolicy:
    return RetrainPolicy(
        retrain_after=project.retrain_after if project.retrain_after is not None else settings.retrain_after,
        debounce_seconds=settings.retrain_debounce_seconds,
        max_minutes=project.train_max_minutes if project.train_max_minutes is not None else settings.train_max_minutes,
        auto=bool(project.auto_retrain),
    )


def count_changes(current: Mapping[int, int], snapshot: Mapping[int, int]) -> int:
    """Images whose label differs between two ``{image_id: mask_version_id}`` maps (new, changed
    or removed)."""
    return sum(1 for image_id in set(current) | set(snapshot) if current.get(image_id) != snapshot.get(image_id))


def retrain_due(changed: int, policy: RetrainPolicy) -> bool:
    """Whether ``changed`` training labels warrant an automatic run (``retrain_after`` 0: never)."""
    return policy.auto and policy.retrain_after > 0 and changed >= policy.retrain_after


def debounce_until(now: dt.datetime, first_queued_at: dt.datetime, debounce_seconds: float) -> dt.datetime:
    """The new start deadline after a save: ``debounce`` from now, but never later than
    :data:`MAX_DEBOUNCE_FACTOR` periods after the run was queued (a steady stream of saves
    must not postpone training forever)."""
    period = dt.timedelta(seconds=max(0.0, debounce_seconds))
    return min(now + period, first_queued_at + MAX_DEBOUNCE_FACTOR * period)


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
    active = runs.active_run(session, project)
    if active is not None:
        if active.status == "queued" and active.trigger == "annotations" and active.not_before is not None:
            active.not_before = debounce_until(now, active.created_at, policy.debounce_seconds)
            active.dispatched_at = None  # the dispatcher sends it again once the new deadline passes
            session.flush()
        return None
    changed = changed_since_last_version(session, project)
    if not retrain_due(changed, policy):
        return None
    run = runs.request_run(session, project, "annotations")
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
    run = runs.request_run(session, project, trigger)
    if run is not None:
        run.from_scratch = from_scratch
        run.not_before = now or utcnow()
        run.progress = {"phase": "queued"}
        session.flush()
    return run


def request_scheduled(session: Session, project: Project, settings: Settings) -> TrainingRun | None:
    """The nightly run: only for automatic projects, only if anything changed, never on top of
    an active run (that run already covers the changes)."""
    if not project.auto_retrain or runs.active_run(session, project) is not None:
        return None
    if changed_since_last_version(session, project) == 0:
        return None
    return request_training(session, project, "schedule")
