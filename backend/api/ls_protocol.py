"""The Label Studio ML backend protocol: /health, /setup, /predict, /webhook, /versions.

Each view parses the request, calls the core and shapes the answer. What Label Studio sends and
reads is in docs/label-studio-protocol.md; the points that shape this module:

- /health and /setup answer from memory (Label Studio waits 1 s and 3 s): no model loading, and
  the database only for a project or label config not seen before;
- /setup returns the serving model version, so Label Studio re-asks for predictions after a
  promotion; before any model exists it is ``untrained``, and /predict answers empty items;
- /predict always answers one item per task, in order;
- /webhook records the event and returns; the work happens in the background.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select

from backend.api.auth import authorize
from backend.api.json_body import request_body, request_json_object
from backend.api.state import AppState, state_of
from backend.db.models import ModelVersion, Project
from backend.db.session import unit_of_work
from backend.errors import InvalidInput
from backend.labelstudio.payloads import HANDLED_ACTIONS, LsTask, ls_project_id_of
from backend.services.predictions import UNTRAINED, predict_tasks
from backend.services.webhooks import record_event

log = logging.getLogger(__name__)

bp = Blueprint("ls_protocol", __name__)

MODEL_NAME = "sonoseg U-Mamba"


def _state() -> AppState:
    return state_of()


def _json_object() -> Mapping[str, Any]:
    """The request body as a JSON object, or a 4xx that says what is wrong with it."""
    return request_json_object(request)


@bp.before_request
def _authenticate() -> None:
    state = _state()
    authorize(request, state.settings, webhook=request.endpoint == "ls_protocol.webhook")


@bp.get("/")
@bp.get("/health")
def health() -> Response:
    """Always 200 while the process serves. ``scheduler`` says whether a beat was seen lately
    (queued training runs move only then); read from a per-process cache that a background thread
    refreshes at most every few seconds, so this view never waits on the database."""
    from backend.services.scheduler import SchedulerHealthCache

    state = _state()
    cache = current_app.extensions.get("sonoseg.scheduler_health")
    if not isinstance(cache, SchedulerHealthCache):
        cache = current_app.extensions["sonoseg.scheduler_health"] = SchedulerHealthCache(state.factory, state.settings)
    return jsonify(
        {
            "status": "UP",
            "model_class": MODEL_NAME,
            "serving_models": len(state.holder.snapshot()),
            "scheduler": cache.get().to_json(),
        }
    )


@bp.post("/setup")
def setup() -> Response:
    body = _json_object()
    ls_project_id = ls_project_id_of(body.get("project"))
    schema = body.get("schema")
    if schema is not None and not isinstance(schema, str):
        raise InvalidInput("'schema' must be the label config XML as a string")
    state = _state()
    project = state.mirror.project_ref(ls_project_id, schema or None)
    version = state.holder.uid(project.project_id) or UNTRAINED
    return jsonify({"model_version": version})


@bp.post("/predict")
def predict() -> Response:
    body = _json_object()
    raw_tasks = body.get("tasks")
    if not isinstance(raw_tasks, list):
        raise InvalidInput("'tasks' must be a list of Label Studio tasks")
    tasks = []
    for i, task in enumerate(raw_tasks):
        try:
            tasks.append(LsTask.parse(task))
        except InvalidInput as exc:
            raise InvalidInput(f"task #{i}: {exc.message}") from exc
    label_config = body.get("label_config")
    if label_config is not None and not isinstance(label_config, str):
        raise InvalidInput("'label_config' must be the label config XML as a string")
    if "project" not in body:
        raise InvalidInput("'project' is missing: sonoseg needs Label Studio's project id")
    state = _state()
    project = state.mirror.project_ref(ls_project_id_of(body.get("project")), label_config or None)
    model = state.holder.get(project.project_id)
    answers = predict_tasks(state.mirror, model, project, tasks)
    state.metrics.predictions.labels(kind="model" if model is not None else UNTRAINED).inc(len(answers))
    empty = sum(1 for a in answers if not a.result)
    if model is not None and empty:
        state.metrics.prediction_failures.inc(empty)
    return jsonify({"results": [a.to_json() for a in answers]})


@bp.post("/webhook")
def webhook() -> Response:
    body = _json_object()
    state = _state()
    try:
        with unit_of_work(state.factory) as session:
            recorded = record_event(session, body)
    except InvalidInput:
        action = body.get("action")
        # A label value per client-chosen string would grow the series without bound.
        label = action if isinstance(action, str) and action in HANDLED_ACTIONS else "other"
        state.metrics.webhooks.labels(action=label, outcome="rejected").inc()
        raise
    if not recorded.handled:
        outcome = "ignored"
    else:
        outcome = "recorded" if recorded.created else "duplicate"
        if recorded.created:
            state.nudge_events()
    state.metrics.webhooks.labels(action=recorded.action if recorded.handled else "other", outcome=outcome).inc()
    return jsonify({"status": outcome, "action": recorded.action, "event": recorded.event_id})


@bp.get("/versions")
def versions() -> Response:
    """Model versions of the project Label Studio asks about (all projects when it does not say)."""
    body = _json_object() if request_body(request).strip() else None
    raw_project = body.get("project") if body is not None else request.args.get("project")
    state = _state()
    with unit_of_work(state.factory) as session:
        stmt = select(ModelVersion.uid).where(ModelVersion.checkpoint_key.is_not(None)).order_by(ModelVersion.id)
        if raw_project:
            ls_id = ls_project_id_of(raw_project)
            stmt = stmt.join(Project, Project.id == ModelVersion.project_id).where(Project.ls_project_id == ls_id)
        uids = list(session.scalars(stmt))
    return jsonify({"versions": uids})
