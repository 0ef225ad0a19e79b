"""The ML backend protocol as Label Studio speaks it: /health, /setup, /predict, /versions, /metrics.

Most tests serve a deterministic stand-in model (bright pixels are "Nerve", dark ones "Vessel")
through the real ModelHolder, so they check the protocol, not the network; one test serves a real
(tiny, untrained) checkpoint through the default loader. Images come from a local-files root.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from backend.api.app import AppState, create_app
from backend.db.models import MaskVersion, Prediction, Project
from backend.db.session import unit_of_work
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.settings import Settings
from tests.support.frames import dataset_pairs, png_bytes
from tests.support.models import ThresholdModel, fake_loader, record_version, register_model, save_tiny_checkpoint
from tests.support.servers import ServedApp

PROJECT = "7.1700000000"


@dataclass
class Env:
    app: Flask
    client: FlaskClient
    state: AppState
    root: Path
    model: ThresholdModel
    loads: list[str]
    fail: set[str]  # uids whose checkpoint the stand-in loader treats as corrupt


@pytest.fixture
def env(settings: Settings, tmp_path: Path) -> Iterator[Env]:
    root = tmp_path / "docroot"
    root.mkdir()
    model, loads, fail = ThresholdModel(), [], set()
    app = create_app(
        settings.replace(local_files_root=root), start_background=False, loader=fake_loader(model, loads, fail)
    )
    state: AppState = app.extensions["sonoseg"]
    yield Env(app, app.test_client(), state, root, model, loads, fail)
    state.close()


def put_image(env: Env, name: str, pixels: np.ndarray) -> str:
    (env.root / name).write_bytes(png_bytes(pixels))
    return f"/data/local-files/?d={name}"


def predict(env: Env, tasks: list[dict[str, Any]], **extra: Any) -> Any:
    body = {"tasks": tasks, "project": PROJECT, "label_config": DEFAULT_LABEL_CONFIG, "params": {}, **extra}
    resp = env.client.post("/predict", json=body)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def add_serving(env: Env, *, broken: bool = False) -> str:
    """A new version of the project, registered and promoted (the stand-in loader needs no checkpoint);
    returns its uid. A ``broken`` version's checkpoint fails to load, as a corrupt one does."""
    with unit_of_work(env.state.factory) as session:
        project = session.scalars(select(Project).where(Project.ls_project_id == 7)).one()
        uid = record_version(session, project).uid
    if broken:
        env.fail.add(uid)
    return uid


def decode_region(region: dict[str, Any]) -> np.ndarray:
    """The region's alpha channel, decoded by Label Studio's own SDK (the test oracle)."""
    from label_studio_sdk.converter.brush import decode_rle

    h, w = region["original_height"], region["original_width"]
    return np.asarray(decode_rle(region["value"]["rle"])).reshape(h, w, 4)[..., 3]


def test_health_answers_without_the_database(env: Env) -> None:
    def broken() -> None:
        raise AssertionError("health must not touch the database")

    env.state.runtime.factory = broken  # type: ignore[assignment]
    env.state.mirror.factory = broken  # type: ignore[assignment]
    for path in ("/health", "/"):
        resp = env.client.get(path)
        assert resp.status_code == 200
        assert resp.get_json()["status"] == "UP"


def test_setup_records_the_project_and_answers_from_memory_afterwards(env: Env) -> None:
    resp = env.client.post(
        "/setup",
        json={
            "project": PROJECT,
            "schema": DEFAULT_LABEL_CONFIG,
            "hostname": "http://ls",
            "access_token": "t",
            "extra_params": None,
        },
    )
    assert resp.status_code == 200
    assert resp.get_json() == {"model_version": "untrained"}
    with unit_of_work(env.state.factory) as session:
        project = session.scalars(select(Project).where(Project.ls_project_id == 7)).one()
        assert project.class_names == ["Nerve", "Vessel"]
        assert project.label_config == DEFAULT_LABEL_CONFIG

    def broken() -> None:
        raise AssertionError("a known project and config must not touch the database")

    factory = env.state.mirror.factory
    env.state.mirror.factory = broken  # type: ignore[assignment]
    assert env.client.post("/setup", json={"project": PROJECT, "schema": DEFAULT_LABEL_CONFIG}).status_code == 200
    env.state.mirror.factory = factory


