"""Webhooks: recorded once, processed into mask versions in the background, idempotently."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from backend.api.app import AppState, create_app
from backend.db.models import ImageSource, MaskVersion, Prediction, Project, TrainingRun, WebhookEvent
from backend.db.session import unit_of_work
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.services.masks import read_mask
from backend.services.webhooks import event_key, process_pending_events
from backend.settings import Settings
from tests.support.frames import dataset_pairs, png_bytes
from tests.support.models import ThresholdModel, fake_loader, record_version
from tests.support.payloads import annotation, annotation_event, deleted_event


@dataclass
class Hooks:
    client: FlaskClient
    state: AppState
    urls: list[str]
    masks: list[np.ndarray]
    images: list[np.ndarray]

    def post(self, payload: dict[str, Any]) -> dict[str, Any]:
        resp = self.client.post("/webhook", json=payload)
        assert resp.status_code == 200, resp.get_json()
        body: dict[str, Any] = resp.get_json()
        return body

    def process(self) -> Any:
        return process_pending_events(self.state.mirror, self.state.settings)

    def versions(self, **where: Any) -> list[MaskVersion]:
        with unit_of_work(self.state.factory) as session:
            stmt = select(MaskVersion).where(MaskVersion.source == "annotation").order_by(MaskVersion.id)
            for key, value in where.items():
                stmt = stmt.where(getattr(MaskVersion, key) == value)
            return list(session.scalars(stmt))

    def events(self) -> list[WebhookEvent]:
        with unit_of_work(self.state.factory) as session:
            return list(session.scalars(select(WebhookEvent).order_by(WebhookEvent.id)))


@pytest.fixture
def hooks(settings: Settings, tmp_path: Path) -> Iterator[Hooks]:
    root = tmp_path / "docroot"
    root.mkdir()
    pairs = dataset_pairs(3)
    for name, img, _ in pairs:
        (root / name).write_bytes(png_bytes(img))
    app = create_app(
        settings.replace(local_files_root=root), start_background=False, loader=fake_loader(ThresholdModel(), [], set())
    )
    state: AppState = app.extensions["sonoseg"]
    yield Hooks(
        app.test_client(),
        state,
        [f"/data/local-files/?d={n}" for n, _, _ in pairs],
        [m for _, _, m in pairs],
        [i for _, i, _ in pairs],
    )
    state.close()


def test_a_repeated_delivery_is_recorded_once(hooks: Hooks) -> None:
    payload = annotation_event("ANNOTATION_CREATED", 1, 10, hooks.urls[0], hooks.masks[0])
    first = hooks.post(payload)
    reordered = dict(reversed(list(payload.items())))
    assert event_key(reordered) == event_key(payload)
    second = hooks.post(reordered)
    assert (first["status"], second["status"]) == ("recorded", "duplicate")
    assert first["event"] == second["event"]
    assert len(hooks.events()) == 1


def test_created_annotation_becomes_the_current_label(hooks: Hooks) -> None:
    hooks.post(annotation_event("ANNOTATION_CREATED", 1, 10, hooks.urls[0], hooks.masks[0]))
    assert hooks.versions() == []  # the handler only records; processing is in the background
    report = hooks.process()
    assert (report.processed, report.failed) == (1, 0)
    (mv,) = hooks.versions()
    assert (mv.ls_annotation_id, mv.version, mv.is_current, mv.active, mv.author) == (1, 1, True, True, "ls-user:1")
    np.testing.assert_array_equal(read_mask(hooks.state.store, mv), hooks.masks[0])
    assert [e.status for e in hooks.events()] == ["processed"]
    with unit_of_work(hooks.state.factory) as session:
        source = session.scalars(select(ImageSource)).one()
        # The URL is stored only as a keyed pseudonym (upload URLs carry the original file name).
        assert (source.ls_task_id, source.source_ref, source.kind) == (
            10,
            hooks.state.mirror.source_ref(hooks.urls[0]),
            "labelstudio",
        )
        assert source.source_ref.startswith("src-") and hooks.urls[0] not in source.source_ref
    assert hooks.process().total == 0  # nothing left


def test_a_skipped_task_is_not_a_label(hooks: Hooks) -> None:
    hooks.post(annotation_event("ANNOTATION_CREATED", 2, 10, hooks.urls[0], None, cancelled=True))
    assert hooks.process().ignored == 1
    assert hooks.versions() == []


def test_updates_add_versions_and_deletion_deactivates(hooks: Hooks) -> None:
    url, mask = hooks.urls[0], hooks.masks[0]
    hooks.post(annotation_event("ANNOTATION_CREATED", 1, 10, url, mask))
    corrected = mask.copy()
    corrected[:40, :40] = 2
    hooks.post(annotation_event("ANNOTATION_UPDATED", 1, 10, url, corrected, updated_at="2026-11-25T10:05:00Z"))
    hooks.post(annotation_event("ANNOTATION_UPDATED", 1, 10, url, corrected, updated_at="2026-11-25T10:06:00Z"))
    report = hooks.process()
    assert (report.processed, report.ignored) == (2, 1)  # the third changes nothing
    v1, v2 = hooks.versions()
    assert (v1.version, v1.is_current, v2.version, v2.is_current) == (1, False, 2, True)
    np.testing.assert_array_equal(read_mask(hooks.state.store, v2), corrected)
    hooks.post(deleted_event("ANNOTATIONS_DELETED", [1]))
    assert hooks.process().processed == 1
    assert [(v.active, v.is_current) for v in hooks.versions()] == [(False, False), (False, False)]
    # Deleting again (or an annotation we never saw) is harmless.
    hooks.post(deleted_event("ANNOTATIONS_DELETED", [1, 999]))
    assert hooks.process().ignored == 1


def test_deleted_tasks_retire_their_source_and_labels(hooks: Hooks) -> None:
    hooks.post(annotation_event("ANNOTATION_CREATED", 1, 10, hooks.urls[0], hooks.masks[0]))
    hooks.post(annotation_event("ANNOTATION_CREATED", 2, 11, hooks.urls[1], hooks.masks[1]))
    hooks.process()
    hooks.post(deleted_event("TASKS_DELETED", [10]))
    assert hooks.process().processed == 1
    assert [(v.ls_annotation_id, v.active) for v in hooks.versions()] == [(1, False), (2, True)]
    with unit_of_work(hooks.state.factory) as session:
        assert {s.ls_task_id: s.active for s in session.scalars(select(ImageSource))} == {10: False, 11: True}


def test_bulk_created_annotations(hooks: Hooks) -> None:
    payload = {
        "action": "ANNOTATIONS_CREATED",
        "annotation": [
            annotation(5, 20, hooks.masks[0]),
            annotation(6, 21, hooks.masks[1]),
            annotation(7, 21, None, cancelled=True),
        ],
        "task": [{"id": 20, "data": {"image": hooks.urls[0]}}, {"id": 21, "data": {"image": hooks.urls[1]}}],
        "project": {"id": 3, "label_config": DEFAULT_LABEL_CONFIG},
    }
    hooks.post(payload)
    assert hooks.process().processed == 1
    assert [v.ls_annotation_id for v in hooks.versions()] == [5, 6]


def test_start_training_queues_one_run_and_remembers_a_second_request(hooks: Hooks) -> None:
    event = {"action": "START_TRAINING", "project": {"id": 3, "label_config": DEFAULT_LABEL_CONFIG}}
    hooks.post(event)
    hooks.post({**event, "project": {**event["project"], "title": "again"}})  # a second, distinct press
    assert hooks.process().processed == 2
    with unit_of_work(hooks.state.factory) as session:
        runs = session.scalars(select(TrainingRun)).all()
        assert [(r.status, r.trigger) for r in runs] == [("queued", "start_training")]
        assert session.scalars(select(Project)).one().retrain_pending is True


def test_correction_dice_is_stored_against_the_served_prediction(hooks: Hooks) -> None:
    client = hooks.client
    client.post("/setup", json={"project": "3.17", "schema": DEFAULT_LABEL_CONFIG})
    with unit_of_work(hooks.state.factory) as session:
        project = session.scalars(select(Project)).one()
        served_uid = record_version(session, project).uid
    hooks.state.holder.refresh()
    body = client.post(
        "/predict",
        json={
            "tasks": [{"id": 10, "data": {"image": hooks.urls[0]}}],
            "project": "3.17",
            "label_config": DEFAULT_LABEL_CONFIG,
        },
    ).get_json()
    assert body["results"][0]["model_version"] == served_uid
    hooks.post(annotation_event("ANNOTATION_CREATED", 1, 10, hooks.urls[0], hooks.masks[0]))
    hooks.process()
    image = hooks.images[0]
    served = np.zeros(image.shape, np.uint8)
    served[image > 170] = 1
    served[image < 15] = 2
    truth = hooks.masks[0]
    expected = []
    for c in (1, 2):
        p, t = served == c, truth == c
        if p.any() or t.any():
            expected.append(2 * (p & t).sum() / (p.sum() + t.sum()))
    (label,) = hooks.versions()
    with unit_of_work(hooks.state.factory) as session:
        prediction = session.scalars(select(Prediction)).one()
        assert prediction.corrected_mask_version_id == label.id
        assert prediction.correction_dice == pytest.approx(float(np.mean(expected)))


def test_processing_is_idempotent_across_concurrent_processors(hooks: Hooks) -> None:
    for i in range(6):
        hooks.post(annotation_event("ANNOTATION_CREATED", 100 + i, 30 + i % 3, hooks.urls[i % 3], hooks.masks[i % 3]))
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(hooks.process())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.processed for r in reports) == 6 and sum(r.failed for r in reports) == 0
    assert sorted(v.ls_annotation_id for v in hooks.versions()) == list(range(100, 106))


def test_a_failing_event_is_marked_with_its_reason_and_the_rest_go_on(hooks: Hooks) -> None:
    hooks.post(annotation_event("ANNOTATION_CREATED", 1, 10, "/data/local-files/?d=missing.png", hooks.masks[0]))
    wrong_size = np.ones((100, 120), np.uint8)  # the editor drew on another size than the image
    hooks.post(annotation_event("ANNOTATION_CREATED", 2, 11, hooks.urls[1], wrong_size))
    hooks.post(annotation_event("ANNOTATION_CREATED", 3, 12, hooks.urls[2], hooks.masks[2]))
    report = hooks.process()
    assert (report.processed, report.failed) == (1, 2)
    events = hooks.events()
    assert [e.status for e in events] == ["failed", "failed", "processed"]
    assert "does not exist" in (events[0].error or "") and "brush regions must cover" in (events[1].error or "")
    assert [v.ls_annotation_id for v in hooks.versions()] == [3]
