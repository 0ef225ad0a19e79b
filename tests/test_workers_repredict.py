"""Batch re-prediction after a promotion: the serving model's suggestions are written to Label
Studio (a fake one, in a thread) for unlabelled tasks only, once per model version."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import jsonify, request
from sqlalchemy import select

from backend.db.models import ModelVersion, Prediction, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.services.versions import promote
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.labelstudio_server import FakeLabelStudio, ServedApp, png_bytes
from workers.celery_app import WorkerRuntime
from workers.tasks.prediction import repredict_unlabelled

LS_PROJECT = 3


@dataclass
class Env:
    ls: FakeLabelStudio
    posted: list[dict[str, Any]]
    runtime: WorkerRuntime
    project_id: int


def nerve_everywhere_checkpoint(path: Path) -> None:
    """A tiny network whose output head is biased to 'Nerve': every pixel is predicted as nerve."""
    import torch

    from backend.model.checkpoint import Checkpoint, save_checkpoint
    from backend.model.networks import build_model
    from backend.model.spec import ModelSpec

    spec = ModelSpec(
        arch="resunet_2d",
        classes=("Nerve", "Vessel"),
        features=(4, 8, 16),
        encoder_blocks=(1, 1, 1),
        decoder_blocks=(1, 1),
        patch_size=(32, 32),
        input_scale=0.25,
        full_resolution_skip=True,
    )
    state = build_model(spec).state_dict()
    for name in list(state):
        if name.startswith("decoder.seg_layers.") and name.endswith(".bias"):
            state[name] = torch.tensor([0.0, 50.0, 0.0])
    save_checkpoint(path, Checkpoint(spec=spec, state_dict=state))


@pytest.fixture
def env(factory: SessionFactory, store: LocalBlobStore, settings: Settings, tmp_path: Path) -> Iterator[Env]:
    ls = FakeLabelStudio()
    posted: list[dict[str, Any]] = []
    app = ls.app()

    @app.post("/api/predictions/")
    def create_prediction() -> Any:
        body = request.get_json()
        posted.append(body)
        ls.tasks[body["task"]].setdefault("predictions", []).append(body)
        return jsonify({"id": len(posted), **body}), 201

    served = ServedApp(app)
    rng = np.random.default_rng(0)
    ls.projects[LS_PROJECT] = {"id": LS_PROJECT, "title": "nerves", "label_config": DEFAULT_LABEL_CONFIG}
    for task_id, labels, predictions in (
        (1, [{"id": 9, "result": [], "was_cancelled": False}], []),
        (2, [], []),
        (3, [], [{"model_version": "v-new"}]),
        (4, [{"id": 10, "result": [], "was_cancelled": True}], []),
    ):
        ls.files[f"/data/upload/{task_id}.png"] = png_bytes(rng.integers(0, 255, (64, 64), dtype=np.uint8))
        ls.tasks[task_id] = {
            "id": task_id,
            "project": LS_PROJECT,
            "data": {"image": f"/data/upload/{task_id}.png"},
            "annotations": labels,
            "predictions": predictions,
        }
    run_settings = settings.replace(label_studio_url=served.url, label_studio_api_key=ls.legacy_token, device="cpu")
    checkpoint = tmp_path / "nerve.safetensors"
    nerve_everywhere_checkpoint(checkpoint)
    blob = store.put_file("checkpoints", checkpoint, ".safetensors")
    with unit_of_work(factory) as s:
        project = Project(
            name="nerves", ls_project_id=LS_PROJECT, class_names=["Nerve", "Vessel"], label_config=DEFAULT_LABEL_CONFIG
        )
        s.add(project)
        s.flush()
        version = ModelVersion(
            project_id=project.id,
            uid="v-new",
            status="candidate",
            arch="resunet_2d",
            checkpoint_key=blob.key,
            checkpoint_sha256=blob.sha256,
        )
        s.add(version)
        s.flush()
        promote(s, version, reason="test")
        project_id = project.id
    runtime = WorkerRuntime(run_settings)
    yield Env(ls, posted, runtime, project_id)
    runtime.close()
    served.close()


def test_unlabelled_tasks_get_the_new_models_predictions_once(env: Env) -> None:
    report = repredict_unlabelled(env.runtime, env.project_id, "v-new")
    # task 1 is labelled, task 3 already has v-new's prediction; task 4 was skipped by the annotator
    assert [p["task"] for p in env.posted] == [2, 4]
    assert all(p["model_version"] == "v-new" and p["result"] for p in env.posted)
    assert {r["value"]["brushlabels"][0] for r in env.posted[0]["result"]} == {"Nerve"}
    assert (report.tasks_seen, report.predicted, report.already_predicted, report.failed) == (4, 2, 1, 0)
    with env.runtime.factory() as s:
        assert sorted(s.scalars(select(Prediction.ls_task_id))) == [2, 4]  # recorded to measure corrections
    again = repredict_unlabelled(env.runtime, env.project_id, "v-new")
    assert again.predicted == 0 and again.already_predicted == 3 and len(env.posted) == 2


def test_a_job_for_a_version_that_no_longer_serves_does_nothing(env: Env) -> None:
    report = repredict_unlabelled(env.runtime, env.project_id, "v-old")
    assert report.skipped_reason == "v-old no longer serves (v-new does)" and env.posted == []