def test_predict_before_any_model_answers_empty_untrained_items_and_records_them(env: Env) -> None:
    pairs = dataset_pairs(2)
    tasks = [{"id": 10 + i, "data": {"image": put_image(env, name, img)}} for i, (name, img, _) in enumerate(pairs)]
    body = predict(env, tasks)
    assert body == {"results": [{"result": [], "score": 0.0, "model_version": "untrained"}] * 2}
    assert env.model.calls == []
    with unit_of_work(env.state.factory) as session:
        rows = session.scalars(select(Prediction).order_by(Prediction.ls_task_id)).all()
        assert [(r.ls_task_id, r.model_version_uid, r.model_version_id) for r in rows] == [
            (10, "untrained", None),
            (11, "untrained", None),
        ]


def test_predict_returns_one_valid_brush_result_per_label_per_task_in_order(env: Env) -> None:
    env.client.post("/setup", json={"project": PROJECT, "schema": DEFAULT_LABEL_CONFIG})
    v1 = add_serving(env)
    env.state.holder.refresh()
    pairs = dataset_pairs(3)
    small = np.full((300, 400), 200, np.uint8)  # another size: its own batch, its own natural size
    small[:50, :60] = 5
    tasks = [{"id": 100 + i, "data": {"image": put_image(env, name, img)}} for i, (name, img, _) in enumerate(pairs)]
    tasks.insert(1, {"id": 200, "data": {"image": "/data/local-files/?d=missing.png"}})
    tasks.insert(2, {"id": 201, "data": {"image": put_image(env, "small.png", small)}})
    (env.root / "garbage.png").write_bytes(b"not an image at all")
    tasks.append({"id": 202, "data": {"image": "/data/local-files/?d=garbage.png"}})
    tasks.append({"id": 203, "data": {"other": "no image key"}})
    results = predict(env, tasks)["results"]

    assert len(results) == len(tasks)
    assert [r["model_version"] for r in results] == [v1] * len(tasks)
    assert results[1]["result"] == [] and results[-1]["result"] == [] and results[-2]["result"] == []
    assert env.model.calls == [4]  # the four readable images, batched into one call
    expected_images = [pairs[0][1], small, pairs[1][1], pairs[2][1]]
    for item, pixels in zip([results[0], results[2], results[3], results[4]], expected_images, strict=True):
        h, w = pixels.shape
        labels = [r["value"]["brushlabels"] for r in item["result"]]
        expected = [["Nerve"]] * bool((pixels > 170).any()) + [["Vessel"]] * bool((pixels < 15).any())
        assert labels == expected
        assert isinstance(item["score"], float) and 0 <= item["score"] <= 1
        for region in item["result"]:
            assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image", "brushlabels")
            assert (region["original_height"], region["original_width"]) == (h, w)
            assert isinstance(region["score"], float)
            alpha = decode_region(region)
            assert set(np.unique(alpha).tolist()) <= {0, 255}
            want = (pixels > 170) & ~(pixels < 15) if region["value"]["brushlabels"] == ["Nerve"] else pixels < 15
            np.testing.assert_array_equal(alpha == 255, want)

    with unit_of_work(env.state.factory) as session:
        preds = session.scalars(select(Prediction).order_by(Prediction.id)).all()
        assert sorted(p.ls_task_id for p in preds) == [100, 101, 102, 201]
        assert all(p.model_version_uid == v1 and p.mask_version_id is not None for p in preds)
        masks = session.scalars(select(MaskVersion).where(MaskVersion.source == "prediction")).all()
        assert len(masks) == 4 and not any(m.is_current for m in masks)
    # Asking again for the same tasks reuses the stored images and prediction masks.
    predict(env, tasks[:1])
    with unit_of_work(env.state.factory) as session:
        assert session.scalar(select(func.count()).select_from(MaskVersion)) == 4


def test_a_promotion_is_picked_up_and_swapped_atomically(env: Env) -> None:
    env.client.post("/setup", json={"project": PROJECT, "schema": DEFAULT_LABEL_CONFIG})
    v1 = add_serving(env)
    assert env.state.holder.refresh() is True
    assert env.client.post("/setup", json={"project": PROJECT}).get_json() == {"model_version": v1}
    in_flight = env.state.holder.get(env.state.mirror.project_ref(7, None).project_id)
    assert in_flight is not None
    v2 = add_serving(env)
    assert env.state.holder.refresh() is True
    assert env.client.post("/setup", json={"project": PROJECT}).get_json() == {"model_version": v2}
    assert in_flight.uid == v1 and len(in_flight.predict([np.zeros((8, 8), np.uint8)])) == 1
    assert env.state.holder.refresh() is False  # nothing changed, nothing loaded
    assert env.loads == [v1, v2]
    # A version whose checkpoint cannot load is logged; the previous one keeps serving.
    add_serving(env, broken=True)
    assert env.state.holder.refresh() is False
    assert env.client.post("/setup", json={"project": PROJECT}).get_json() == {"model_version": v2}


