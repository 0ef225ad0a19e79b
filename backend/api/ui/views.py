"""The dashboard's routes under ``/ui``: read-only pages, two buttons (promote, rollback).

Each view opens one unit of work, calls :mod:`backend.services.dashboard` for typed page data and
renders a Jinja template (charts are inline SVG from :mod:`.charts`). The same basic auth as the
ML-backend routes guards every route and asset; the POSTs also need the CSRF token of
:mod:`.csrf`. Promote and rollback call :func:`backend.services.versions.promote` /
:func:`~backend.services.versions.rollback`, as ``sonoseg models promote/rollback`` do.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, current_app, jsonify, redirect, render_template, request, url_for
from markupsafe import Markup
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import NotFound as HTTPNotFound
from werkzeug.wrappers import Response as WerkzeugResponse

from backend.api.auth import authorize
from backend.api.errors import http_status_of
from backend.api.state import AppState, state_of
from backend.api.ui import charts, csrf
from backend.api.ui.background import Refresher
from backend.db.session import unit_of_work
from backend.errors import NotFound, SonosegError
from backend.services import dashboard, versions
from backend.services.dashboard import PageCache, ProjectRef

log = logging.getLogger(__name__)

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static")

UI_EXTENSION_KEY = "sonoseg.ui"
POLL_SECONDS = 2.0
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_init_lock = threading.Lock()
T = TypeVar("T")


@dataclass
class UiState:
    """Per app (per gunicorn worker): the page cache, the background computations, the CSRF key."""

    cache: PageCache
    refresher: Refresher
    csrf_key: bytes


def ui_state(app: Flask | None = None) -> UiState:
    """The dashboard's per-app state, made on first use (``create_app`` only registers the blueprint)."""
    extensions = (app or current_app).extensions
    ui = extensions.get(UI_EXTENSION_KEY)
    if isinstance(ui, UiState):
        return ui
    with _init_lock:
        ui = extensions.get(UI_EXTENSION_KEY)
        if not isinstance(ui, UiState):
            state = state_of(app)
            cache = PageCache(state.settings.data_dir / "cache" / "ui", state.store)
            ui = UiState(cache, Refresher(), csrf.csrf_key(state.settings))
            extensions[UI_EXTENSION_KEY] = ui
    return ui


# -- guards, headers, errors ----------------------------------------------------------------------
@bp.before_request
def _authenticate() -> None:
    authorize(request, state_of().settings)


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


class CsrfRefused(HTTPException):
    code = 403
    description = (
        "this form needs the dashboard's CSRF token: reload the page and press the button again "
        "(a form posted from another site is refused)"
    )


def _wants_json() -> bool:
    return request.path.endswith(".json")


def _error_page(status: int, message: str) -> tuple[Response | str, int]:
    if _wants_json():
        return jsonify({"status": "error", "error": message}), status
    return render_template("ui/error.html", status=status, message=message), status


@bp.errorhandler(SonosegError)
def _sonoseg_error(exc: SonosegError) -> tuple[Response | str, int] | Response:
    status = http_status_of(exc)
    body, code = _error_page(status, exc.message)
    if status == 401:
        response = current_app.make_response((body, code))
        response.headers["WWW-Authenticate"] = 'Basic realm="sonoseg"'
        return response
    return body, code


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> tuple[Response | str, int]:
    return _error_page(exc.code or 500, exc.description or exc.name)


# -- template helpers ---------------------------------------------------------------------------------
def _when(t: dt.datetime | None) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if t is not None else "-"


def _ago(t: dt.datetime | None) -> str:
    if t is None:
        return ""
    seconds = (dt.datetime.now(dt.UTC) - t).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{max(0, int(seconds))} s ago"


def _num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


@bp.context_processor
def _helpers() -> dict[str, Any]:
    return {
        "csrf_field": csrf.FIELD,
        "csrf_token": csrf.token(ui_state().csrf_key),
        "when": _when,
        "ago": _ago,
        "num": _num,
        "pct": _pct,
        "poll_ms": int(POLL_SECONDS * 1000),
    }


def _project(state: AppState, session: Session, project_id: int) -> ProjectRef:
    return dashboard.project_ref(session, project_id, label_studio_url=state.settings.label_studio_url)


def _project_page(project_id: int, read: Callable[[Session, ProjectRef], T]) -> tuple[ProjectRef, T]:
    """The project's header and ``read(session, project)``, in one unit of work."""
    state = state_of()
    with unit_of_work(state.factory) as session:
        project = _project(state, session, project_id)
        return project, read(session, project)


# -- pages ----------------------------------------------------------------------------------------
@bp.get("")
def root() -> WerkzeugResponse:
    return redirect(url_for("ui.projects"))


@bp.get("/")
def projects() -> str:
    state = state_of()
    with unit_of_work(state.factory) as session:
        rows = dashboard.overview(session, label_studio_url=state.settings.label_studio_url)
    return render_template("ui/overview.html", projects=rows, page="projects", project=None)


