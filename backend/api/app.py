"""The Flask app: :func:`create_app` wires one :class:`~backend.runtime.Runtime` and the blueprints.

Where a request is handled: the Label Studio ML-backend protocol (``/health``, ``/setup``,
``/predict``, ``/webhook``, ``/versions``) in :mod:`backend.api.ls_protocol`, ``/metrics`` in
:mod:`backend.api.metrics_views`, ``/api/next`` (the work list) in :mod:`backend.api.worklist_views`;
errors become JSON in :mod:`backend.api.errors` (the one table of HTTP statuses); the background webhook drain is :mod:`backend.api.events`.

``create_app`` builds a new, independent app on every call (tests pass their own settings): its
runtime (engine, session factory, blob store, Label Studio link), model holder, metrics and,
with ``start_background=True``, two daemon threads: the model poller (hot-swaps promoted
models) and the webhook event drainer (turns recorded events into mask versions every ~0.5 s).

Production runs it under gunicorn (``sonoseg serve --workers N``): each worker calls the
factory after the fork, so threads and database connections are never shared across processes.
"""

from __future__ import annotations

import logging

from flask import Flask

from backend.api import ls_protocol, metrics_views, ui, worklist_views
from backend.api.errors import install_error_handlers
from backend.api.events import EVENT_DRAIN_SECONDS, EventDrainer
from backend.api.metrics import Metrics
from backend.api.state import EXTENSION_KEY, AppState
from backend.runtime import Runtime
from backend.services.serving import Loader, ModelHolder, load_from_store
from backend.settings import Settings

__all__ = ["EVENT_DRAIN_SECONDS", "AppState", "EventDrainer", "create_app"]

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, *, start_background: bool = True, loader: Loader | None = None
) -> Flask:
    """A new app on ``settings`` (default: the environment). Refuses an un-migrated database.

    ``loader`` replaces how a serving model version becomes a predictor (tests).
    """
    # A long-lived server keeps its SQLite connections (see Runtime.keep_connections).
    runtime = Runtime.from_settings(settings, keep_connections=True)
    settings = runtime.settings
    factory = runtime.factory  # refuses an un-migrated database before anything else starts
    holder = ModelHolder(
        factory, loader or load_from_store(runtime.store, settings), poll_seconds=settings.model_poll_seconds
    )
    metrics = Metrics.create()
    state = AppState(
        runtime, holder, metrics, EventDrainer(runtime.mirror, settings, metrics), background=start_background
    )
    _warn_about_configuration(settings)

    app = Flask("sonoseg")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION_KEY] = state
    app.register_blueprint(metrics_views.bp)
    app.register_blueprint(ls_protocol.bp)
    app.register_blueprint(ui.bp)  # the dashboard under /ui (docs/dashboard.md)
    app.register_blueprint(worklist_views.bp)  # /api/next: active learning's work list (docs/active-learning.md)
    install_error_handlers(app)

    if start_background:
        holder.refresh()  # load the serving models before the first request, not in one
        metrics.model_loaded.set(len(holder.snapshot()))
        holder.start()
        state.drainer.start()
    return app


def _warn_about_configuration(settings: Settings) -> None:
    if bool(settings.basic_auth_user) != bool(settings.basic_auth_password):
        log.warning("only one of SONOSEG_BASIC_AUTH_USER / _PASSWORD is set: basic auth is OFF")
    if settings.basic_auth_user and settings.basic_auth_password and not settings.webhook_secret:
        log.warning(
            "basic auth is on but SONOSEG_WEBHOOK_SECRET is not set: the webhook Label Studio creates for the model "
            "carries no credentials, so annotations will only arrive through `sonoseg sync`"
        )
    if not settings.label_studio_url or not settings.label_studio_api_key:
        log.warning("LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY not set: task images on Label Studio cannot be fetched")
