"""Pre-annotations for Label Studio tasks, recorded; and how much each was corrected afterwards.

``predict_tasks`` answers one item per task, in order, always: a task whose image cannot be
fetched or decoded gets an empty result and a logged reason, never a failed batch. Images are
batched through the model together. Every served prediction is recorded (a Prediction row, and
its mask as a 'prediction' mask version), so that when the sonographer's corrected annotation
arrives, :func:`record_correction` can store the Dice between what we served and what they saved.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import Image, Prediction, Project
from backend.db.session import unit_of_work
from backend.errors import SonosegError
from backend.labelstudio.config import ClassMap, LabelConfig
from backend.labelstudio.payloads import LsTask
from backend.labelstudio.results import mask_to_results
from backend.services.masks import add_mask_version, lock_images
from backend.storage.blobs import StagedWrites, staged_writes

if TYPE_CHECKING:
    from backend.services.sync import LabelStudioMirror, ProjectRef, TaskImage

log = logging.getLogger(__name__)

UNTRAINED = "untrained"
FETCH_THREADS = 4
CHUNK_TASKS = 16


class FrameResult(Protocol):
    """What the model gives per frame (backend.model.predict.PredictionResult satisfies it)."""

    @property
    def probabilities(self) -> NDArray[Any]: ...  # float32 (C, H, W)

    @property
    def mask(self) -> NDArray[Any]: ...  # uint8 (H, W), model class indices

    @property
    def score(self) -> float: ...

    @property
    def uncertainty(self) -> float: ...


class ServingModel(Protocol):
    """The model in service for a project (backend.services.serving.ServedModel satisfies it)."""

    @property
    def uid(self) -> str: ...

    @property
    def model_version_id(self) -> int: ...

    @property
    def classes(self) -> tuple[str, ...]: ...  # foreground names: model mask value i is classes[i - 1]

    def predict(self, images: Sequence[NDArray[Any]]) -> Sequence[Any]: ...


@dataclass(frozen=True)
class TaskPrediction:
    """One item of the ``/predict`` answer."""

    result: list[dict[str, Any]]
    score: float
    model_version: str

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "score": float(self.score), "model_version": self.model_version}


@dataclass(frozen=True)
class _Served:
    task_id: int | None
    image_id: int
    mask: NDArray[Any] | None  # project class indices; None when no model served
    score: float | None
    uncertainty: float | None


def predict_tasks(
    mirror: LabelStudioMirror,
    model: ServingModel | None,
    project: ProjectRef,
    tasks: Sequence[LsTask],
) -> list[TaskPrediction]:
    """One prediction per task, in order, recorded. ``model`` None: empty "untrained" items.

    Never raises for one task's problem: a task whose image cannot be fetched or decoded is
    logged and answered with an empty result. Tasks go through in chunks of ``CHUNK_TASKS``
    (downloaded together, batched through the model, recorded), which bounds memory: each
    frame's result holds full-size class probabilities.
    """
    answers: list[TaskPrediction] = []
    for start in range(0, len(tasks), CHUNK_TASKS):
        answers.extend(_predict_chunk(mirror, model, project, tasks[start : start + CHUNK_TASKS]))
    return answers


def _predict_chunk(
    mirror: LabelStudioMirror, model: ServingModel | None, project: ProjectRef, tasks: Sequence[LsTask]
) -> list[TaskPrediction]:
    version = model.uid if model is not None else UNTRAINED
    images = _task_images(mirror, project.project_id, project.config, tasks)
    ready = {i: image.pixels for i, image in enumerate(images) if image is not None and image.pixels is not None}
    frames: dict[int, FrameResult] = {}
    if model is not None and ready:
        outputs = model.predict(list(ready.values()))
        frames = dict(zip(ready, outputs, strict=True))
    lut = _class_lut(model.classes, project.class_names) if model is not None else None
    answers: list[TaskPrediction] = []
    served: list[_Served] = []
    for i, task in enumerate(tasks):
        image, frame = images[i], frames.get(i)
        if image is None:
            answers.append(TaskPrediction([], 0.0, version))
            continue
        if frame is None or lut is None:
            answers.append(TaskPrediction([], 0.0, version))
            served.append(_Served(task.id, image.image_id, None, None, None))
            continue
        mask = lut[frame.mask]
        scores = {project.class_names[c - 1]: v for c, v in _region_scores(frame, mask, lut).items()}
        regions = mask_to_results(mask, project.config, ClassMap(project.class_names), scores)
        answers.append(TaskPrediction(regions, float(frame.score), version))
        served.append(_Served(task.id, image.image_id, mask, float(frame.score), float(frame.uncertainty)))
    _record(mirror, project.project_id, model, served)
    return answers


def _task_images(
    mirror: LabelStudioMirror, project_id: int, config: LabelConfig, tasks: Sequence[LsTask]
) -> list[TaskImage | None]:
    """Each task's stored image with pixels, or None (reason logged). Downloads run in parallel."""

    def one(task: LsTask) -> TaskImage | None:
        try:
            return mirror.task_image_of(project_id, config, task, need_pixels=True)
        except SonosegError as exc:
            log.warning("task %s: no prediction: %s", task.id, exc.message)
            return None

    if len(tasks) <= 1:
        return [one(t) for t in tasks]
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(tasks)), thread_name_prefix="fetch") as pool:
        return list(pool.map(one, tasks))


