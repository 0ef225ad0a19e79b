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

from backend.db.models import Prediction, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.runtime import Runtime
from backend.services.repredict import repredict_unlabelled
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.support.fake_labelstudio import FakeLabelStudio
from tests.support.frames import png_bytes
from tests.support.models import WORKER_TINY, register_model, tiny_spec
from tests.support.servers import ServedApp

LS_PROJECT = 3


@dataclass
class Env:
    ls: FakeLabelStudio
    posted: list[dict[str, Any]]
    runtime: Runtime
    project_id: int
    uid: str  # the serving version's


def nerve_everywhere_checkpoint(path: Path) -> None:
    """A tiny network whose output head is biased to 'Nerve': every pixel is predicted as nerve."""
    import torch

    from backend.model.checkpoint import Checkpoint, save_checkpoint
    from backend.model.networks import build_model

    spec = tiny_spec(**WORKER_TINY)
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
    with unit_of_work(factory) as s:
        project = Project(
            name="nerves", ls_project_id=LS_PROJECT, class_names=["Nerve", "Vessel"], label_config=DEFAULT_LABEL_CONFIG
        )
        s.add(project)
        s.flush()
        project_id = project.id
    checkpoint = tmp_path / "nerve.safetensors"
    nerve_everywhere_checkpoint(checkpoint)
    uid = register_model(factory, store, project_id, checkpoint).uid  # serving
    rng = np.random.default_rng(0)
    ls.projects[LS_PROJECT] = {"id": LS_PROJECT, "title": "nerves", "label_config": DEFAULT_LABEL_CONFIG}
    for task_id, labels, predictions in (
        (1, [{"id": 9, "result": [], "was_cancelled": False}], []),
        (2, [], []),
        (3, [], [{"model_version": uid}]),
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
    runtime = Runtime.from_settings(run_settings)
    yield Env(ls, posted, runtime, project_id, uid)
    runtime.close()
    served.close()


def test_unlabelled_tasks_get_the_new_models_predictions_once(env: Env) -> None:
    report = repredict_unlabelled(env.runtime.mirror, env.runtime.settings, env.project_id, env.uid)
    # task 1 is labelled, task 3 already has the version's prediction; task 4 was skipped by the annotator
    assert [p["task"] for p in env.posted] == [2, 4]
    assert all(p["model_version"] == env.uid and p["result"] for p in env.posted)
    assert {r["value"]["brushlabels"][0] for r in env.posted[0]["result"]} == {"Nerve"}
    assert (report.tasks_seen, report.predicted, report.already_predicted, report.failed) == (4, 2, 1, 0)
    with env.runtime.factory() as s:
        assert sorted(s.scalars(select(Prediction.ls_task_id))) == [2, 4]  # recorded to measure corrections
    again = repredict_unlabelled(env.runtime.mirror, env.runtime.settings, env.project_id, env.uid)
    assert again.predicted == 0 and again.already_predicted == 3 and len(env.posted) == 2


def test_a_job_for_a_version_that_no_longer_serves_does_nothing(env: Env) -> None:
    report = repredict_unlabelled(env.runtime.mirror, env.runtime.settings, env.project_id, "v-old")
    assert report.skipped_reason == f"v-old no longer serves ({env.uid} does)" and env.posted == []
