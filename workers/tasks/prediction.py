"""The ``predict`` queue: batch re-prediction after a promotion, and scoring frames that arrived
since (thin: see :mod:`backend.services.repredict`)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task

from backend.errors import SonosegError, UpstreamError
from backend.services.repredict import repredict_unlabelled, score_new_images
from workers.celery_app import runtime_of
from workers.names import TASK_PREDICT_PROJECT, TASK_SCORE_PROJECT

log = logging.getLogger(__name__)


@shared_task(
    name=TASK_PREDICT_PROJECT,
    bind=True,
    acks_late=True,
    autoretry_for=(UpstreamError,),
    retry_backoff=30,
    max_retries=5,
)
def predict_project(self: Task, project_id: int, model_uid: str | None = None) -> dict[str, Any]:
    """Re-predict a project's unlabelled tasks with ``model_uid`` (None: whatever serves now)."""
    rt = runtime_of(self.app)
    try:
        return repredict_unlabelled(rt.mirror, rt.settings, project_id, model_uid).to_json()
    except UpstreamError:
        raise
    except SonosegError as exc:
        log.warning("re-prediction of project %s failed: %s", project_id, exc.message)
        return {"project_id": project_id, "model_version": model_uid, "error": exc.message}


@shared_task(name=TASK_SCORE_PROJECT, bind=True, acks_late=True, ignore_result=True)
def score_project(self: Task, project_id: int) -> dict[str, Any]:
    """Score the project's pool images that the serving model has not scored yet (idempotent)."""
    rt = runtime_of(self.app)
    try:
        return score_new_images(rt.factory, rt.store, rt.settings, project_id).to_json()
    except SonosegError as exc:
        log.warning("scoring new images of project %s failed: %s", project_id, exc.message)
        return {"project_id": project_id, "error": exc.message}
