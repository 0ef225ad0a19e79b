"""Bad input gets a 4xx with a message; the server keeps serving; nothing stored is damaged.
And: basic auth on every route, the webhook secret, request size limits, no credential in logs."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from backend.api.app import AppState, create_app
from backend.db.models import Image, MaskVersion, Prediction, Project, WebhookEvent
from backend.db.session import SessionFactory, unit_of_work
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.settings import Settings

PROJECT = "3.1700000000"
USER, PASSWORD, SECRET, API_KEY = "ls-user", "pa55-w0rd-xyz", "hook-secret-123", "apikey-0123456789abcdef"


def counts(factory: SessionFactory) -> dict[str, int]:
    with unit_of_work(factory) as session:
        return {
            model.__name__: int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (Project, Image, MaskVersion, Prediction, WebhookEvent)
        }


@pytest.fixture
def client(settings: Settings) -> Iterator[tuple[FlaskClient, AppState]]:
    app = create_app(settings.replace(max_request_bytes=64 * 1024), start_background=False)
    state: AppState = app.extensions["sonoseg"]
    c = app.test_client()
    assert c.post("/setup", json={"project": PROJECT, "schema": DEFAULT_LABEL_CONFIG}).status_code == 200
    yield c, state
    state.close()


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/predict", b"{not json", 400, "not valid JSON"),
        ("/predict", b"", 400, "empty"),
        ("/predict", b"[1, 2]", 400, "expected a JSON object"),
        ("/predict", b'{"project": "3.1"}', 400, "'tasks' must be a list"),
        ("/predict", b'{"tasks": {"id": 1}, "project": "3.1"}', 400, "'tasks' must be a list"),
        ("/predict", b'{"tasks": [1], "project": "3.1"}', 400, "task #0: a task must be a JSON object"),
        ("/predict", b'{"tasks": []}', 400, "'project' is missing"),
        ("/predict", b'{"tasks": [], "project": "abc"}', 400, "project id"),
        (
            "/predict",
            b'{"tasks": [{"id": 1, "data": {}}], "project": "3.1", "label_config": "<View><Image name=\\"i\\" value=\\"$i\\"/></View>"}',
            400,
            "no <BrushLabels>",
        ),
        ("/predict", b'{"tasks": [], "project": "3.1", "label_config": "<View><oops"}', 400, "not valid XML"),
        ("/predict", b'{"tasks": [], "project": "3.1", "label_config": 5}', 400, "label config XML"),
        ("/predict", b'{"tasks": [], "project": "99.1"}', 404, "has not been set up"),
        (
            "/setup",
            b'{"project": "3.1", "schema": "<View><Brush name=\\"b\\" toName=\\"i\\"/><Image name=\\"i\\" value=\\"$i\\"/></View>"}',
            400,
            "<Brush>",
        ),
        ("/setup", b'{"schema": "x"}', 400, "project id"),
        ("/webhook", b"{broken", 400, "not valid JSON"),
        ("/webhook", b'"ANNOTATION_CREATED"', 400, "expected a JSON object"),
        ("/webhook", b'{"no_action": 1}', 400, "'action'"),
        ("/webhook", b'{"action": "ANNOTATION_CREATED", "project": {"id": 3}}', 400, "no 'annotation'"),
        (
            "/webhook",
            b'{"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": "x"}}',
            400,
            "integer 'id'",
        ),
        (
            "/webhook",
            b'{"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1, "result": []}}',
            400,
            "no task id",
        ),
        (
            "/webhook",
            (
                b'{"action": "ANNOTATION_UPDATED", "project": {"id": 3}, "annotation": {"id": 1, "result": "x"}, '
                b'"task": {"id": 2}}'
            ),
            400,
            "'result' must be a list",
        ),
        (
            "/webhook",
            b'{"action": "ANNOTATIONS_DELETED", "project": {"id": 3}, "annotations": [{"id": "1"}]}',
            400,
            "'annotations'",
        ),
        ("/webhook", b'{"action": "TASKS_DELETED", "project": {"id": 3}, "tasks": 5}', 400, "'tasks'"),
        ("/webhook", b'{"action": "START_TRAINING"}', 400, "project id"),
        (
            "/webhook",
            (
                b'{"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 1, "result": [], '
                b'"task": 2, "x": NaN}}'
            ),
            400,
            "not valid JSON",
        ),
    ],
)
def test_bad_input_is_a_4xx_with_a_message_and_changes_nothing(
    client: tuple[FlaskClient, AppState], path: str, body: bytes, status: int, message: str
) -> None:
    c, state = client
    before = counts(state.factory)
    resp = c.post(path, data=body, content_type="application/json")
    assert resp.status_code == status
    payload = resp.get_json()
    assert payload["status"] == "error" and message in payload["error"]
    assert counts(state.factory) == before
    assert c.get("/health").status_code == 200  # still serving


def test_http_errors_are_json_too(client: tuple[FlaskClient, AppState]) -> None:
    c, _ = client
    assert c.get("/predict").status_code == 405
    assert c.get("/predict").get_json()["status"] == "error"
    assert c.get("/nope").status_code == 404


def test_oversized_bodies_are_refused_with_413(client: tuple[FlaskClient, AppState]) -> None:
    c, state = client
    before = counts(state.factory)
    big = b'{"tasks": [], "project": "3.1", "pad": "' + b"x" * (70 * 1024) + b'"}'
    for path in ("/predict", "/webhook", "/setup"):
        resp = c.post(path, data=big, content_type="application/json")
        assert resp.status_code == 413
        assert "SONOSEG_MAX_REQUEST_BYTES" in resp.get_json()["error"]
    assert counts(state.factory) == before


def test_unknown_webhook_actions_are_acknowledged_and_not_stored(client: tuple[FlaskClient, AppState]) -> None:
    c, state = client
    resp = c.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 3}})
    assert resp.status_code == 200 and resp.get_json()["status"] == "ignored"
    assert counts(state.factory)["WebhookEvent"] == 0


# -- security -----------------------------------------------------------------------------------------
def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def secured(settings: Settings) -> Iterator[tuple[FlaskClient, AppState]]:
    app = create_app(
        settings.replace(
            basic_auth_user=USER,
            basic_auth_password=PASSWORD,
            webhook_secret=SECRET,
            label_studio_url="http://127.0.0.1:9",
            label_studio_api_key=API_KEY,
        ),
        start_background=False,
    )
    state: AppState = app.extensions["sonoseg"]
    yield app.test_client(), state
    state.close()


def test_basic_auth_guards_every_route(secured: tuple[FlaskClient, AppState]) -> None:
    c, _ = secured
    ok = basic(USER, PASSWORD)
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/", None),
        ("GET", "/health", None),
        ("GET", "/versions", None),
        ("GET", "/metrics", None),
        ("POST", "/setup", {"project": PROJECT, "schema": DEFAULT_LABEL_CONFIG}),
        ("POST", "/predict", {"tasks": [], "project": PROJECT, "label_config": DEFAULT_LABEL_CONFIG}),
    ]
    for method, path, body in calls:
        for headers in (
            {},
            basic(USER, "wrong"),
            basic("other", PASSWORD),
            {"Authorization": "Basic !!!"},
            {"Authorization": f"Token {PASSWORD}"},
        ):
            resp = c.open(path, method=method, json=body, headers=headers)
            assert resp.status_code == 401, (path, headers)
            assert resp.headers["WWW-Authenticate"].startswith("Basic")
        assert c.open(path, method=method, json=body, headers=ok).status_code == 200, path


def test_webhook_takes_the_secret_header_or_token_or_basic_auth(secured: tuple[FlaskClient, AppState]) -> None:
    c, state = client_state = secured
    del client_state
    event = {"action": "START_TRAINING", "project": {"id": 3, "label_config": DEFAULT_LABEL_CONFIG}}
    assert c.post("/webhook", json=event).status_code == 401
    assert c.post("/webhook", json=event, headers={"X-Sonoseg-Webhook-Secret": "wrong"}).status_code == 401
    assert c.post("/webhook?token=wrong", json=event).status_code == 401
    assert counts(state.factory)["WebhookEvent"] == 0
    assert c.post("/webhook", json=event, headers={"X-Sonoseg-Webhook-Secret": SECRET}).status_code == 200
    assert c.post(f"/webhook?token={SECRET}", json=event).get_json()["status"] == "duplicate"
    # Label Studio's ML client posts Start Training to /webhook with the connection's basic auth.
    assert c.post("/webhook", json=event, headers=basic(USER, PASSWORD)).status_code == 200
    assert counts(state.factory)["WebhookEvent"] == 1


def test_no_credential_is_ever_written_to_the_log(
    secured: tuple[FlaskClient, AppState], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    c, state = secured
    caplog.set_level(logging.DEBUG)
    c.get("/health", headers=basic(USER, "guess-" + PASSWORD))
    c.post("/webhook?token=" + SECRET + "x", json={"action": "START_TRAINING", "project": {"id": 3}})
    c.post(f"/webhook?token={SECRET}", json={"action": "START_TRAINING", "project": {"id": 3}})
    body = {
        "tasks": [{"id": 1, "data": {"image": "/data/upload/3/a.png"}}],
        "project": PROJECT,
        "label_config": DEFAULT_LABEL_CONFIG,
    }
    assert c.post("/predict", json=body, headers=basic(USER, PASSWORD)).status_code == 200  # LS unreachable: empty
    from backend.api.app import EventDrainer

    EventDrainer(
        state.mirror, state.settings, state.metrics
    ).drain_once()  # START_TRAINING tries to reconcile: fails, logged
    text = caplog.text
    assert "a.png" in text  # the failures were logged...
    for secret in (PASSWORD, SECRET, API_KEY):
        assert secret not in text  # ...without any credential


def test_every_core_error_class_has_an_http_status_from_the_one_table() -> None:
    """The core error classes carry no HTTP; the API's table covers each of them (by MRO)."""
    import backend.errors as core
    from backend.api.errors import HTTP_STATUS, http_status_of

    classes = [c for c in vars(core).values() if isinstance(c, type) and issubclass(c, core.SonosegError)]
    assert len(classes) >= 10
    for cls in classes:
        assert not hasattr(cls, "http_status"), cls
        status = http_status_of(cls("x"))
        assert 400 <= status <= 599, cls
    assert http_status_of(core.UnknownLabel("x")) == 400 and http_status_of(core.PayloadTooLarge("x")) == 413
    assert http_status_of(core.InvalidImage("x")) == 422 and HTTP_STATUS[core.NotReady] == 503