@bp.get("/projects/<int:project_id>/")
def project_home(project_id: int) -> WerkzeugResponse:
    return redirect(url_for("ui.models", project_id=project_id))


def _timeline_charts(timeline: dashboard.Timeline) -> tuple[Markup, Markup | None]:
    classes = timeline.classes

    def point(v: dashboard.VersionRow, x: float) -> charts.Point:
        by_name = {c.name: c.dice for c in v.per_class}
        label = f"{v.uid} ({v.status}) {timeline.gate_metric} {_num(v.gate_score)}; created {_when(v.created_at)}" + (
            f"; {v.n_train} training images" if v.n_train is not None else ""
        )
        return charts.Point(v.uid, x, v.gate_score, label, v.serving, v.status, tuple(by_name.get(c) for c in classes))

    # both charts: the gate metric over the versions, one extra series per class
    scatter = functools.partial(charts.scatter, y_label=timeline.gate_metric, series_names=classes)
    over_time = scatter(
        [point(v, v.created_at.timestamp()) for v in timeline.versions],
        title=f"{timeline.gate_metric} on the validation images, by version (x: when it was trained)",
        x_label="created (UTC)",
        time_axis=True,
        css_id="chart-time",
    )
    with_n = [v for v in timeline.versions if v.n_train is not None]
    over_n = (
        scatter(
            [point(v, float(v.n_train or 0)) for v in with_n],
            title=f"{timeline.gate_metric} by the number of labelled training images",
            x_label="labelled training images (metrics.n_train)",
            time_axis=False,
            css_id="chart-ntrain",
        )
        if with_n
        else None
    )
    return over_time, over_n


@bp.get("/projects/<int:project_id>/models")
def models(project_id: int) -> str:
    state = state_of()
    project, timeline = _project_page(
        project_id, functools.partial(dashboard.model_timeline, gate_metric=state.settings.gate_metric)
    )
    over_time, over_n = _timeline_charts(timeline)
    done, uid = request.args.get("done"), request.args.get("uid")
    notice = None
    if done in ("promote", "rollback") and uid and uid == timeline.serving_uid:  # never echo a made-up claim
        notice = f"{uid} is serving now" + (" (rolled back)" if done == "rollback" else "")
    return render_template(
        "ui/models.html",
        page="models",
        project=project,
        timeline=timeline,
        chart_time=over_time,
        chart_ntrain=over_n,
        notice=notice,
        served_here=state.holder.uid(project_id),
    )


def _check_csrf() -> None:
    given = request.form.get(csrf.FIELD) or request.headers.get(csrf.HEADER)
    if not csrf.valid(ui_state().csrf_key, given):
        log.warning("dashboard: %s %s refused: missing or wrong CSRF token", request.method, request.path)
        raise CsrfRefused()


def _serve_new_version(state: AppState) -> None:
    """Load the new serving model in this process now (the others poll within seconds)."""
    try:
        state.holder.refresh()
        state.metrics.model_loaded.set(len(state.holder.snapshot()))
    except Exception:  # the change is committed; the poller will retry the load
        log.exception("dashboard: reloading the serving models failed; the poller will retry")


@bp.post("/projects/<int:project_id>/models/promote")
def promote(project_id: int) -> WerkzeugResponse:
    _check_csrf()
    uid = request.form.get("version", "").strip()
    if not uid:
        raise NotFound("no model version given: use the Promote button of a version")
    state = state_of()
    with unit_of_work(state.factory) as session:
        version = versions.get_version(session, uid)
        if version.project_id != project_id:
            raise NotFound(f"model version {uid!r} is not a version of project {project_id}")
        previous = versions.promote(session, version, reason="promoted by hand (dashboard)")
        log.info(
            "dashboard: %s promoted to serve project %s (was %s)", uid, project_id, previous.uid if previous else None
        )
    _serve_new_version(state)
    return redirect(url_for("ui.models", project_id=project_id, done="promote", uid=uid), 303)


@bp.post("/projects/<int:project_id>/models/rollback")
def rollback(project_id: int) -> WerkzeugResponse:
    _check_csrf()
    state = state_of()
    with unit_of_work(state.factory) as session:
        _project(state, session, project_id)
        uid = versions.rollback(session, project_id).uid
        log.info("dashboard: project %s rolled back to %s", project_id, uid)
    _serve_new_version(state)
    return redirect(url_for("ui.models", project_id=project_id, done="rollback", uid=uid), 303)


@bp.get("/projects/<int:project_id>/effort")
def effort(project_id: int) -> str:
    project, data = _project_page(project_id, dashboard.correction_effort)
    accepted_from = round(data.accepted_dice * data.bins)
    histograms = [
        charts.histogram(
            row.bins, accepted_from=accepted_from, title=f"correction Dice of predictions by {row.model_uid}"
        )
        for row in data.rows
    ]
    return render_template(
        "ui/effort.html",
        page="effort",
        project=project,
        effort=data,
        rows=list(zip(data.rows, histograms, strict=True)),
    )


