"""Hostile request bodies on every JSON route: a 4xx with a message, never a 500, nothing stored.

Items of the adversarial review this file keeps closed: deeply nested JSON (RecursionError, 500),
ids beyond the id columns (OverflowError after the event was stored), a 30 MB webhook of 15
million RLE integers stored before it failed, a chunked body over the size limit answered "not
valid JSON", and metric labels taken from the client's ``action`` string.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import func, select

from backend.db.models import MaskVersion, WebhookEvent
from backend.db.session import unit_of_work
from backend.labelstudio.payloads import MAX_ID, MAX_REGIONS, max_rle_length
from tests.support.payloads import annotation_event
from tests.support.servers import ServedApp
from tests.test_webhooks import Hooks, hooks  # noqa: F401  (the fixture)

ROUTES = ("/setup", "/predict", "/webhook")


def _events(h: Hooks) -> int:
    with unit_of_work(h.state.factory) as session:
        return int(session.scalar(select(func.count(WebhookEvent.id))) or 0)


def _post_raw(h: Hooks, route: str, body: bytes) -> Any:
    return h.client.post(route, data=body, content_type="application/json")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("depth", [65, 999, 1000, 5000, 100_000])
def test_deep_nesting_is_a_400(hooks: Hooks, route: str, depth: int) -> None:  # noqa: F811
    for opener, closer in (("[", "]"), ('{"a":', "}")):
        body = ('{"project": 1, "x": ' + opener * depth + "1" + closer * depth + "}").encode()
        resp = _post_raw(hooks, route, body)
        assert resp.status_code == 400, (route, depth, resp.get_json())
        assert "nested more than" in resp.get_json()["error"]
    assert _events(hooks) == 0


@pytest.mark.parametrize("route", ROUTES)
def test_shallow_nesting_within_the_limit_is_not_refused_for_depth(hooks: Hooks, route: str) -> None:  # noqa: F811
    body = json.dumps({"project": 1, "x": [[[[1]]]]}).encode()
    resp = _post_raw(hooks, route, body)
    assert resp.status_code < 500 and "nested" not in (resp.get_json() or {}).get("error", "")


BIG_IDS = [MAX_ID + 1, 2**63, 2**64 + 5, 10**40, -1, 0]


@pytest.mark.parametrize("bad", BIG_IDS)
@pytest.mark.parametrize("where", ["project", "task", "annotation"])
def test_ids_beyond_the_id_columns_are_a_400_and_store_nothing(hooks: Hooks, bad: int, where: str) -> None:  # noqa: F811
    event = annotation_event("ANNOTATION_CREATED", 1, 10, hooks.urls[0], hooks.masks[0])
    if where == "project":
        event["project"]["id"] = bad
    elif where == "task":
        event["task"]["id"] = bad
        event["annotation"]["task"] = bad
    else:
        event["annotation"]["id"] = bad
    resp = hooks.client.post("/webhook", json=event)
    assert resp.status_code == 400, resp.get_json()
    assert _events(hooks) == 0
    # /predict and /setup read the same ids through the same parsers
    predict = {
        "project": bad if where == "project" else "3.1",
        "label_config": event["project"]["label_config"],
        "tasks": [{"id": bad if where == "task" else 10, "data": {"image": hooks.urls[0]}}],
    }
    if where in ("project", "task"):
        assert hooks.client.post("/predict", json=predict).status_code == 400
    if where == "project":
        assert hooks.client.post("/setup", json={"project": bad, "schema": "<View/>"}).status_code == 400


def test_an_rle_longer_than_its_declared_size_allows_is_refused_before_storing(hooks: Hooks) -> None:  # noqa: F811
    event = annotation_event("ANNOTATION_CREATED", 1, 10, hooks.urls[0], hooks.masks[0])
    region = event["annotation"]["result"][0]
    limit = max_rle_length(region["original_width"], region["original_height"])
    region["value"]["rle"] = [0] * (limit + 1)
    resp = hooks.client.post("/webhook", json=event)
    assert resp.status_code == 400 and "longer than any brush stream" in resp.get_json()["error"]
    assert _events(hooks) == 0


def test_fifteen_million_integers_are_refused_not_stored(hooks: Hooks) -> None:  # noqa: F811
    event = annotation_event("ANNOTATION_CREATED", 1, 10, hooks.urls[0], hooks.masks[0])
    region = event["annotation"]["result"][0]
    region["original_width"] = region["original_height"] = 64
    body = json.dumps(event).replace('"rle": [', '"rle": [' + "0," * 15_000_000, 1).encode()
    assert len(body) > 30_000_000
    resp = _post_raw(hooks, "/webhook", body)
    assert resp.status_code == 400, resp.get_json()
    assert _events(hooks) == 0


def test_too_many_regions_are_refused(hooks: Hooks) -> None:  # noqa: F811
    event = annotation_event("ANNOTATION_CREATED", 1, 10, hooks.urls[0], hooks.masks[0])
    event["annotation"]["result"] = [{"type": "choices", "value": {"choices": ["x"]}}] * (MAX_REGIONS + 1)
    resp = hooks.client.post("/webhook", json=event)
    assert resp.status_code == 400 and f"at most {MAX_REGIONS}" in resp.get_json()["error"]
    assert _events(hooks) == 0


def test_a_refused_webhook_does_not_grow_metric_labels(hooks: Hooks) -> None:  # noqa: F811
    for i in range(20):
        hooks.client.post("/webhook", json={"action": f"ATTACK_{i}", "project": "nope"})
        hooks.client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": f"x{i}"})
    text = hooks.client.get("/metrics").get_data(as_text=True)
    assert "ATTACK_" not in text
    labels = {
        line.split('action="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("sonoseg_webhooks_total{") and 'action="' in line
    }
    assert labels <= {
        "other",
        "ANNOTATION_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_CREATED",
        "ANNOTATIONS_DELETED",
        "TASKS_DELETED",
        "START_TRAINING",
    }


def test_a_chunked_body_over_the_limit_is_a_413_not_bad_json(hooks: Hooks) -> None:  # noqa: F811
    limit = hooks.state.settings.max_request_bytes
    served = ServedApp(hooks.client.application)
    try:

        def chunks() -> Any:
            yield b'{"action": "ANNOTATION_CREATED", "x": "'
            sent = 0
            while sent <= limit + (1 << 20):
                yield b"a" * (1 << 20)
                sent += 1 << 20
            yield b'"}'

        resp = requests.post(
            served.url + "/webhook", data=chunks(), headers={"Content-Type": "application/json"}, timeout=60
        )
        assert resp.status_code == 413, resp.text[:200]
        assert "limit" in resp.json()["error"]
    finally:
        served.close()
    assert _events(hooks) == 0


# -- property-based: any JSON value in any field -----------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _mutations() -> st.SearchStrategy[tuple[str, tuple[str, ...], Any]]:
    paths = st.sampled_from(
        [
            ("action",),
            ("project",),
            ("project", "id"),
            ("project", "label_config"),
            ("task",),
            ("task", "id"),
            ("task", "data"),
            ("task", "data", "image"),
            ("task", "data", "subject"),
            ("annotation",),
            ("annotation", "id"),
            ("annotation", "task"),
            ("annotation", "result"),
            ("annotation", "updated_at"),
            ("annotation", "was_cancelled"),
            ("annotation", "completed_by"),
            ("annotation", "lead_time"),
            ("annotation", "result", 0),
            ("annotation", "result", 0, "value"),
            ("annotation", "result", 0, "value", "rle"),
            ("annotation", "result", 0, "original_width"),
            ("annotation", "result", 0, "value", "brushlabels"),
        ]
    )
    return st.tuples(st.sampled_from(["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]), paths, json_values)


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key] if isinstance(doc, (dict, list)) and (isinstance(doc, dict) or key < len(doc)) else None
        if doc is None:
            return
    if isinstance(doc, dict) or (isinstance(doc, list) and path[-1] < len(doc)):
        doc[path[-1]] = value


@hsettings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations())
def test_any_field_of_a_webhook_may_be_anything(hooks: Hooks, mutation: tuple[str, tuple[str, ...], Any]) -> None:  # noqa: F811
    """No value in any field gives a 500; a refused body leaves no event; an accepted one is
    processed to a per-event outcome (processed / ignored / failed with a reason), never a crash."""
    action, path, value = mutation
    event = annotation_event(action, 1, 10, hooks.urls[0], hooks.masks[0])
    _set(event, path, value)
    before = _events(hooks)
    resp = hooks.client.post("/webhook", json=event)
    assert resp.status_code in (200, 400, 413), (path, value, resp.get_json())
    if resp.status_code != 200:
        assert resp.get_json()["error"]
        assert _events(hooks) == before
        return
    hooks.process()
    with unit_of_work(hooks.state.factory) as session:
        for row in session.scalars(select(WebhookEvent).where(WebhookEvent.status == "failed")):
            assert row.error and not row.error.startswith("internal error"), row.error


@hsettings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=json_values)
def test_any_json_body_on_any_route_is_answered_without_a_500(hooks: Hooks, route: str, body: Any) -> None:  # noqa: F811
    before = _events(hooks)
    resp = hooks.client.post(route, json=body)
    assert resp.status_code < 500, (route, body, resp.get_json())
    if resp.status_code >= 400:
        assert resp.get_json()["error"]
        assert _events(hooks) == before


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), raw=st.binary(max_size=200))
def test_any_bytes_on_any_route_are_answered_without_a_500(hooks: Hooks, route: str, raw: bytes) -> None:  # noqa: F811
    resp = _post_raw(hooks, route, raw)
    assert resp.status_code < 500, (route, raw, resp.get_json())


def test_predict_with_a_bad_task_structure_is_a_400_naming_the_task(hooks: Hooks) -> None:  # noqa: F811
    from backend.labelstudio.config import DEFAULT_LABEL_CONFIG

    body = {
        "project": "3.1",
        "label_config": DEFAULT_LABEL_CONFIG,
        "tasks": [
            {"id": 1, "data": {"image": hooks.urls[0]}},
            {"id": 2, "data": {"image": hooks.urls[1], "subject": [1]}},
        ],
    }
    resp = hooks.client.post("/predict", json=body)
    assert resp.status_code == 400 and "task #1" in resp.get_json()["error"]
    with unit_of_work(hooks.state.factory) as session:
        assert session.scalar(select(func.count(MaskVersion.id))) == 0
    assert np.asarray(hooks.masks[0]).size  # the fixture's frames exist (guards the setup)


@pytest.mark.parametrize("route", ROUTES)
def test_integers_beyond_any_field_are_a_400_not_a_500(hooks: Hooks, route: str) -> None:  # noqa: F811
    """Python refuses to convert integers over 4,300 digits (ValueError): it used to be a 500."""
    for body in (b'{"project": 1, "x": ' + b"9" * 5000 + b"}", b'{"project": ' + b"1" + b"0" * 5000 + b"}"):
        resp = _post_raw(hooks, route, body)
        assert resp.status_code == 400 and "digits" in resp.get_json()["error"]
    assert _events(hooks) == 0


@pytest.mark.slow
def test_unparseable_request_lines_get_an_answer_and_the_server_lives(tmp_path: Any) -> None:
    """HTTP/0.9, TLS bytes and a 100 KB request line crashed the development server's request
    logging (the connection closed with no answer)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from tests.support.servers import free_port

    port = free_port()
    env = {**os.environ, "SONOSEG_DATA_DIR": str(tmp_path / "d"), "SONOSEG_PORT": str(port)}
    env.pop("SONOSEG_DATABASE_URL", None)
    subprocess.run(
        [sys.executable, "-m", "cli.main", "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "server did not start"
            time.sleep(0.3)
        for raw in (
            b"GET /\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
            b"GET /health?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(raw)
                try:  # no more bytes: a partial line must still be answered
                    sock.shutdown(socket.SHUT_WR)
                except OSError:  # the server already answered and closed: the answer is buffered
                    pass
                try:
                    answer = sock.recv(64)
                except ConnectionResetError:
                    answer = b""
            assert answer, raw[:20]  # an HTTP/0.9-style line (and TLS bytes read as one) gets a bare body
            if raw.endswith(b"\r\n\r\n") and b"HTTP/1.1" in raw:
                assert answer.startswith(b"HTTP/") and b" 4" in answer[:13], (raw[:20], answer)
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(20)


@pytest.mark.parametrize("route", ROUTES)
def test_a_nul_character_anywhere_is_a_400(hooks: Hooks, route: str) -> None:  # noqa: F811
    """PostgreSQL's JSONB cannot hold \\u0000: storing one was a 500 (found by the property test)."""
    event = annotation_event("ANNOTATION_CREATED", 1, 10, hooks.urls[0], hooks.masks[0])
    event["project"]["label_config"] = "\x00"
    for body in (
        event,
        {"project": 1, "k\x00": 1},
        {"project": "3.1", "tasks": [{"id": 1, "data": {"image": "a\x00"}}]},
    ):
        resp = hooks.client.post(route, json=body)
        assert resp.status_code == 400 and "NUL" in resp.get_json()["error"]
    assert _events(hooks) == 0