def test_twenty_concurrent_single_task_requests_all_succeed(env: Env) -> None:
    env.client.post("/setup", json={"project": PROJECT, "schema": DEFAULT_LABEL_CONFIG})
    v1 = add_serving(env)
    env.state.holder.refresh()
    name, img, _ = dataset_pairs(1)[0]
    url = put_image(env, name, img)
    served = ServedApp(env.app)
    barrier = threading.Barrier(20)

    def one(i: int) -> tuple[int, Any]:
        barrier.wait()
        body = {
            "tasks": [{"id": 500 + i, "data": {"image": url}}],
            "project": PROJECT,
            "label_config": DEFAULT_LABEL_CONFIG,
        }
        resp = requests.post(f"{served.url}/predict", json=body, timeout=60)
        return resp.status_code, resp.json()

    try:
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(one, range(20)))
    finally:
        served.close()
    assert [code for code, _ in answers] == [200] * 20
    assert all(len(body["results"]) == 1 and body["results"][0]["model_version"] == v1 for _, body in answers)
    assert all(body["results"][0]["result"] for _, body in answers) == bool((img > 170).any() or (img < 15).any())
    with unit_of_work(env.state.factory) as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 20


def test_versions_and_metrics(env: Env) -> None:
    env.client.post("/setup", json={"project": PROJECT, "schema": DEFAULT_LABEL_CONFIG})
    v1, v2 = add_serving(env), add_serving(env)
    assert env.client.get("/versions").get_json() == {"versions": [v1, v2]}
    assert env.client.get("/versions?project=8.123").get_json() == {"versions": []}
    env.client.get("/health")
    text = env.client.get("/metrics").get_data(as_text=True)
    assert 'sonoseg_http_requests_total{endpoint="/health",status="200"} 1.0' in text
    assert "sonoseg_serving_models" in text


def test_a_real_checkpoint_is_loaded_once_and_serves(settings: Settings, tmp_path: Path) -> None:
    root = tmp_path / "docroot"
    root.mkdir()
    app = create_app(settings.replace(local_files_root=root, device="cpu"), start_background=False)
    state: AppState = app.extensions["sonoseg"]
    try:
        client = app.test_client()
        client.post("/setup", json={"project": PROJECT, "schema": DEFAULT_LABEL_CONFIG})
        project_id = state.mirror.project_ref(7, None).project_id
        ckpt = tmp_path / "tiny.safetensors"
        save_tiny_checkpoint(ckpt)
        uid = register_model(state.factory, state.store, project_id, ckpt).uid
        assert state.holder.refresh() is True and state.holder.loads == 1
        name, img, _ = dataset_pairs(1)[0]
        (root / name).write_bytes(png_bytes(img))
        for _ in range(2):
            body = client.post(
                "/predict",
                json={
                    "tasks": [{"id": 1, "data": {"image": f"/data/local-files/?d={name}"}}],
                    "project": PROJECT,
                    "label_config": DEFAULT_LABEL_CONFIG,
                },
            ).get_json()
            (item,) = body["results"]
            assert item["model_version"] == uid and 0.0 <= item["score"] <= 1.0
            for region in item["result"]:
                assert decode_region(region).shape == img.shape
        assert state.holder.loads == 1  # loaded once, not per request
    finally:
        state.close()


def test_a_large_batch_is_answered_in_order_in_bounded_chunks(env: Env) -> None:
    from backend.services.predictions import CHUNK_TASKS

    env.client.post("/setup", json={"project": PROJECT, "schema": DEFAULT_LABEL_CONFIG})
    add_serving(env)
    env.state.holder.refresh()
    n = CHUNK_TASKS + 4
    tasks = []
    for i in range(n):
        img = np.full((24, 32), 100, np.uint8)
        img[: i + 1, 0] = 250  # task i: i + 1 "Nerve" pixels, so answers can be told apart
        tasks.append({"id": 900 + i, "data": {"image": put_image(env, f"b{i}.png", img)}})
    tasks[5]["data"]["image"] = "/data/local-files/?d=nope.png"
    results = predict(env, tasks)["results"]
    assert len(results) == n and env.model.calls == [CHUNK_TASKS - 1, 4]
    for i, item in enumerate(results):
        if i == 5:
            assert item["result"] == []
            continue
        (region,) = item["result"]
        assert int((decode_region(region) == 255).sum()) == i + 1