@bp.get("/projects/<int:project_id>/runs")
def runs(project_id: int) -> str:
    project, data = _project_page(project_id, dashboard.training_runs)
    return render_template("ui/runs.html", page="runs", project=project, runs=data)


@bp.get("/projects/<int:project_id>/runs.json")
def runs_json(project_id: int) -> Response:
    _header, data = _project_page(project_id, dashboard.training_runs)
    return jsonify(data.to_json())


# -- pages computed in the background -------------------------------------------------------------------
def _ensure_stats(state: AppState, ui: UiState, page: dashboard.DatasetPage) -> None:
    if not page.class_stats_current and page.labelled:
        pid = page.project.id
        ui.refresher.request(
            dashboard.STATS_KIND,
            pid,
            page.digest,
            lambda: dashboard.compute_class_stats(state.factory, state.store, ui.cache, pid),
        )


def _dataset(project_id: int) -> tuple[AppState, UiState, dashboard.DatasetPage]:
    state, ui = state_of(), ui_state()
    with unit_of_work(state.factory) as session:
        page = dashboard.dataset_page(session, ui.cache, _project(state, session, project_id))
    _ensure_stats(state, ui, page)
    return state, ui, page


def _progress(ui: UiState, kind: str, project_id: int, digest: str, current: bool) -> dict[str, object]:
    return {
        "digest": digest,
        "current": current,
        "busy": ui.refresher.busy(kind, project_id),
        "failure": ui.refresher.failure(kind, project_id, digest),
    }


@bp.get("/projects/<int:project_id>/dataset")
def dataset(project_id: int) -> str:
    _state, ui, page = _dataset(project_id)
    split_chart = charts.bars(
        [charts.Bar(f"{s.split}: labelled", s.labelled, f"{s.labelled} of {s.images}") for s in page.splits]
        + [charts.Bar(f"{s.split}: unlabelled", s.unlabelled, str(s.unlabelled)) for s in page.splits],
        title="images per split",
    )
    class_charts = []
    if page.class_stats is not None:
        cs = page.class_stats.classes
        class_charts = [
            charts.bars(
                [charts.Bar(c.name, c.images, f"{c.images} images") for c in cs],
                title="labelled images containing the class",
            ),
            charts.bars(
                [charts.Bar(c.name, c.prevalence, _pct(c.prevalence)) for c in cs], title="share of labelled pixels"
            ),
            charts.bars(
                [charts.Bar(c.name, c.objects, f"{c.objects} objects") for c in cs],
                title="objects (8-connected components)",
            ),
            charts.bars(
                [charts.Bar(c.name, c.median_size or 0.0, f"{c.median_size or 0:g} px") for c in cs],
                title="median object size (pixels)",
            ),
        ]
    return render_template(
        "ui/dataset.html",
        page="dataset",
        project=page.project,
        data=page,
        split_chart=split_chart,
        class_charts=class_charts,
        progress=_progress(ui, dashboard.STATS_KIND, project_id, page.digest, page.class_stats_current),
    )


@bp.get("/projects/<int:project_id>/dataset.json")
def dataset_json(project_id: int) -> Response:
    _state, ui, page = _dataset(project_id)
    return jsonify(_progress(ui, dashboard.STATS_KIND, project_id, page.digest, page.class_stats_current))


def _review(project_id: int) -> tuple[UiState, dashboard.ReviewPage]:
    state, ui = state_of(), ui_state()
    with unit_of_work(state.factory) as session:
        page = dashboard.review_page(session, ui.cache, _project(state, session, project_id))
    if not page.current:
        ui.refresher.request(
            dashboard.REVIEW_KIND,
            project_id,
            page.digest,
            # stored predictions only: bulk inference in the server would compete with /predict
            lambda: dashboard.compute_review(state.factory, state.store, ui.cache, project_id),
        )
    return ui, page


@bp.get("/projects/<int:project_id>/review")
def review(project_id: int) -> str:
    ui, page = _review(project_id)
    return render_template(
        "ui/review.html",
        page="review",
        project=page.project,
        data=page,
        progress=_progress(ui, dashboard.REVIEW_KIND, project_id, page.digest, page.current),
    )


@bp.get("/projects/<int:project_id>/review.json")
def review_json(project_id: int) -> Response:
    ui, page = _review(project_id)
    return jsonify(_progress(ui, dashboard.REVIEW_KIND, project_id, page.digest, page.current))


@bp.get("/thumbnails/<sha256>.png")
def thumbnail(sha256: str) -> Response:
    key = dashboard.thumbnail_key(sha256)
    if key is None:
        raise HTTPNotFound("not a thumbnail name")
    data = state_of().store.get_bytes(key)  # NotFound -> 404
    response = Response(data, mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=86400, immutable"  # content-addressed
    return response


@bp.get("/projects/<int:project_id>/next")
def next_images(project_id: int) -> str:
    project, data = _project_page(project_id, dashboard.next_to_label)
    return render_template("ui/next.html", page="next", project=project, next=data)
