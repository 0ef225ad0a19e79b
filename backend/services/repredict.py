"""Batch re-prediction after a promotion: annotators see the new model's suggestions.

A workflow (see :mod:`backend.services`): it pages through Label Studio and writes predictions
back between short units of work of its own. Called by the ``predict`` Celery queue
(:mod:`workers.tasks.prediction`) and by ``sonoseg worker predict``.


The serving model predicts every task of the Label Studio project that has no annotation yet,
and each result is written to Label Studio as a prediction tagged with the model's uid
(``POST /api/predictions/``), and recorded like a ``/predict`` answer (so the correction that
follows is measured). Idempotent: a task that already holds a prediction of this uid is skipped,
and a job for a version that no longer serves does nothing (a newer promotion has its own job).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from backend.db.models import Project
from backend.db.session import unit_of_work
from backend.errors import InvalidInput
from backend.labelstudio.payloads import LsTask
from backend.services.serving import ServingRow, load_from_store
from backend.services.sync import LabelStudioMirror
from backend.services.versions import serving_version
from backend.settings import Settings

if TYPE_CHECKING:
    from backend.services.predictions import ServingModel

log = logging.getLogger(__name__)

BATCH = 8


@dataclass
class RepredictReport:
    project_id: int
    model_version: str | None
    tasks_seen: int = 0
    predicted: int = 0
    already_predicted: int = 0
    empty: int = 0
    failed: int = 0
    skipped_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _unlabelled_tasks(tasks: Iterator[dict[str, Any]], uid: str, report: RepredictReport) -> Iterator[LsTask]:
    for task in tasks:
        report.tasks_seen += 1
        try:
            parsed = LsTask.parse(task, require_id=True)
        except InvalidInput as exc:
            report.failed += 1
            log.warning("task %r skipped: %s", task.get("id"), exc.message)
            continue
        annotations = [
            a for a in task.get("annotations") or [] if isinstance(a, Mapping) and not a.get("was_cancelled")
        ]
        if annotations:
            continue
        predictions = task.get("predictions") or []
        if any(isinstance(p, Mapping) and p.get("model_version") == uid for p in predictions):
            report.already_predicted += 1
            continue
        yield parsed


def _chunks(items: Iterator[LsTask], size: int) -> Iterator[list[LsTask]]:
    chunk: list[LsTask] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def repredict_unlabelled(
    mirror: LabelStudioMirror, settings: Settings, project_id: int, model_uid: str | None
) -> RepredictReport:
    """Predict the project's unlabelled Label Studio tasks with its serving model, write them back."""
    from backend.services.predictions import predict_tasks

    with unit_of_work(mirror.factory) as session:
        project = session.get(Project, project_id)
        serving = serving_version(session, project_id) if project is not None else None
        ls_project_id = project.ls_project_id if project is not None else None
        row = (
            ServingRow(project_id, serving.id, serving.uid, serving.checkpoint_key, serving.checkpoint_sha256)
            if serving is not None
            else None
        )
    report = RepredictReport(project_id, row.uid if row else None)
    if row is None:
        report.skipped_reason = "no serving model"
    elif model_uid is not None and row.uid != model_uid:
        report.skipped_reason = f"{model_uid} no longer serves ({row.uid} does)"
    elif ls_project_id is None:
        report.skipped_reason = "not a Label Studio project"
    elif not (settings.label_studio_url and settings.label_studio_api_key):
        report.skipped_reason = "LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY not set"
    if report.skipped_reason or row is None or ls_project_id is None:
        log.info("re-prediction for project %s skipped: %s", project_id, report.skipped_reason)
        return report
    client = mirror.fetcher.client
    if client is None:
        report.skipped_reason = "Label Studio client unavailable"
        return report
    model = cast("ServingModel", load_from_store(mirror.store, settings)(row))
    project_ref = mirror.project_ref(ls_project_id, None)
    for chunk in _chunks(_unlabelled_tasks(client.iter_tasks(ls_project_id), row.uid, report), BATCH):
        answers = predict_tasks(mirror, model, project_ref, chunk)
        for task, answer in zip(chunk, answers, strict=True):
            if not answer.result:
                report.empty += 1
                continue
            resp = client.request("POST", "/api/predictions/", json_body={"task": task.id, **answer.to_json()})
            if resp.ok:
                report.predicted += 1
            else:
                report.failed += 1
                log.warning("Label Studio refused the prediction for task %s (%s)", task.id, resp.status_code)
    log.info(
        "re-prediction of project %s with %s: %d written, %d already there, %d empty, %d failed of %d tasks",
        project_id,
        row.uid,
        report.predicted,
        report.already_predicted,
        report.empty,
        report.failed,
        report.tasks_seen,
    )
    return report
