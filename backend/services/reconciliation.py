"""Reconciliation: walk a Label Studio project and record what webhooks missed.

Label Studio posts each webhook once, with no retry, so deliveries get lost. ``sonoseg sync``,
``START_TRAINING`` and every training run pull the project's tasks and annotations through the
same :class:`~backend.services.sync.LabelStudioMirror` and the same
:mod:`backend.services.annotations` functions that webhooks use, so a reconciled annotation
produces exactly the rows its webhook would have, and reconciling twice changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from backend.db.models import Project
from backend.db.session import unit_of_work
from backend.errors import InvalidInput, NotReady, SonosegError
from backend.labelstudio.payloads import LsAnnotation, LsTask
from backend.services.annotations import (
    active_task_ids,
    apply_annotation,
    deactivate_missing_annotations,
    retire_tasks,
)
from backend.services.sync import LabelStudioMirror

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    """What one reconciliation changed (counts) and what it could not do (reasons)."""

    ls_project_id: int
    tasks: int = 0
    annotations: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skips: int = 0  # skipped tasks (was_cancelled): not labels
    deactivated: int = 0
    tasks_gone: int = 0
    refused: int = 0  # annotations whose labels are all unknown (recorded as label issues)
    errors: list[str] = field(default_factory=list)


def reconcile_project(mirror: LabelStudioMirror, ls_project_id: int) -> SyncReport:
    """Pull every task and annotation of a project from Label Studio and record what we missed.

    Missing or changed annotations become mask versions; annotations gone from Label Studio
    (or turned into skips) are deactivated; tasks gone are marked inactive. Each annotation
    is its own short transaction, so a bad one is reported and the rest still sync.
    """
    client = mirror.fetcher.client
    if client is None:
        raise NotReady("reconciliation needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    info = client.get_project(ls_project_id)
    report = SyncReport(ls_project_id)
    with unit_of_work(mirror.factory) as session:
        project, config = mirror.ensure_project(
            session, ls_project_id, str(info.get("label_config") or ""), str(info.get("title") or "") or None
        )
        project_id = project.id
    seen_annotations: set[int] = set()
    seen_tasks: set[int] = set()
    for raw_task in client.iter_tasks(ls_project_id):
        try:  # the same parsers as /predict and webhooks: one reading of a task everywhere
            task = LsTask.parse(raw_task, require_id=True)
            raw_annotations = raw_task.get("annotations") or []
            if not isinstance(raw_annotations, list):
                raise InvalidInput(f"task {task.id}: 'annotations' is not a list")
            annotations = [LsAnnotation.parse(a, task_id=task.id) for a in raw_annotations]
        except InvalidInput as exc:
            report.errors.append(f"task {raw_task.get('id')!r}: {exc.message}")
            continue
        task_id = task.require_id()
        report.tasks += 1
        seen_tasks.add(task_id)
        seen_annotations.update(a.id for a in annotations if not a.was_cancelled)
        if not annotations:
            continue
        try:
            image = mirror.task_image_of(project_id, config, task)
        except SonosegError as exc:  # a missing or unreadable image: report it, sync the rest
            report.errors.append(f"task {task_id}: {exc.message}")
            continue
        for ann in annotations:
            report.annotations += 1
            try:
                with unit_of_work(mirror.factory) as session:
                    project_row = session.get(Project, project_id)
                    if project_row is None:
                        raise NotReady(f"project {project_id} disappeared during sync")
                    outcome = apply_annotation(session, mirror.store, project_row, config, image.image_id, ann)
            except SonosegError as exc:
                report.errors.append(f"task {task_id} annotation {ann.id}: {exc.message}")
                continue
            if outcome.kind == "refused":
                report.refused += 1
                report.errors.append(outcome.reason or f"annotation {ann.id} refused")
            elif outcome.kind == "created":
                report.created += 1
            elif outcome.kind == "updated":
                report.updated += 1
            elif outcome.kind == "deactivated":
                report.deactivated += 1
            elif outcome.kind == "ignored":
                report.skips += 1
            else:
                report.unchanged += 1
    with unit_of_work(mirror.factory) as session:
        report.deactivated += deactivate_missing_annotations(session, project_id, seen_annotations)
        retired = retire_tasks(session, project_id, active_task_ids(session, project_id) - seen_tasks)
    mirror.forget_tasks(project_id, retired)
    report.tasks_gone = len(retired)
    log.info(
        "sync of Label Studio project %s: %d tasks, %d annotations, %d created, %d updated, %d deactivated, "
        "%d tasks gone, %d errors",
        ls_project_id,
        report.tasks,
        report.annotations,
        report.created,
        report.updated,
        report.deactivated,
        report.tasks_gone,
        len(report.errors),
    )
    return report


def reconcile_stored_project(mirror: LabelStudioMirror, project_id: int) -> SyncReport | None:
    """Reconcile sonoseg project ``project_id`` (by its own id); None for a project not linked to
    Label Studio (imported offline)."""
    with unit_of_work(mirror.factory) as session:
        project = session.get(Project, project_id)
        ls_project_id = project.ls_project_id if project is not None else None
    if ls_project_id is None:
        return None
    return reconcile_project(mirror, ls_project_id)
