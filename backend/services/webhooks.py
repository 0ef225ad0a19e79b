"""Label Studio webhooks: record each delivery at once, turn it into labels in the background.

Label Studio posts each event once, with a 1 s timeout and no retry. So :func:`record_event`
only validates the payload's shape and inserts it (one short transaction), and
:func:`process_pending_events`, run by a background thread in the server and by the Celery
workers, does the slow part (downloading images, decoding masks). Both are idempotent:

- a repeated delivery has the same canonical-JSON sha256 and is recorded once;
- an event is claimed and applied in one transaction, so two processors never apply it twice,
  and applying the same annotation again records no new version.

Deliveries that are lost anyway are recovered by reconciliation (``sonoseg sync``, and before
each training run: see :mod:`backend.services.reconciliation`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.db.base import utcnow
from backend.db.models import Project, WebhookEvent
from backend.db.session import unit_of_work
from backend.errors import InvalidInput, NotReady, SonosegError
from backend.labelstudio.payloads import (
    ANNOTATION_ACTIONS,
    HANDLED_ACTIONS,
    LsTask,
    WebhookPayload,
    parse_webhook,
    scrub_webhook,
    webhook_action,
)
from backend.services.annotations import AnnotationOutcome, apply_annotation, retire_tasks
from backend.services.masks import deactivate_annotation
from backend.services.reconciliation import reconcile_project
from backend.services.sync import LabelStudioMirror
from backend.services.training.requests import maybe_request_retrain, request_training
from backend.settings import Settings

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000

EventOutcome = Literal["processed", "ignored", "failed", "skipped"]
"""What processing one event did; ``skipped``: another processor had already taken it."""


@dataclass(frozen=True)
class RecordedEvent:
    action: str
    event_id: int | None  # None for actions sonoseg does not use (not stored)
    created: bool  # False for a repeated delivery, or an ignored action

    @property
    def handled(self) -> bool:
        return self.action in HANDLED_ACTIONS


@dataclass
class ProcessReport:
    processed: int = 0
    ignored: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.processed + self.ignored + self.failed


def event_key(payload: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces): equal bodies, equal keys."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def validate_event(payload: object) -> WebhookPayload | str:
    """The typed payload of a handled action, or the action's name for one sonoseg does not use.

    Raises :class:`InvalidInput` naming the problem; nothing is stored for such a body.
    """
    if not isinstance(payload, Mapping):
        raise InvalidInput("a webhook body must be a JSON object")
    action = webhook_action(payload)
    if action not in HANDLED_ACTIONS:
        return action
    return parse_webhook(payload)


def record_event(session: Session, payload: object) -> RecordedEvent:
    """Store a delivery as a pending event, once. Unused actions are acknowledged, not stored.

    The whole body is checked first (:func:`backend.labelstudio.payloads.parse_webhook`): a body
    that would fail later is refused now, with a 400, and leaves no row. What is stored is the
    allow-listed part (:func:`~backend.labelstudio.payloads.scrub_webhook`): no e-mail addresses.
    """
    parsed = validate_event(payload)
    if isinstance(parsed, str):
        log.debug("webhook %s ignored", parsed)
        return RecordedEvent(parsed, None, created=False)
    if not isinstance(payload, Mapping):  # validate_event guarantees it; this narrows the type
        raise InvalidInput("a webhook body must be a JSON object")
    stored = scrub_webhook(payload)
    action = parsed.action
    try:
        key = event_key(stored)
    except ValueError as exc:  # NaN / Infinity
        raise InvalidInput(f"the webhook body is not plain JSON: {exc}") from exc
    existing = session.scalars(select(WebhookEvent.id).where(WebhookEvent.event_key == key)).first()
    if existing is not None:
        log.info("webhook %s delivered again (event %s); recorded once", action, existing)
        return RecordedEvent(action, existing, created=False)
    event = WebhookEvent(
        event_key=key, action=action, ls_project_id=parsed.ls_project_id, payload=stored, status="pending"
    )
    try:
        with session.begin_nested():
            session.add(event)
            session.flush()
    except IntegrityError:  # the same delivery, recorded concurrently by another process
        existing = session.scalars(select(WebhookEvent.id).where(WebhookEvent.event_key == key)).first()
        return RecordedEvent(action, existing, created=False)
    log.info("webhook %s recorded as event %s (project %s)", action, event.id, parsed.ls_project_id)
    return RecordedEvent(action, event.id, created=True)


# -- processing -----------------------------------------------------------------------------------
def process_pending_events(mirror: LabelStudioMirror, settings: Settings, *, limit: int = 200) -> ProcessReport:
    """Apply up to ``limit`` pending events, oldest first. Safe to run in several processes.

    An event that fails is marked ``failed`` with its reason (reconciliation will pick up the
    label it carried); the others go on.
    """
    report = ProcessReport()
    with unit_of_work(mirror.factory) as session:
        pending = session.execute(
            select(WebhookEvent.id, WebhookEvent.action, WebhookEvent.payload)
            .where(WebhookEvent.status == "pending")
            .order_by(WebhookEvent.id)
            .limit(limit)
        ).all()
    for event_id, action, payload in pending:
        try:
            outcome = _process_one(mirror, settings, event_id, action, dict(payload))
        except SonosegError as exc:
            _mark(mirror, event_id, "failed", exc.message)
            log.warning("webhook event %s failed: %s", event_id, exc.message)
            report.failed += 1
            continue
        except Exception as exc:  # a bug must not stop the other events; keep the trace in the log
            log.exception("webhook event %s failed unexpectedly", event_id)
            _mark(mirror, event_id, "failed", f"internal error: {type(exc).__name__}")
            report.failed += 1
            continue
        if outcome == "ignored":
            report.ignored += 1
        elif outcome == "processed":
            report.processed += 1
        elif outcome == "failed":
            report.failed += 1
    return report


def _load_pending(session: Session, event_id: int) -> WebhookEvent | None:
    """The event if still pending, locked against other processors (PostgreSQL row lock)."""
    event = session.scalars(select(WebhookEvent).where(WebhookEvent.id == event_id).with_for_update()).one_or_none()
    return event if event is not None and event.status == "pending" else None


def _mark(mirror: LabelStudioMirror, event_id: int, status: EventOutcome, error: str | None = None) -> None:
    with unit_of_work(mirror.factory) as session:
        event = session.get(WebhookEvent, event_id)
        if event is not None and event.status == "pending":
            _finish(event, status, error)


def _process_one(
    mirror: LabelStudioMirror, settings: Settings, event_id: int, action: str, payload: dict[str, Any]
) -> EventOutcome:
    """Apply one event; returns 'processed', 'ignored' or 'skipped' (another processor took it).

    The stored payload is parsed again with the same parser that admitted it. Slow preparation
    (downloads) happens first, outside any transaction; the event is then claimed (still
    pending, row-locked) and applied in one transaction.
    """
    parsed = parse_webhook(payload)
    if action in ANNOTATION_ACTIONS:
        return _apply_annotations(mirror, settings, event_id, parsed)
    if action == "START_TRAINING":
        return _start_training(mirror, event_id, parsed)
    with unit_of_work(mirror.factory) as session:
        event = _load_pending(session, event_id)
        if event is None:
            return "skipped"
        project = session.scalars(select(Project).where(Project.ls_project_id == parsed.ls_project_id)).one_or_none()
        if action == "ANNOTATIONS_DELETED":
            changed = sum(len(deactivate_annotation(session, a)) for a in parsed.deleted_ids)
        else:  # TASKS_DELETED
            retired = retire_tasks(session, project.id, parsed.deleted_ids) if project is not None else []
            changed = len(retired)
            if project is not None:
                mirror.forget_tasks(project.id, retired)
        outcome: EventOutcome = "processed" if changed else "ignored"
        _finish(event, outcome)
    return outcome


def _finish(event: WebhookEvent, outcome: EventOutcome, error: str | None = None) -> None:
    """Close an event. Its task data (image URLs, which can carry file names) is no longer
    needed once applied, so only the ids and the annotation content are kept."""
    event.status = outcome
    event.error = error[:MAX_ERROR_CHARS] if error else None
    event.processed_at = utcnow()
    event.payload = _without_task_data(event.payload)


def _without_task_data(payload: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(payload)
    task = out.get("task")
    if isinstance(task, Mapping):
        out["task"] = {k: v for k, v in task.items() if k != "data"}
    elif isinstance(task, list):
        out["task"] = [{k: v for k, v in t.items() if k != "data"} if isinstance(t, Mapping) else t for t in task]
    return out


def _apply_annotations(
    mirror: LabelStudioMirror, settings: Settings, event_id: int, parsed: WebhookPayload
) -> EventOutcome:
    """ANNOTATION_CREATED / _UPDATED / ANNOTATIONS_CREATED -> mask versions (or deactivations)."""
    ref = mirror.project_ref(parsed.ls_project_id, parsed.label_config, parsed.project_title)
    project_id, config = ref.project_id, ref.config
    images: dict[int, int] = {}
    for ann in parsed.annotations:
        if ann.was_cancelled:
            continue  # a skip: no image needed
        task_id = ann.require_task()
        if task_id in images:
            continue
        task = parsed.tasks.get(task_id)
        if task is None:  # bulk events may carry no task data: ask Label Studio
            client = mirror.fetcher.client
            if client is None:
                raise NotReady(f"task {task_id} is unknown and Label Studio is not configured to fetch it")
            task = LsTask.parse(client.get_task(task_id), require_id=True)
        images[task_id] = mirror.task_image_of(project_id, config, task).image_id
    outcomes: list[AnnotationOutcome] = []
    with unit_of_work(mirror.factory) as session:
        event = _load_pending(session, event_id)
        if event is None:
            return "skipped"
        project_row = session.get(Project, project_id)
        if project_row is None:
            raise NotReady(f"project {project_id} disappeared")
        for ann in parsed.annotations:
            image_id = images.get(ann.task_id or 0, 0)
            outcomes.append(
                apply_annotation(session, mirror.store, project_row, config, image_id, ann, webhook_event_id=event_id)
            )
        changed = any(o.changed for o in outcomes)
        refused = [o.reason for o in outcomes if o.kind == "refused" and o.reason]
        if changed:
            maybe_request_retrain(session, project_row, settings)  # the 'annotations' trigger
        outcome: EventOutcome
        if refused:
            outcome = "failed"
            _finish(event, outcome, "; ".join(refused))
        else:
            outcome = "processed" if any(o.recorded for o in outcomes) else "ignored"
            _finish(event, outcome)
    log.info("webhook event %s: %s", event_id, ", ".join(o.kind for o in outcomes) or "nothing")
    return outcome


def _start_training(mirror: LabelStudioMirror, event_id: int, parsed: WebhookPayload) -> EventOutcome:
    """Reconcile first (when Label Studio is reachable), then queue a run (single-flight).

    The run is only queued here; a worker claims it (:mod:`backend.services.training.queue`) and executes it
    (:mod:`backend.services.training.execute`).
    """
    ls_id = parsed.ls_project_id
    if mirror.fetcher.client is not None:
        try:
            reconcile_project(mirror, ls_id)
        except SonosegError as exc:
            log.warning(
                "START_TRAINING for project %s: reconciliation failed (%s); queueing anyway", ls_id, exc.message
            )
    with unit_of_work(mirror.factory) as session:
        event = _load_pending(session, event_id)
        if event is None:
            return "skipped"
        project, _ = mirror.ensure_project(session, ls_id, parsed.label_config, parsed.project_title)
        run = request_training(session, project, "start_training")
        _finish(event, "processed")
        log.info(
            "START_TRAINING for project %s: %s",
            ls_id,
            f"run {run.id} queued" if run is not None else "a run is already active; retrain pending",
        )
    return "processed"
