"""The dashboard (/ui) through the Flask test client: auth on every route and asset, CSRF on the two
buttons, the data each page shows, and a number of SQL statements per page that does not grow with
the number of images, versions, predictions or runs.

Fixture projects are made the way sonoseg makes them (``/setup`` creates the project; images, masks
and versions through the services); only what no service writes in a test (prediction rows with a
correction Dice, training runs in given states, spaced creation times) is inserted as rows.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event, select

from backend.api.app import AppState, create_app
from backend.api.ui.views import ui_state
from backend.db.models import Image, ModelVersion, Prediction, Project, TrainingRun
from backend.db.session import SessionFactory, unit_of_work
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.services import dashboard
from backend.services.images import SourceInfo, add_image
from backend.services.masks import add_mask_version
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.support.frames import synthetic_frame
from tests.support.models import ThresholdModel, fake_loader, record_version

LS_PROJECT = 7
LS_URL = "http://labelstudio.example:8080"
USER, PASSWORD = "curator", "s3cret-pass"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
BASE = dt.datetime(2026, 1, 5, 9, 0, tzinfo=dt.UTC)


@dataclass
class Env:
    app: Flask
    client: FlaskClient
    state: AppState
    settings: Settings

    def get(self, path: str, headers: dict[str, str] | None = None, **kw: Any) -> Any:
        return self.client.get(path, headers={**AUTH, **(headers or {})}, **kw)

    def post(self, path: str, headers: dict[str, str] | None = None, **kw: Any) -> Any:
        return self.client.post(path, headers={**AUTH, **(headers or {})}, **kw)

    @property
    def factory(self) -> SessionFactory:
        return self.state.factory

    @property
    def store(self) -> LocalBlobStore:
        return self.state.store


def make_env(settings: Settings, *, background: bool = False) -> Env:
    settings = settings.replace(basic_auth_user=USER, basic_auth_password=PASSWORD, label_studio_url=LS_URL)
    app = create_app(settings, start_background=background, loader=fake_loader(ThresholdModel(), [], set()))
    state: AppState = app.extensions["sonoseg"]
    return Env(app, app.test_client(), state, settings)


@pytest.fixture
def env(settings: Settings) -> Iterator[Env]:
    e = make_env(settings)
    yield e
    ui_state(e.app).refresher.wait(30)
    e.state.close()


# -- fixture data -----------------------------------------------------------------------------------
def setup_project(env: Env, ls_project: int = LS_PROJECT) -> int:
    resp = env.post("/setup", json={"project": f"{ls_project}.1700000000", "schema": DEFAULT_LABEL_CONFIG})
    assert resp.status_code == 200, resp.get_json()
    with unit_of_work(env.factory) as s:
        return int(s.scalars(select(Project.id).where(Project.ls_project_id == ls_project)).one())


def version_metrics(i: int, n_train: int, *, validated: bool = True) -> dict[str, Any]:
    """What a training run stores (backend/services/training/execute.py ``_metrics_of``), numbers made up."""
    if not validated:
        return {"n_train": n_train, "n_val": 0, "epochs": 2, "stop_reason": "budget"}
    d = round(0.40 + 0.05 * i, 4)
    return {
        "n_train": n_train,
        "n_val": 3,
        "epochs": 4 + i,
        "stop_reason": "budget",
        "train_seconds": 12.5,
        "fg_mDice": d,
        "fg_mIoU": round(d - 0.1, 4),
        "fg_image_dice": round(d - 0.02, 4),
        "val_report": {
            "mDice": d,
            "mIoU": round(d - 0.1, 4),
            "n_images": 3,
            "per_class": {
                "Nerve": {"dice": round(d + 0.05, 4), "iou": round(d - 0.05, 4)},
                "Vessel": {"dice": round(d - 0.05, 4), "iou": round(d - 0.15, 4)},
            },
        },
    }


@dataclass
class Built:
    project_id: int
    uids: list[str]  # oldest first
    serving: str
    rollback_to: str
    image_ids: list[int]


def populate(env: Env, project_id: int, *, images: int = 8, versions: int = 5, runs: int = 3, seed: int = 0) -> Built:
    """``images`` frames (train/val/test in turn, the first three quarters labelled by alice or bob),
    ``versions`` model versions (the last but one serving, the first two served before it, the last a
    candidate without validation metrics), predictions with correction Dice for every served version
    and 'untrained', ``runs`` training runs (the oldest failed with an error, the newest running)."""
    assert versions >= 4
    splits = ("train", "val", "test")
    image_ids: list[int] = []
    with unit_of_work(env.factory) as s:
        project = s.get_one(Project, project_id)
        for i in range(images):
            frame, mask = synthetic_frame(seed * 1000 + i, (48, 64))
            image = add_image(
                s, env.store, project, frame, subject=f"s{seed}-{i}", source=SourceInfo("import"), split=splits[i % 3]
            ).image
            if i < images * 3 // 4:
                add_mask_version(
                    s, env.store, project, image, mask, source="annotation", author=("alice", "bob")[i % 2]
                )
            image_ids.append(image.id)
    uids: list[str] = []
    n_existing = 0
    with unit_of_work(env.factory) as s:
        project = s.get_one(Project, project_id)
        n_existing = len(s.scalars(select(ModelVersion.id).where(ModelVersion.project_id == project_id)).all())
        # served in order: 0, 1, ..., versions-2; a rollback then restores versions-3
        for i in range(versions):
            last = i == versions - 1
            v = record_version(s, project, serve=not last)
            v.metrics = version_metrics(i, 4 + 3 * i, validated=not last)
            v.created_at = BASE + dt.timedelta(hours=6 * (n_existing + i))
            if last:
                v.gate_reason = "candidate fg_mDice 0.3000 < serving 0.5500 + margin 0: kept as a candidate"
            uids.append(v.uid)
        s.flush()
        for k, uid in enumerate(["untrained", *uids[:-1]]):
            mv_id = (
                None if uid == "untrained" else s.scalars(select(ModelVersion.id).where(ModelVersion.uid == uid)).one()
            )
            for j, image_id in enumerate(image_ids):
                dice = None if j == 0 else [0.1, 0.5, 0.9, 0.96, 0.99, 1.0][(j + k) % 6]
                stored = None
                if uid == uids[-2] and j % 2:  # the serving model's prediction masks (what the review compares)
                    _, label = synthetic_frame(seed * 1000 + j, (48, 64))
                    image = s.get_one(Image, image_id)
                    stored = add_mask_version(
                        s, env.store, project, image, np.roll(label, 3, axis=1), source="prediction"
                    ).mask_version.id
                s.add(
                    Prediction(
                        image_id=image_id,
                        model_version_id=mv_id,
                        model_version_uid=uid,
                        mask_version_id=stored,
                        correction_dice=dice,
                    )
                )
        for r in range(runs):
            newest = r == runs - 1
            s.add(
                TrainingRun(
                    project_id=project_id,
                    trigger="annotations",
                    status="running" if newest else ("failed" if r == 0 else "succeeded"),
                    progress={"phase": "training", "epoch": 3, "loss": 0.4213, "val_dice": 0.61, "fraction": 0.25}
                    if newest
                    else {"phase": "failed" if r == 0 else "succeeded"},
                    worker=f"celery@host{r}",
                    device="cpu",
                    error="RuntimeError: CUDA out of memory (run 0)" if r == 0 else None,
                    attempts=1,
                    created_at=BASE + dt.timedelta(hours=r),
                )
            )
        project.retrain_pending = True
    env.state.holder.refresh()
    return Built(project_id, uids, uids[-2], uids[-3], image_ids)


def csrf_token(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert m, "no CSRF token on the page"
    return m.group(1)


def pages(pid: int) -> list[str]:
    return [
        "/ui/",
        f"/ui/projects/{pid}/models",
        f"/ui/projects/{pid}/effort",
        f"/ui/projects/{pid}/runs",
        f"/ui/projects/{pid}/runs.json",
        f"/ui/projects/{pid}/dataset",
        f"/ui/projects/{pid}/dataset.json",
        f"/ui/projects/{pid}/review",
        f"/ui/projects/{pid}/review.json",
        f"/ui/projects/{pid}/next",
    ]


# -- auth and CSRF -------------------------------------------------------------------------------------
def test_every_ui_route_and_asset_refuses_a_request_without_valid_basic_auth(env: Env) -> None:
    pid = setup_project(env)
    populate(env, pid, versions=4)
    env.get(f"/ui/projects/{pid}/review")
    assert ui_state(env.app).refresher.wait(60)
    html = env.get(f"/ui/projects/{pid}/review").get_data(as_text=True)
    thumb = re.search(r'src="(/ui/thumbnails/[0-9a-f]{64}\.png)"', html)
    assert thumb, "the review page shows thumbnails"
    gets = ["/ui", *pages(pid), f"/ui/projects/{pid}/", "/ui/static/ui.css", "/ui/static/ui.js", thumb.group(1)]
    posts = [f"/ui/projects/{pid}/models/promote", f"/ui/projects/{pid}/models/rollback"]
    wrong = {"Authorization": "Basic " + base64.b64encode(f"{USER}:nope".encode()).decode()}
    for headers in ({}, wrong):
        for path in gets:
            resp = env.client.get(path, headers=headers)
            assert resp.status_code == 401, (path, resp.status_code)
            assert resp.headers["WWW-Authenticate"].startswith("Basic"), path
            assert b"<table" not in resp.data and not resp.data.startswith((b"/*", b"//", b"\x89PNG")), path
        for path in posts:
            resp = env.client.post(path, headers=headers, data={"version": "x", "csrf_token": "x"})
            assert resp.status_code == 401, path
    for path in gets:
        resp = env.get(path)
        assert resp.status_code in (200, 302, 308), (path, resp.status_code)
    assert env.get("/ui/static/ui.js").data.startswith(b"//")
    assert env.get(thumb.group(1)).data.startswith(b"\x89PNG")


def test_pages_send_a_strict_content_security_policy_and_refuse_framing(env: Env) -> None:
    resp = env.get("/ui/")
    assert resp.status_code == 200
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert "<script>" not in resp.get_data(as_text=True)  # no inline script: the CSP would block it


def test_promote_and_rollback_need_the_csrf_token_and_change_what_setup_serves(env: Env) -> None:
    pid = setup_project(env)
    built = populate(env, pid)
    setup = {"project": f"{LS_PROJECT}.1700000000", "schema": DEFAULT_LABEL_CONFIG}
    assert env.post("/setup", json=setup).get_json()["model_version"] == built.serving
    html = env.get(f"/ui/projects/{pid}/models").get_data(as_text=True)
    token = csrf_token(html)
    candidate = built.uids[-1]
    assert f'class="promote" data-version="{candidate}"' in html
    assert 'data-confirm="Promote' in html and 'data-confirm="Roll back' in html

    promote = f"/ui/projects/{pid}/models/promote"
    for data in ({"version": candidate}, {"version": candidate, "csrf_token": "0" * 64}):
        resp = env.post(promote, data=data)
        assert resp.status_code == 403
        assert "CSRF token" in resp.get_data(as_text=True)
    assert env.post("/setup", json=setup).get_json()["model_version"] == built.serving  # nothing changed

    resp = env.post(promote, data={"version": candidate, "csrf_token": token})
    assert resp.status_code == 303, resp.get_data(as_text=True)
    assert env.post("/setup", json=setup).get_json()["model_version"] == candidate
    page = env.get(resp.headers["Location"]).get_data(as_text=True)
    assert f"{candidate} is serving now" in page

    # the same rules as `sonoseg models promote`: a version of another project is not found here
    other = setup_project(env, ls_project=8)
    with unit_of_work(env.factory) as s:
        foreign = record_version(s, s.get_one(Project, other), serve=False).uid
    resp = env.post(promote, data={"version": foreign, "csrf_token": token})
    assert resp.status_code == 404 and "not a version of project" in resp.get_data(as_text=True)

    resp = env.post(f"/ui/projects/{pid}/models/rollback", data={"csrf_token": token})
    assert resp.status_code == 303
    assert env.post("/setup", json=setup).get_json()["model_version"] == built.serving
    resp = env.post(f"/ui/projects/{pid}/models/rollback", headers={"X-CSRF-Token": token})
    assert resp.status_code == 303
    assert env.post("/setup", json=setup).get_json()["model_version"] == built.uids[-3]

    # rollback refused (nothing served before): a 409 page with the core's message
    empty = setup_project(env, ls_project=9)
    resp = env.post(f"/ui/projects/{empty}/models/rollback", data={"csrf_token": token})
    assert resp.status_code == 409 and "no serving model to roll back from" in resp.get_data(as_text=True)


def test_the_csrf_token_is_shared_by_processes_on_one_data_dir_and_changes_with_the_password(
    settings: Settings,
) -> None:
    from backend.api.ui import csrf

    a = csrf.token(csrf.csrf_key(settings.replace(basic_auth_user=USER, basic_auth_password=PASSWORD)))
    b = csrf.token(csrf.csrf_key(settings.replace(basic_auth_user=USER, basic_auth_password=PASSWORD)))
    c = csrf.token(csrf.csrf_key(settings.replace(basic_auth_user=USER, basic_auth_password="other")))
    assert a == b != c
    assert PASSWORD not in a


# -- what the pages show --------------------------------------------------------------------------------
def test_overview_shows_counts_serving_model_last_run_and_the_label_studio_link(env: Env) -> None:
    pid = setup_project(env)
    built = populate(env, pid, images=8)
    html = env.get("/ui/").get_data(as_text=True)
    row = html[html.index(f'data-project="{pid}"') :]
    row = row[: row.index("</tr>")]
    # 8 images: train 0,3,6 / val 1,4,7 / test 2,5; the first 6 labelled
    assert re.findall(r'<td class="num">(\d+) / (\d+)</td>', row) == [("2", "3"), ("2", "3"), ("2", "2")]
    assert '<td class="num">6</td>' in row and '<td class="num">2</td>' in row
    assert built.serving in row and "running" in row and "(training)" in row
    assert f'href="{LS_URL}/projects/{LS_PROJECT}/data"' in row
    assert "<td>yes</td>" in row  # retrain pending


def test_model_timeline_has_one_point_per_version_marks_the_serving_one_and_shows_metrics(env: Env) -> None:
    pid = setup_project(env)
    built = populate(env, pid, versions=6)
    html = env.get(f"/ui/projects/{pid}/models").get_data(as_text=True)
    chart = html[html.index('id="chart-time"') : html.index("</svg>", html.index('id="chart-time"'))]
    points = re.findall(r'<circle class="([^"]*version-point[^"]*)" data-version="([^"]+)"', chart)
    assert sorted(uid for _, uid in points) == sorted(built.uids)
    assert [uid for cls, uid in points if "serving" in cls.split()] == [built.serving]
    assert [uid for cls, uid in points if "no-metric" in cls.split()] == [built.uids[-1]]
    assert len(re.findall(r'class="class-point" data-version="[^"]+" data-class="Nerve"', chart)) == 5
    assert 'id="chart-ntrain"' in html
    # per-class Dice and the gate decision of each version
    assert '<td class="num">0.650</td>' in html  # Nerve Dice of the newest validated version (0.60 + 0.05)
    assert "kept as a candidate" in html
    assert f"Roll back to {built.rollback_to}" in html


def test_effort_page_shows_histograms_and_accepted_share_per_version_and_no_lead_time(env: Env) -> None:
    pid = setup_project(env)
    built = populate(env, pid, images=8, versions=4)
    html = env.get(f"/ui/projects/{pid}/effort").get_data(as_text=True)
    assert "not recorded yet" in html
    rows = re.findall(r'<tr data-version="([^"]+)">(.*?)</tr>', html, re.S)
    assert [uid for uid, _ in rows] == ["untrained", *built.uids[:-1]]
    with unit_of_work(env.factory) as s:
        effort = dashboard.correction_effort(s, dashboard.project_ref(s, pid))
    for (uid, body), row in zip(rows, effort.rows, strict=True):
        assert row.model_uid == uid and row.predictions == 8 and row.corrected == 7
        assert sum(row.bins) == 7 and row.bins[-1] == row.accepted
        assert 'data-total="7"' in body
        assert f"{row.accepted} of 7" in body
    # untrained (k=0): dice index (j + 0) % 6 for j = 1..7 -> 0.5, 0.9, 0.96, 0.99, 1.0, 0.1, 0.5: 3 accepted
    assert effort.rows[0].accepted == 3 and effort.rows[0].bins[10] == 2


def test_effort_page_reports_median_dice_and_seconds_per_image_from_the_annotations_lead_time(env: Env) -> None:
    pid = setup_project(env)
    seconds = [12.0, 30.0, None, 18.0]  # the third annotation carried no lead_time
    dices = [0.5, 0.97, 0.8, 0.2]
    with unit_of_work(env.factory) as s:
        project = s.get_one(Project, pid)
        for i, (t, d) in enumerate(zip(seconds, dices, strict=True)):
            frame, label = synthetic_frame(900 + i, (32, 32))
            image = add_image(s, env.store, project, frame, subject=f"t{i}", source=SourceInfo("import")).image
            corrected = add_mask_version(s, env.store, project, image, label, source="annotation").mask_version
            corrected.lead_time_seconds = t
            s.add(
                Prediction(
                    image_id=image.id,
                    model_version_uid="untrained",
                    corrected_mask_version_id=corrected.id,
                    correction_dice=d,
                )
            )
        frame, _ = synthetic_frame(999, (32, 32))  # served, never corrected: counted, not timed
        other = add_image(s, env.store, project, frame, subject="t9", source=SourceInfo("import")).image
        s.add(Prediction(image_id=other.id, model_version_uid="untrained"))
    with unit_of_work(env.factory) as s:
        effort = dashboard.correction_effort(s, dashboard.project_ref(s, pid))
    (row,) = effort.rows
    assert (row.predictions, row.corrected, row.timed, row.accepted) == (5, 4, 3, 1)
    assert row.median_dice == pytest.approx(0.65) and row.mean_dice == pytest.approx(0.6175)
    assert row.mean_seconds == pytest.approx(20.0) and row.median_seconds == pytest.approx(18.0)
    assert effort.lead_time_recorded
    html = env.get(f"/ui/projects/{pid}/effort").get_data(as_text=True)
    assert "not recorded yet" not in html
    assert "20.0 / 18.0" in html and "3 timed" in html and "0.650" in html

    # `sonoseg report effort` reads the same rows
    from click.testing import CliRunner

    from cli.main import cli

    cli_env = env.settings.to_env()
    as_json = CliRunner().invoke(cli, ["report", "effort", "--project", str(pid), "--json"], env=cli_env)
    assert as_json.exit_code == 0, as_json.output
    (version,) = json.loads(as_json.output)["versions"]
    assert version["model_version"] == "untrained" and version["corrected"] == 4 and version["timed"] == 3
    assert version["median_seconds"] == pytest.approx(18.0) and version["accepted_share"] == pytest.approx(0.25)
    text = CliRunner().invoke(cli, ["report", "effort", "--project", str(pid)], env=cli_env)
    assert text.exit_code == 0 and "untrained" in text.output and "20.0" in text.output, text.output
    missing = CliRunner().invoke(cli, ["report", "effort", "--project", "no-such-project"], env=cli_env)
    assert missing.exit_code != 0 and "no-such-project" in missing.output and "Traceback" not in missing.output


def test_runs_page_shows_progress_and_the_error_of_a_failed_run_and_its_json_follows_the_row(env: Env) -> None:
    pid = setup_project(env)
    populate(env, pid, runs=3)
    html = env.get(f"/ui/projects/{pid}/runs").get_data(as_text=True)
    assert "RuntimeError: CUDA out of memory (run 0)" in html
    assert 'data-poll-url="/ui/projects/' in html and "celery@host2" in html
    body = env.get(f"/ui/projects/{pid}/runs.json").get_json()
    assert body["active"] is True and body["total"] == 3
    newest = body["runs"][0]
    assert (newest["status"], newest["phase"], newest["epoch"], newest["loss"]) == ("running", "training", 3, 0.4213)
    with unit_of_work(env.factory) as s:
        run = s.get_one(TrainingRun, newest["id"])
        run.progress = {**run.progress, "epoch": 4, "loss": 0.3}
    assert env.get(f"/ui/projects/{pid}/runs.json").get_json()["runs"][0]["epoch"] == 4


def test_next_page_lists_the_ranking_with_scores_and_leases(env: Env) -> None:
    from backend.db.models import LabelLease
    from backend.model.scores import ImageScores
    from backend.services.scores import store_scores

    pid = setup_project(env)
    empty = env.get(f"/ui/projects/{pid}/next").get_data(as_text=True)
    assert 'id="empty-pool"' in empty and "none serves yet" in empty
    with unit_of_work(env.factory) as s:
        project = s.get_one(Project, pid)
        project.al_strategy = "entropy"
        ids = []
        for i in range(3):
            frame, _ = synthetic_frame(700 + i, (32, 32))
            added = add_image(s, env.store, project, frame, subject=f"n{i}", source=SourceInfo("import"))
            added.image.split = "train"
            ids.append(added.image.id)
        s.flush()
        version = record_version(s, project)
        vector = np.eye(8, dtype=np.float32)
        store_scores(s, version.id, {ids[0]: ImageScores(0.2, 0.1, 0.1, 0.3, vector[0])})
        store_scores(s, version.id, {ids[1]: ImageScores(0.8, 0.4, 0.5, 0.2, vector[1])})  # ids[2] not scored yet
        s.add(
            LabelLease(
                image_id=ids[0], project_id=pid, annotator="ann", leased_at=BASE, expires_at=BASE.replace(year=2099)
            )
        )
        uid = version.uid
    html = env.get(f"/ui/projects/{pid}/next").get_data(as_text=True)
    order = [int(i) for i in re.findall(r'<tr data-image="(\d+)">', html)]
    assert order == [ids[1], ids[0], ids[2]]  # by entropy, then the unscored one
    assert "2 of 3 pool images are scored" in html and uid in html and "<code>entropy</code>" in html
    row = re.search(rf'<tr data-image="{ids[0]}">(.*?)</tr>', html, re.S)
    assert row is not None and "ann" in row.group(1) and "0.200" in row.group(1)
    assert html == env.get(f"/ui/projects/{pid}/next").get_data(as_text=True)  # the same on reload


def test_unknown_project_is_a_404_page(env: Env) -> None:
    resp = env.get("/ui/projects/999/models")
    assert resp.status_code == 404 and "no project 999" in resp.get_data(as_text=True)
    assert env.get("/ui/projects/999/runs.json").get_json()["status"] == "error"


def test_dataset_page_computes_class_statistics_once_in_the_background_and_then_shows_them(env: Env) -> None:
    from backend.services.stats import dataset_stats

    pid = setup_project(env)
    populate(env, pid, images=8)
    first = env.get(f"/ui/projects/{pid}/dataset").get_data(as_text=True)
    assert 'data-split="train"' in first and "Computing the per-class statistics" in first
    assert ui_state(env.app).refresher.wait(60)
    assert env.get(f"/ui/projects/{pid}/dataset.json").get_json()["current"] is True
    html = env.get(f"/ui/projects/{pid}/dataset").get_data(as_text=True)
    assert "Computing" not in html
    with unit_of_work(env.factory) as s:
        expected = dataset_stats(s, env.store, s.get_one(Project, pid))
    for c in expected.classes:
        assert (
            f'<tr data-class="{c.name}"><td>{c.name}</td><td class="num">{c.images}</td><td class="num">{c.pixels}</td>'
            in html
        )
    assert html.count('class="chart bars"') == 5
    # a new label: the old statistics are shown as out of date while new ones are computed
    with unit_of_work(env.factory) as s:
        project = s.get_one(Project, pid)
        image = s.scalars(select(Image).where(Image.project_id == pid).order_by(Image.id.desc())).first()
        assert image is not None
        add_mask_version(s, env.store, project, image, np.ones((48, 64), np.uint8), source="annotation", author="carol")
    stale = env.get(f"/ui/projects/{pid}/dataset").get_data(as_text=True)
    assert "the data changed since" in stale and 'data-class="Nerve"' in stale
    assert ui_state(env.app).refresher.wait(60)
    assert env.get(f"/ui/projects/{pid}/dataset.json").get_json()["current"] is True


def test_review_queue_renders_each_thumbnail_once_and_caches_it_in_the_store(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = setup_project(env)
    populate(env, pid, images=8)
    rendered: list[int] = []
    real = dashboard.render_thumbnail

    def counting(*args: Any) -> bytes:
        rendered.append(1)
        return real(*args)

    monkeypatch.setattr(dashboard, "render_thumbnail", counting)
    env.get(f"/ui/projects/{pid}/review")
    assert ui_state(env.app).refresher.wait(60)
    html = env.get(f"/ui/projects/{pid}/review").get_data(as_text=True)
    items = re.findall(r'<figure class="review-item" data-rank="(\d+)" data-kind="([a-z_]+)">', html)
    thumbs = re.findall(r'src="/ui/thumbnails/([0-9a-f]{64})\.png"', html)
    assert items and len(thumbs) == len(items)
    assert "model_disagreement" in {kind for _, kind in items}
    assert len(set(thumbs)) <= len(rendered) <= len(thumbs)
    for sha in set(thumbs):
        assert env.store.exists(f"images/{sha[:2]}/{sha}.thumb.png")
    calls = len(rendered)
    for _ in range(3):  # requests read the cache: nothing is computed or rendered again
        assert env.get(f"/ui/projects/{pid}/review").status_code == 200
    assert not ui_state(env.app).refresher.busy("review", pid) and len(rendered) == calls
    # a new label elsewhere: the queue is recomputed, thumbnails of unchanged items are not re-rendered
    with unit_of_work(env.factory) as s:
        project = s.get_one(Project, pid)
        frame, _ = synthetic_frame(4242, (48, 64))
        image = add_image(
            s, env.store, project, frame, subject="late", source=SourceInfo("import"), split="train"
        ).image
        add_mask_version(
            s, env.store, project, image, np.zeros((48, 64), np.uint8), source="annotation", author="carol"
        )
    env.get(f"/ui/projects/{pid}/review")
    assert ui_state(env.app).refresher.wait(60)
    again = re.findall(
        r'src="/ui/thumbnails/([0-9a-f]{64})\.png"', env.get(f"/ui/projects/{pid}/review").get_data(as_text=True)
    )
    assert len(rendered) - calls == len(set(again) - set(thumbs))


# -- no N+1: statements per page do not grow with the data ------------------------------------------------
def count_statements(env: Env, path: str) -> int:
    engine = env.state.runtime.engine
    seen: list[str] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        resp = env.get(path)
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
    assert resp.status_code == 200, (path, resp.status_code)
    return len(seen)


def settled_counts(env: Env, pid: int) -> dict[str, int]:
    """Statements per page once the background computations are current (so none runs meanwhile)."""
    for path in (f"/ui/projects/{pid}/dataset", f"/ui/projects/{pid}/review"):
        env.get(path)
        assert ui_state(env.app).refresher.wait(60)
    return {path: count_statements(env, path) for path in pages(pid)}


def test_statements_per_page_do_not_grow_with_images_versions_predictions_or_runs(env: Env) -> None:
    pid = setup_project(env)
    populate(env, pid, images=4, versions=4, runs=2)
    small = settled_counts(env, pid)
    setup_project(env, ls_project=8)  # a second project on the overview
    with unit_of_work(env.factory) as s:
        s.execute(TrainingRun.__table__.update().where(TrainingRun.project_id == pid).values(status="succeeded"))
    populate(env, pid, images=16, versions=10, runs=6, seed=1)
    large = settled_counts(env, pid)
    assert large == small, {p: (small[p], large[p]) for p in small if small[p] != large[p]}
    assert max(small.values()) <= 12, small


def test_pages_render_for_an_empty_project(env: Env) -> None:
    pid = setup_project(env)
    for path in pages(pid):
        resp = env.get(path)
        assert resp.status_code == 200, path
    assert "No model version yet" in env.get(f"/ui/projects/{pid}/models").get_data(as_text=True)
    assert "No training run yet" in env.get(f"/ui/projects/{pid}/runs").get_data(as_text=True)
    assert "No labelled image yet" in env.get(f"/ui/projects/{pid}/dataset").get_data(as_text=True)


def test_thumbnail_route_serves_only_thumbnails(env: Env, tmp_path: Path) -> None:
    blob = env.store.put_bytes("images", b"\x89PNG not a thumbnail", ".png")
    assert env.get(f"/ui/thumbnails/{blob.sha256}.png").status_code == 404
    assert env.get("/ui/thumbnails/..%2Fsonoseg.db.png").status_code == 404
