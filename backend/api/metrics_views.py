"""The ``/metrics`` blueprint: counts and times every request of the app, and serves the scrape."""

from __future__ import annotations

import time

from flask import Blueprint, Response, g, request

from backend.api.auth import authorize
from backend.api.metrics import CONTENT_TYPE_LATEST
from backend.api.state import state_of

bp = Blueprint("metrics", __name__)


@bp.before_app_request
def _start_timer() -> None:
    g.sonoseg_started = time.perf_counter()


@bp.after_app_request
def _count(response: Response) -> Response:
    metrics = state_of().metrics
    endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
    started = getattr(g, "sonoseg_started", None)
    if started is not None:
        metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - started)
    metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
    return response


@bp.get("/metrics")
def scrape() -> Response:
    state = state_of()
    authorize(request, state.settings)
    state.metrics.model_loaded.set(len(state.holder.snapshot()))
    return Response(state.metrics.render(), mimetype=CONTENT_TYPE_LATEST)
