"""``GET /api/next``: the images a sonographer should label next, leased to them (active learning).

The same answer as ``sonoseg next --json`` (:mod:`backend.services.worklist`), behind the same basic
auth as every other non-webhook route. Query parameters: ``project`` (name or id), ``annotator``
(required), ``n`` (1..100, default 1), ``ttl`` (seconds, default 1800), ``strategy`` (default: the
project's). A bad parameter is a 400 with a message, an unknown project a 404.

It is a GET that writes (the leases), as the work list is a read from the annotator's point of view;
asking again is safe (own live leases come back first, renewed), so a retried or prefetched GET
never takes more images than asked for.
"""

from __future__ import annotations

import math

from flask import Blueprint, Response, jsonify, request

from backend.api.auth import authorize
from backend.api.state import state_of
from backend.db.session import unit_of_work
from backend.errors import InvalidInput
from backend.services.projects import get_project
from backend.services.worklist import DEFAULT_TTL_SECONDS, MAX_BATCH, check_annotator, check_batch, check_ttl, hand_out

bp = Blueprint("worklist", __name__)

MAX_PARAM_CHARS = 200


def _param(name: str) -> str | None:
    value = request.args.get(name)
    if value is not None and len(value) > MAX_PARAM_CHARS:
        raise InvalidInput(f"the {name!r} parameter is over {MAX_PARAM_CHARS} characters")
    if value is not None and not value.isprintable():  # NUL and friends: PostgreSQL text refuses NUL
        raise InvalidInput(f"the {name!r} parameter holds control characters")
    return value


def _count(value: str | None) -> int:
    if value is None or value == "":
        return 1
    try:
        n = int(value.strip())
    except ValueError as exc:
        raise InvalidInput(f"n must be a whole number from 1 to {MAX_BATCH}, got {value!r}") from exc
    return check_batch(n)


def _seconds(value: str | None) -> float:
    if value is None or value == "":
        return DEFAULT_TTL_SECONDS
    try:
        ttl = float(value.strip())
    except ValueError as exc:
        raise InvalidInput(f"ttl must be a number of seconds, got {value!r}") from exc
    if not math.isfinite(ttl):
        raise InvalidInput(f"ttl must be a finite number of seconds, got {value!r}")
    return check_ttl(ttl)


@bp.get("/api/next")
def next_images() -> Response:
    state = state_of()
    authorize(request, state.settings)
    project_ref = (_param("project") or "").strip()
    if not project_ref:
        raise InvalidInput(
            "the 'project' parameter (a project name or id) is required: /api/next?project=P&annotator=A"
        )
    annotator = check_annotator(_param("annotator"))
    n = _count(_param("n"))
    ttl = _seconds(_param("ttl"))
    strategy = _param("strategy") or None
    with unit_of_work(state.factory) as session:
        project = get_project(session, project_ref)
        answer = hand_out(session, project, annotator, n, ttl_seconds=ttl, strategy=strategy)
    return jsonify(answer.to_json())
