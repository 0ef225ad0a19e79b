"""The Flask application factory of the Label Studio ML backend.

``create_app`` builds a new, independent app on every call (tests pass their own settings):
its engine and session factory, blob store, Label Studio client, model holder, metrics and,
with ``start_background=True``, two daemon threads: the model poller (hot-swaps promoted
models) and the webhook event drainer (turns recorded events into mask versions every ~0.5 s).

Production runs it under gunicorn (``sonoseg serve --workers N``): each worker calls the
factory after the fork, so threads and database connections are never shared across processes.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from flask import Flask, Response, g, request
from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool

from backend.api import ls_protocol
from backend.api.auth import authorize
from backend.api.errors import install_error_handlers
from backend.api.metrics import CONTENT_TYPE_LATEST, Metrics
from backend.db.migrate import require_up_to_date
from backend.db.session import SessionFactory, make_engine, make_session_factory
from backend.labelstudio.images import TaskImageFetcher
from backend.services.serving import Loader, ModelHolder, load_from_store
from backend.services.sync import LabelStudioMirror
from backend.services.webhooks import process_pending_events
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from backend.storage.private import private_dir

log = logging.getLogger(__name__)

EVENT_DRAIN_SECONDS = 0.5


class EventDrainer:
    """Processes pending webhook events in a daemon thread: every ~0.5 s, or at once when nudged."""

    def __init__(self, mirror: LabelStudioMirror, metrics: Metrics, interval: float = EVENT_DRAIN_SECONDS) -> None:
        self._mirror = mirror
        self._metrics = metrics
        self._interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def nudge(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sonoseg-webhook-events", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain_once(self) -> int:
        report = process_pending_events(self._mirror)
        for result, count in (("processed", report.processed), ("ignored", report.ignored), ("failed", report.failed)):
            if count:
                self._metrics.events_processed.labels(result=result).inc(count)
        return report.total

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                while self.drain_once() and not self._stop.is_set():
                    pass  # a full batch: there may be more right away
            except Exception:  # the database may be briefly unavailable; the next round retries
                log.exception("webhook event processing failed; retrying in %.1f s", self._interval)


@dataclass
class AppState:
    """Everything the views need, built once per app (per gunicorn worker)."""

    settings: Settings
    engine: Engine
    factory: SessionFactory
    store: LocalBlobStore
    fetcher: TaskImageFetcher
    mirror: LabelStudioMirror
    holder: ModelHolder
    metrics: Metrics
    drainer: EventDrainer
    background: bool = False
    _closed: bool = field(default=False, repr=False)

    def nudge_events(self) -> None:
        if self.background:
            self.drainer.nudge()

    def close(self) -> None:
        """Stop the background threads and release database connections (tests, shutdown)."""
        if self._closed:
            return
        self._closed = True
        self.drainer.stop()
        self.holder.stop()
        self.engine.dispose()


def create_app(
    settings: Settings | None = None, *, start_background: bool = True, loader: Loader | None = None
) -> Flask:
    """A new app on ``settings`` (default: the environment). Refuses an un-migrated database.

    ``loader`` replaces how a serving model version becomes a predictor (tests).
    """
    settings = settings or Settings.from_env()
    private_dir(settings.data_dir)
    # A long-lived server keeps its SQLite connections: with NullPool every unit of work closes
    # the last connection, and SQLite checkpoints the WAL (an fsync, ~10 ms) on that close.
    engine = make_engine(settings.database_url, poolclass=QueuePool if settings.is_sqlite else None)
    require_up_to_date(engine)
    factory = make_session_factory(engine)
    store = LocalBlobStore(settings.store_dir)
    fetcher = TaskImageFetcher.from_settings(settings)
    mirror = LabelStudioMirror(settings, factory, store, fetcher)
    holder = ModelHolder(factory, loader or load_from_store(store, settings), poll_seconds=settings.model_poll_seconds)
    metrics = Metrics.create()
    state = AppState(
        settings,
        engine,
        factory,
        store,
        fetcher,
        mirror,
        holder,
        metrics,
        EventDrainer(mirror, metrics),
        background=start_background,
    )
    _warn_about_configuration(settings)

    app = Flask("sonoseg")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["sonoseg"] = state
    app.register_blueprint(ls_protocol.bp)
    install_error_handlers(app)
    _install_metrics(app, state)

    if start_background:
        holder.refresh()  # load the serving models before the first request, not in one
        metrics.model_loaded.set(len(holder.snapshot()))
        holder.start()
        state.drainer.start()
    return app


def _install_metrics(app: Flask, state: AppState) -> None:
    @app.before_request
    def _start_timer() -> None:
        g.sonoseg_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        started = getattr(g, "sonoseg_started", None)
        if started is not None:
            state.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)
        state.metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        authorize(request, state.settings)
        state.metrics.model_loaded.set(len(state.holder.snapshot()))
        return Response(state.metrics.render(), mimetype=CONTENT_TYPE_LATEST)


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
