"""Batch re-prediction after a promotion: annotators see the new model's suggestions.

A workflow (see :mod:`backend.services`): it pages through Label Studio and writes predictions
back between short units of work of its own. Called by the ``predict`` Celery queue
(:mod:`workers.tasks.prediction`) and by ``sonoseg worker predict``.


The serving model predicts every task of the Label Studio project that has no annotation yet,
and each result is written to Label Studio as a prediction tagged with the model's uid
(``POST /api/predictions/``), and recorded like a ``/predict`` answer (so the correction that
follows is measured). Idempotent: a task that already holds a prediction of this uid is skipped,
and a job for a version that no longer serves does nothing (a newer promotion has its own job).

It also scores the project's active-learning pool with the new version (any project, Label Studio
or not): every unlabelled stored image of the pool (:mod:`backend.services.scores`) that this version
has not scored yet is read from the blob store and run through
:func:`backend.model.scores.score_images` in batches of :data:`BATCH`, and the scores are stored
for the version, one short unit of work per batch. Once before the Label Studio pass (what is
stored already is scored even if Label Studio fails) and once after it (frames that pass
downloaded for the first time). Scoring stops early when the version stops serving.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from numpy.typing import NDArray

from backend.db.models import Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import InvalidInput, SonosegError
from backend.labelstudio.payloads import LsTask
from backend.services.scores import store_scores, unscored_images
from backend.services.serving import ServingRow, load_from_store
from backend.services.sync import LabelStudioMirror
from backend.services.versions import serving_version
from backend.settings import Settings
from backend.storage.blobs import BlobStore

if TYPE_CHECKING:
    from backend.model.predict import Predictor
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
    scored: int = 0  # pool images scored for active learning (backend.services.scores)
    score_failed: int = 0

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
    if report.skipped_reason or row is None:
        log.info("re-prediction for project %s skipped: %s", project_id, report.skipped_reason)
        return report
    client = mirror.fetcher.client
    if ls_project_id is None:
        report.skipped_reason = "not a Label Studio project"
    elif not (settings.label_studio_url and settings.label_studio_api_key):
        report.skipped_reason = "LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY not set"
    elif client is None:
        report.skipped_reason = "Label Studio client unavailable"
    served = load_from_store(mirror.store, settings)(row)
    _score_pool(mirror.factory, mirror.store, row, served.predictor, report)
    if report.skipped_reason or ls_project_id is None or client is None:
        log.info(
            "re-prediction for project %s: Label Studio part skipped (%s); %d pool image(s) scored",
            project_id,
            report.skipped_reason,
            report.scored,
        )
        return report
    model = cast("ServingModel", served)
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
    _score_pool(mirror.factory, mirror.store, row, served.predictor, report)  # frames first stored just now
    log.info(
        "re-prediction of project %s with %s: %d written, %d already there, %d empty, %d failed of %d tasks; "
        "%d pool image(s) scored, %d failed",
        project_id,
        row.uid,
        report.predicted,
        report.already_predicted,
        report.empty,
        report.failed,
        report.tasks_seen,
        report.scored,
        report.score_failed,
    )
    return report


def score_new_images(factory: SessionFactory, store: BlobStore, settings: Settings, project_id: int) -> RepredictReport:
    """Score the pool images the serving version has not scored yet (frames imported or first seen
    in Label Studio since the promotion), so the ranking covers them; nothing is written to Label
    Studio. A no-op when no model serves or every pool image is scored."""
    with unit_of_work(factory) as session:
        serving = serving_version(session, project_id)
        row = (
            ServingRow(project_id, serving.id, serving.uid, serving.checkpoint_key, serving.checkpoint_sha256)
            if serving is not None
            else None
        )
        project = session.get(Project, project_id)
        waiting = bool(unscored_images(session, project, serving.id)) if project and serving else False
    report = RepredictReport(project_id, row.uid if row else None)
    if row is None or not waiting:
        report.skipped_reason = "no serving model" if row is None else "every pool image is scored"
        return report
    served = load_from_store(store, settings)(row)
    _score_pool(factory, store, row, served.predictor, report)
    log.info(
        "project %s: %d new pool image(s) scored by %s, %d failed",
        project_id,
        report.scored,
        row.uid,
        report.score_failed,
    )
    return report


def _score_pool(
    factory: SessionFactory, store: BlobStore, row: ServingRow, predictor: Predictor, report: RepredictReport
) -> None:
    """Score the pool images ``row``'s version has not scored yet, :data:`BATCH` at a time (module doc)."""
    from backend.imaging.io import decode_png_bytes
    from backend.model.scores import score_images

    with unit_of_work(factory) as session:
        project = session.get(Project, row.project_id)
        todo = unscored_images(session, project, row.model_version_id) if project is not None else []
    for start in range(0, len(todo), BATCH):
        chunk = todo[start : start + BATCH]
        pixels: dict[int, NDArray[Any]] = {}
        for item in chunk:
            try:
                pixels[item.image_id] = decode_png_bytes(store.get_bytes(item.blob_key))
            except (SonosegError, OSError) as exc:
                report.score_failed += 1
                log.warning("image %s not scored: its stored pixels cannot be read (%s)", item.image_id, exc)
        if not pixels:
            continue
        try:
            scores = score_images(predictor, list(pixels.values()))
            with unit_of_work(factory) as session:
                report.scored += store_scores(session, row.model_version_id, dict(zip(pixels, scores, strict=True)))
                serving = serving_version(session, row.project_id)
        except SonosegError as exc:
            report.score_failed += len(pixels)
            log.warning("images %s not scored: %s", sorted(pixels), exc.message)
            continue
        if serving is None or serving.id != row.model_version_id:
            log.info("model %s no longer serves project %s: scoring stopped", row.uid, row.project_id)
            return