def _class_lut(model_classes: Sequence[str], project_classes: Sequence[str]) -> NDArray[Any]:
    """Model mask value -> project class index, by name (0 for a class the project lacks)."""
    lut = np.zeros(len(model_classes) + 1, dtype=np.uint8)
    index = {name: i + 1 for i, name in enumerate(project_classes)}
    for i, name in enumerate(model_classes, start=1):
        lut[i] = index.get(name, 0)
    return lut


def _region_scores(frame: FrameResult, mask: NDArray[Any], lut: NDArray[Any]) -> dict[int, float]:
    """Per project class present: mean probability of that class over its predicted pixels."""
    scores: dict[int, float] = {}
    probs = frame.probabilities
    for model_cls in range(1, len(lut)):
        project_cls = int(lut[model_cls])
        if project_cls == 0:
            continue
        where = mask == project_cls
        if where.any() and model_cls < probs.shape[0]:
            scores[project_cls] = float(probs[model_cls][where].mean())
    return scores


def _record(mirror: LabelStudioMirror, project_id: int, model: ServingModel | None, served: list[_Served]) -> None:
    """Prediction rows and prediction mask versions for what was served.

    One short transaction per task: with SQLite a transaction holds the database's write lock,
    and webhooks arriving meanwhile must still be recorded within Label Studio's 1 s timeout.
    """
    uid = model.uid if model is not None else UNTRAINED
    for item in served:
        with staged_writes(mirror.store) as staged, unit_of_work(mirror.factory) as session:
            project = session.get(Project, project_id)
            if project is None:
                return
            mask_version_id = None
            if item.mask is not None and model is not None:
                lock_images(session, [item.image_id])
                mask_version_id = _prediction_mask(session, staged, project, item, model.model_version_id)
            session.add(
                Prediction(
                    image_id=item.image_id,
                    model_version_id=model.model_version_id if model is not None else None,
                    model_version_uid=uid,
                    ls_task_id=item.task_id,
                    mask_version_id=mask_version_id,
                    score=item.score,
                    uncertainty=item.uncertainty,
                )
            )
    if served:
        log.info("project %s: %d prediction(s) served by %s", project_id, len(served), uid)


def _prediction_mask(
    session: Session, store: StagedWrites, project: Project, item: _Served, model_version_id: int
) -> int | None:
    """The prediction's mask version; the same model on the same image reuses its earlier one."""
    earlier = session.scalar(
        select(Prediction.mask_version_id)
        .where(
            Prediction.image_id == item.image_id,
            Prediction.model_version_id == model_version_id,
            Prediction.mask_version_id.is_not(None),
        )
        .order_by(Prediction.id.desc())
        .limit(1)
    )
    if earlier is not None:
        return int(earlier)
    image = session.get(Image, item.image_id)
    if image is None or item.mask is None:
        return None
    return add_mask_version(session, store, project, image, item.mask, source="prediction").mask_version.id
