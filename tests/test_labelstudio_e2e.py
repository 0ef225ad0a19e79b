"""End to end against a REAL Label Studio (1.23, from .venv-ls), driven through its API as a user would.

Label Studio runs on loopback with ``ML_BLOCK_LOCAL_IP=false`` and ``SSRF_PROTECTION_ENABLED=false``;
sonoseg runs as a real HTTP server with basic auth, a webhook secret, and a personal access token
(Label Studio's default key kind) to download task images. The model is the engine's tiny network
fitted for ~45 s to the uploaded images, so its predictions must overlap their labels.

The second test closes the loop with no further action: a real ``sonoseg worker --pool solo --beat``
(tiny preset, seconds of training) shares the server's SQLite database and the embedded broker;
annotations saved in Label Studio reach sonoseg through the webhook Label Studio created, trigger
exactly one training run, the new version serves (``/setup``), and the worker writes its
predictions for the unlabelled tasks back into Label Studio.

The ranking test (issue 12) publishes sonoseg's ranking into a project and asks Label Studio's label
stream for the next task as two signed-up sonographers: through the API, through the request the
web UI's Data Manager makes, and (where playwright and Chromium are installed) through the web UI.

The tests share one Label Studio (its first start migrates a database: the slow part).
Skipped, with the reason, when .venv-ls is missing; ``make test`` installs it in CI.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from numpy.typing import NDArray
from sqlalchemy import select

from backend.api.app import AppState, create_app
from backend.db.models import (
    Image,
    MaskVersion,
    ModelVersion,
    Prediction,
    Project,
    TrainingRun,
)
from backend.db.session import unit_of_work
from backend.labelstudio.client import SEQUENTIAL_SAMPLING, LabelStudioClient
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.services.ls_ranking import QUEUE_KEY, RANK_KEY, format_rank, publish_ranking, ranks_in_order
from backend.services.masks import read_mask
from backend.settings import Settings
from tests.support.frames import blob_pairs, dataset_pairs, png_bytes, synthetic_frame
from tests.support.models import CLASSES, register_model, train_tiny_model
from tests.support.payloads import brush_results
from tests.support.processes import (
    WORKER_PRESET,
    LabelStudio,
    label_studio_available,
    start_label_studio,
    start_worker,
    wait_for,
)
from tests.support.servers import ServedApp

pytestmark = [
    pytest.mark.labelstudio,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    # One Label Studio (a minute of start-up) per session, not one per xdist worker.
    pytest.mark.xdist_group("label-studio"),
]

N_IMAGES = 4
TRAIN_SECONDS = 45.0
USER, PASSWORD, SECRET = "label-studio", "basic-pass-2931", "webhook-secret-8812"


def _ok(resp: requests.Response, *codes: int) -> Any:
    assert resp.status_code in (codes or (200,)), (
        f"{resp.request.method} {resp.url}: {resp.status_code} {resp.text[:500]}"
    )
    return resp.json() if resp.content else None


def _tasks(ls: LabelStudio, api: requests.Session, pid: int) -> list[dict[str, Any]]:
    params: dict[str, str | int] = {"project": pid, "fields": "all", "page_size": 100}
    body = _ok(api.get(f"{ls.url}/api/tasks/", params=params))
    return sorted(body["tasks"], key=lambda t: t["id"])


def _predictions(ls: LabelStudio, api: requests.Session, task_id: int) -> list[dict[str, Any]]:
    body = _ok(api.get(f"{ls.url}/api/predictions/", params={"task": task_id}))
    return list(body if isinstance(body, list) else body["results"])


def _retrieve_predictions(ls: LabelStudio, api: requests.Session, pid: int, task_ids: list[int]) -> None:
    """The Data Manager's "Retrieve Predictions" action on the selected tasks."""
    params: dict[str, str | int] = {"id": "retrieve_tasks_predictions", "project": pid}
    _ok(
        api.post(
            f"{ls.url}/api/dm/actions", params=params, json={"selectedItems": {"all": False, "included": task_ids}}
        )
    )


def _decode(region: dict[str, Any]) -> NDArray[np.uint8]:
    from label_studio_sdk.converter.brush import decode_rle

    h, w = region["original_height"], region["original_width"]
    return np.asarray(decode_rle(region["value"]["rle"])).reshape(h, w, 4)[..., 3]


def _dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom


def _labels(state: AppState, ann_ids: list[int]) -> dict[int, list[MaskVersion]]:
    with unit_of_work(state.factory) as session:
        rows = session.scalars(
            select(MaskVersion).where(MaskVersion.ls_annotation_id.in_(ann_ids)).order_by(MaskVersion.version)
        ).all()
    out: dict[int, list[MaskVersion]] = {}
    for mv in rows:
        out.setdefault(int(mv.ls_annotation_id or 0), []).append(mv)
    return out


def _class_mask(regions: list[dict[str, Any]], shape: tuple[int, ...]) -> NDArray[np.uint8]:
    """The class-index mask (0 background, 1 Nerve, 2 Vessel) that brush ``regions`` paint."""
    mask = np.zeros(shape, np.uint8)
    for region in regions:
        mask[_decode(region) == 255] = 1 + CLASSES.index(region["value"]["brushlabels"][0])
    return mask


def _settings(ls: LabelStudio, sqlite_url: str, tmp_path: Path, **changes: Any) -> Settings:
    """sonoseg against ``ls`` with a personal access token, behind basic auth and a webhook secret, on the CPU;
    ``changes`` set any other field."""
    return Settings(
        data_dir=tmp_path / "sonoseg",
        database_url=sqlite_url,
        label_studio_url=ls.url,
        label_studio_api_key=ls.personal_access_token(),  # what a user creates under Account & Settings
        basic_auth_user=USER,
        basic_auth_password=PASSWORD,
        webhook_secret=SECRET,
        model_poll_seconds=0.2,
        device="cpu",
        **changes,
    )


def _create_project(
    ls: LabelStudio, api: requests.Session, title: str, label_config: str = DEFAULT_LABEL_CONFIG
) -> int:
    """A new Label Studio project; returns its id."""
    body = _ok(api.post(f"{ls.url}/api/projects/", json={"title": title, "label_config": label_config}), 201)
    return int(body["id"])


def _upload_pngs(ls: LabelStudio, api: requests.Session, pid: int, images: list[tuple[str, NDArray[np.uint8]]]) -> None:
    """Upload (file name, pixels) pairs as PNG files into project ``pid``: one task each."""
    files = [(f"file{i}", (name, png_bytes(img), "image/png")) for i, (name, img) in enumerate(images)]
    _ok(api.post(f"{ls.url}/api/projects/{pid}/import", files=files), 201)


def _connect_backend(
    ls: LabelStudio, api: requests.Session, pid: int, backend: ServedApp
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Connect sonoseg (served at ``backend``, basic auth) as project ``pid``'s ML backend and give the
    webhook Label Studio creates for it the secret; returns the ML backend and that webhook."""
    ml = _ok(
        api.post(
            f"{ls.url}/api/ml/",
            json={
                "project": pid,
                "url": backend.url,
                "title": "sonoseg",
                "auth_method": "BASIC_AUTH",
                "basic_auth_user": USER,
                "basic_auth_pass": PASSWORD,
            },
        ),
        201,
    )
    assert ml["state"] == "CO", ml
    hooks = _ok(api.get(f"{ls.url}/api/webhooks/", params={"project": pid}))
    (hook,) = [h for h in hooks if h["url"] == f"{backend.url}/webhook"]
    _ok(api.patch(f"{ls.url}/api/webhooks/{hook['id']}/", json={"headers": {"X-Sonoseg-Webhook-Secret": SECRET}}))
    return ml, hook


def _annotate(ls: LabelStudio, api: requests.Session, task_id: int, mask: NDArray[np.uint8], **fields: Any) -> Any:
    """Save an annotation of ``task_id`` painting ``mask`` (``fields`` join the body, e.g. ``lead_time``);
    returns it as Label Studio stored it."""
    body = {"result": brush_results(mask), "was_cancelled": False, **fields}
    return _ok(api.post(f"{ls.url}/api/tasks/{task_id}/annotations/", json=body), 201)


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    """One Label Studio for the module, returned while it still starts (tests call ``wait_ready``)."""
    reason = label_studio_available()
    if reason is not None:
        pytest.skip(reason)
    with start_label_studio(tmp_path_factory.mktemp("label-studio"), wait=False) as ls:
        yield ls


def test_label_studio_end_to_end(label_studio: LabelStudio, sqlite_url: str, tmp_path: Path) -> None:
    ls = label_studio
    pairs = dataset_pairs(N_IMAGES)
    model_path = tmp_path / "trained.safetensors"
    train_tiny_model([(img, mask) for _, img, mask in pairs], model_path, seconds=TRAIN_SECONDS)  # LS starts meanwhile
    ls.wait_ready()
    api = ls.api()
    settings = _settings(ls, sqlite_url, tmp_path)
    app = create_app(settings)
    state: AppState = app.extensions["sonoseg"]
    backend = ServedApp(app)
    try:
        # -- a project with the default label config, and real ultrasound images ------------------------
        pid = _create_project(ls, api, "sonoseg e2e")
        _upload_pngs(ls, api, pid, [(name, img) for name, img, _ in pairs])
        tasks = _tasks(ls, api, pid)
        assert len(tasks) == N_IMAGES
        truth = {}
        for task in tasks:
            ((_name, img, mask),) = [p for p in pairs if task["data"]["image"].endswith(p[0])]
            truth[task["id"]] = (img, mask)

        # -- connect the backend (basic auth) and give the auto-created webhook the secret -------------------
        ml, hook = _connect_backend(ls, api, pid, backend)

        # -- before any model: Label Studio stores an empty "untrained" prediction -----------------------------
        first = tasks[0]["id"]
        _retrieve_predictions(ls, api, pid, [first])
        (untrained,) = _predictions(ls, api, first)
        assert (untrained["model_version"], untrained["result"]) == ("untrained", [])

        # -- a trained model starts serving: /setup reports it, Label Studio asks again ----------------------
        with unit_of_work(state.factory) as session:
            project_id = session.scalars(select(Project.id).where(Project.ls_project_id == pid)).one()
        served_uid = register_model(state.factory, state.store, project_id, model_path).uid
        wait_for(lambda: state.holder.uid(project_id) == served_uid, 60, "the serving model to load")
        _retrieve_predictions(ls, api, pid, [t["id"] for t in tasks])
        overlaps = []
        for task in tasks:
            img, mask = truth[task["id"]]
            served = [p for p in _predictions(ls, api, task["id"]) if p["model_version"] == served_uid]
            assert len(served) == 1, served
            regions = served[0]["result"]
            assert regions, f"task {task['id']}: the trained model predicted nothing"
            for region in regions:
                assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image", "brushlabels")
                alpha = _decode(region)
                assert alpha.shape == img.shape  # the image's natural size
                assert set(np.unique(alpha).tolist()) <= {0, 255}  # visible: 0/255, not 0/1
            overlaps.append(_dice(_class_mask(regions, mask.shape) > 0, mask > 0))
        assert min(overlaps) > 0.1 and float(np.mean(overlaps)) > 0.3, overlaps

        # -- sonographers save corrected annotations: they arrive as mask versions ---------------------------
        ann_ids = []
        for task in tasks[:3]:
            _, mask = truth[task["id"]]
            ann_ids.append(_annotate(ls, api, task["id"], mask, lead_time=3.2)["id"])

        def all_arrived() -> dict[int, list[MaskVersion]] | None:
            got = _labels(state, ann_ids)
            return got if len(got) == 3 else None

        labels = wait_for(all_arrived, 60, "annotations to arrive as mask versions")
        for ann_id, task in zip(ann_ids, tasks[:3], strict=True):
            (mv,) = labels[ann_id]
            assert mv.is_current and mv.active and mv.source == "annotation"
            np.testing.assert_array_equal(read_mask(state.store, mv), truth[task["id"]][1])
        with unit_of_work(state.factory) as session:
            dices = session.scalars(
                select(Prediction.correction_dice).where(
                    Prediction.model_version_uid == served_uid, Prediction.ls_task_id.in_([t["id"] for t in tasks[:3]])
                )
            ).all()
        assert len(dices) == 3 and all(d is not None and 0.0 <= d <= 1.0 for d in dices)
        # Label Studio's lead_time of each real annotation is stored with its mask version ...
        assert [labels[a][0].lead_time_seconds for a in ann_ids] == [pytest.approx(3.2)] * 3
        # ... and `sonoseg report effort` reports this data per model version
        from click.testing import CliRunner

        from cli.main import cli

        effort = CliRunner().invoke(
            cli, ["report", "effort", "--project", str(project_id), "--json"], env=state.settings.to_env()
        )
        assert effort.exit_code == 0, effort.output
        rows = {r["model_version"]: r for r in json.loads(effort.output)["versions"]}
        assert (rows[served_uid]["corrected"], rows[served_uid]["timed"]) == (3, 3)
        assert rows[served_uid]["median_seconds"] == pytest.approx(3.2)
        assert rows[served_uid]["median_dice"] is not None

        # -- one is updated (a new version), one is deleted (inactive) ---------------------------------------
        corrected = truth[tasks[0]["id"]][1].copy()
        corrected[:64, :64] = 2
        _ok(api.patch(f"{ls.url}/api/annotations/{ann_ids[0]}/", json={"result": brush_results(corrected)}))

        def two_versions() -> list[MaskVersion] | None:
            versions = _labels(state, [ann_ids[0]]).get(ann_ids[0], [])
            return versions if len(versions) == 2 else None

        v1, v2 = wait_for(two_versions, 60, "the updated annotation's new version")
        assert (v1.is_current, v2.is_current, v2.version > v1.version) == (False, True, True)
        np.testing.assert_array_equal(read_mask(state.store, v2), corrected)
        _ok(api.delete(f"{ls.url}/api/annotations/{ann_ids[1]}/"), 204)
        wait_for(
            lambda: not any(mv.active for mv in _labels(state, [ann_ids[1]])[ann_ids[1]]),
            60,
            "the deleted annotation to become inactive",
        )

        # -- a webhook that never arrives is recovered by reconciliation before training ---------------------
        _ok(api.patch(f"{ls.url}/api/webhooks/{hook['id']}/", json={"is_active": False}))
        missed = _annotate(ls, api, tasks[3]["id"], truth[tasks[3]["id"]][1])
        assert _labels(state, [missed["id"]]) == {}

        # -- Start Training: Label Studio posts START_TRAINING; sonoseg reconciles and queues a run ---------
        _ok(api.post(f"{ls.url}/api/ml/{ml['id']}/train"))

        def queued() -> list[TrainingRun]:
            with unit_of_work(state.factory) as session:
                return list(session.scalars(select(TrainingRun).where(TrainingRun.project_id == project_id)))

        (run,) = wait_for(queued, 90, "a queued training run")
        assert (run.status, run.trigger) == ("queued", "start_training")
        (recovered,) = _labels(state, [missed["id"]])[missed["id"]]
        np.testing.assert_array_equal(read_mask(state.store, recovered), truth[tasks[3]["id"]][1])
    finally:
        backend.close()
        state.close()


# -- the closed loop: saves in Label Studio -> one run on a real worker -> new version -> new predictions --
RETRAIN_AFTER = 3
LOOP_LABELS = {"val": 1, "train": RETRAIN_AFTER}  # a validation label for the gate; saved before the training ones
LOOP_UNLABELLED = 2
LOOP_WAIT_SECONDS = 120.0


def _loop_frames(n: int) -> list[tuple[NDArray[np.uint8], NDArray[np.uint8]]]:
    """Small generated frames (128 px) a tiny network learns to find within seconds."""
    return blob_pairs(n, seed=23)


def _subjects_for_splits(settings: Settings, project_id: int, wanted: dict[str, int]) -> list[tuple[str, str]]:
    """(subject, split) pairs, in the order of ``wanted``, that sonoseg will put in those splits.

    Splits are assigned per subject (a keyed pseudonym of the task's ``subject`` field, salted
    with the project): the same functions, key and salt the server uses.
    """
    from backend.services.pseudonyms import load_or_create_key, pseudonymise
    from backend.services.splits import assign_split

    key = load_or_create_key(settings.data_dir)
    found: dict[str, list[str]] = {split: [] for split in wanted}
    i = 0
    while any(len(found[split]) < n for split, n in wanted.items()):
        hint = f"patient-{i}"
        split = assign_split(pseudonymise(f"subject:{hint}", key), salt=str(project_id))
        if split in found and len(found[split]) < wanted[split]:
            found[split].append(hint)
        i += 1
    return [(hint, split) for split in wanted for hint in found[split]]


def _served_predict_requests(state: AppState) -> float:
    """How many ``/predict`` requests this server answered (its Prometheus counter)."""
    total = 0.0
    for metric in state.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "sonoseg_http_requests_total" and sample.labels.get("endpoint") == "/predict":
                total += sample.value
    return total


def test_saved_annotations_retrain_and_refresh_predictions_with_no_further_action(
    label_studio: LabelStudio, sqlite_url: str, tmp_path: Path
) -> None:
    ls = label_studio
    ls.wait_ready()
    api = ls.api()
    settings = _settings(
        ls,
        sqlite_url,
        tmp_path,
        model_preset=WORKER_PRESET,
        train_max_minutes=0.05,
        retrain_after=RETRAIN_AFTER,
        retrain_debounce_seconds=1.0,
        dispatch_interval_seconds=1.0,
        train_heartbeat_seconds=1.0,
        repredict_after_promotion=True,
        retrain_cron="off",
    )
    app = create_app(settings)
    state: AppState = app.extensions["sonoseg"]
    backend = ServedApp(app)
    n_labelled = sum(LOOP_LABELS.values())
    frames = _loop_frames(n_labelled + LOOP_UNLABELLED)
    try:
        with start_worker(settings, tmp_path / "worker.log") as worker:  # it boots while Label Studio is set up
            # -- a project with images; the model connected; the webhook given the secret ----------------
            pid = _create_project(ls, api, "sonoseg loop e2e")
            _upload_pngs(ls, api, pid, [(f"loop{i}.png", img) for i, (img, _) in enumerate(frames)])
            tasks = _tasks(ls, api, pid)
            assert len(tasks) == len(frames)
            truth = {t["id"]: frames[int(t["data"]["image"].rsplit("loop", 1)[1].split(".")[0])][1] for t in tasks}
            _connect_backend(ls, api, pid, backend)
            with unit_of_work(state.factory) as session:
                project_id = session.scalars(select(Project.id).where(Project.ls_project_id == pid)).one()

            # -- each labelled task names its subject, so its split is known: 1 validation, N training ----
            plan = _subjects_for_splits(settings, project_id, LOOP_LABELS)
            labelled, unlabelled = tasks[:n_labelled], tasks[n_labelled:]
            for task, (subject, _split) in zip(labelled, plan, strict=True):
                _ok(api.patch(f"{ls.url}/api/tasks/{task['id']}/", json={"data": {**task["data"], "subject": subject}}))

            # -- sonographers save their annotations; nothing else is done by anyone ---------------------
            ann_ids = []
            for task in labelled:
                ann_ids.append(_annotate(ls, api, task["id"], truth[task["id"]], lead_time=4.0)["id"])

            def serving() -> ModelVersion | None:
                with unit_of_work(state.factory) as session:
                    return session.scalars(
                        select(ModelVersion).where(
                            ModelVersion.project_id == project_id, ModelVersion.status == "serving"
                        )
                    ).one_or_none()

            version = worker.wait_for(serving, LOOP_WAIT_SECONDS, "a new serving model version")
            uid = version.uid

            def setup_reports_it() -> bool:
                resp = requests.post(
                    f"{backend.url}/setup",
                    json={"project": pid, "schema": DEFAULT_LABEL_CONFIG},
                    auth=(USER, PASSWORD),
                    timeout=10,
                )
                return resp.status_code == 200 and resp.json()["model_version"] == uid

            worker.wait_for(setup_reports_it, 30, f"/setup to report {uid}")

            # -- the worker re-predicted the unlabelled tasks and wrote them into Label Studio ----------
            def refreshed() -> dict[int, dict[str, Any]] | None:
                found = {}
                for task in unlabelled:
                    mine = [p for p in _predictions(ls, api, task["id"]) if p["model_version"] == uid]
                    if len(mine) != 1:
                        return None
                    found[task["id"]] = mine[0]
                return found

            predictions = worker.wait_for(
                refreshed, LOOP_WAIT_SECONDS, f"predictions of {uid} in Label Studio", interval=1.0
            )
            for task_id, prediction in predictions.items():
                assert prediction["result"], f"task {task_id}: an empty prediction was written"
                for region in prediction["result"]:
                    assert (region["from_name"], region["to_name"], region["type"]) == ("tag", "image", "brushlabels")
                    assert _decode(region).shape == truth[task_id].shape
            for task in labelled:  # annotated tasks need no suggestion
                assert not [p for p in _predictions(ls, api, task["id"]) if p["model_version"] == uid]
            assert _served_predict_requests(state) == 0  # written by the worker, not asked for by Label Studio

            # -- exactly one run for those saves, trained on exactly the N training labels --------------
            time.sleep(3 * settings.dispatch_interval_seconds)  # room for a (wrong) second run to appear
            with unit_of_work(state.factory) as session:
                all_runs = list(session.scalars(select(TrainingRun).where(TrainingRun.project_id == project_id)))
                versions = list(session.scalars(select(ModelVersion).where(ModelVersion.project_id == project_id)))
                trained_on = session.get_one(ModelVersion, version.id).training_masks
                snapshot = sorted((mv.ls_annotation_id, session.get_one(Image, mv.image_id).split) for mv in trained_on)
            assert [(r.trigger, r.status, r.attempts) for r in all_runs] == [("annotations", "succeeded", 1)], (
                [r.error for r in all_runs],
                worker.tail(),
            )
            assert all_runs[0].model_version_id == version.id
            assert [(v.uid, v.status) for v in versions] == [(uid, "serving")]
            train_anns = [a for a, (_subject, split) in zip(ann_ids, plan, strict=True) if split == "train"]
            assert snapshot == sorted((a, "train") for a in train_anns)
            assert version.metrics["n_train"] == RETRAIN_AFTER and version.metrics["n_val"] == LOOP_LABELS["val"]
    finally:
        backend.close()
        state.close()


def test_a_curated_cine_dicom_is_pushed_corrected_in_label_studio_and_comes_back_to_the_same_frames(
    label_studio: LabelStudio, sqlite_url: str, tmp_path: Path
) -> None:
    """Curators (issue 13): import a cine DICOM with its multi-frame mask, push it into a Label
    Studio project sonoseg creates, see one task per frame with its mask, correct one in Label
    Studio, and see the correction arrive as a new mask version of the same stored frame."""
    import SimpleITK as sitk
    from click.testing import CliRunner

    from backend.runtime import Runtime
    from cli.main import cli
    from tests.support.datasets import Importer
    from tests.support.frames import synthetic_frame
    from tests.support.imaging import write_dicom

    ls = label_studio
    frames = [synthetic_frame(40 + i, (96, 128)) for i in range(3)]
    dicom = write_dicom(tmp_path / "cine.dcm", np.stack([img for img, _ in frames]), frames=3)
    mask_dir = tmp_path / "masks"
    mask_dir.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([m for _, m in frames])), str(mask_dir / "cine.nii.gz"))
    ls.wait_ready()
    api = ls.api()
    settings = _settings(ls, sqlite_url, tmp_path)
    runtime = Runtime.from_settings(settings)
    report = Importer(runtime.factory, runtime.store, settings)([dicom], project="cine", mask_dir=mask_dir)
    assert (report.images_added, report.masks_added, report.errors) == (3, 3, []), report
    with unit_of_work(runtime.factory) as session:
        stored = {
            image.frame_index: (image.id, image.subject)
            for image in session.scalars(select(Image).order_by(Image.frame_index))
        }
    runner = CliRunner()
    env = settings.to_env()
    created = runner.invoke(cli, ["project", "create-ls", "--project", "cine"], env=env, catch_exceptions=False)
    assert created.exit_code == 0, created.output
    with unit_of_work(runtime.factory) as session:
        pid = session.scalars(select(Project.ls_project_id).where(Project.name == "cine")).one()
    assert pid is not None

    pushed = runner.invoke(cli, ["push", "--project", "cine", "--json"], env=env, catch_exceptions=False)
    assert pushed.exit_code == 0, pushed.output
    assert '"pushed": 3' in pushed.output and '"annotations": 3' in pushed.output, pushed.output
    again = runner.invoke(cli, ["push", "--project", "cine", "--json"], env=env, catch_exceptions=False)
    assert '"pushed": 0' in again.output and '"already_pushed": 3' in again.output, again.output

    tasks = _tasks(ls, api, pid)
    assert len(tasks) == 3  # idempotent: the second push created nothing
    by_image = {t["data"]["sonoseg_image_id"]: t for t in tasks}
    assert set(by_image) == {image_id for image_id, _ in stored.values()}
    for index, (image_id, subject) in stored.items():
        task = by_image[image_id]
        assert task["data"]["sonoseg_subject"] == subject
        (ann,) = task["annotations"]
        np.testing.assert_array_equal(_class_mask(ann["result"], (96, 128)), frames[index][1])
        served = api.get(f"{ls.url}{task['data']['image']}", timeout=30)  # Label Studio serves the pushed frame
        assert served.status_code == 200 and served.content.startswith(b"\x89PNG"), served.status_code

    # -- connect sonoseg as the ML backend (its webhook carries the secret), then correct frame 1 ------
    app = create_app(settings)
    state: AppState = app.extensions["sonoseg"]
    backend = ServedApp(app)
    try:
        _connect_backend(ls, api, pid, backend)
        image_id = stored[1][0]
        ann_id = by_image[image_id]["annotations"][0]["id"]
        corrected = frames[1][1].copy()
        corrected[:20, :20] = 2
        _ok(api.patch(f"{ls.url}/api/annotations/{ann_id}/", json={"result": brush_results(corrected)}))

        def corrected_version() -> MaskVersion | None:
            with unit_of_work(state.factory) as session:
                return session.scalars(
                    select(MaskVersion).where(MaskVersion.ls_annotation_id == ann_id, MaskVersion.is_current)
                ).one_or_none()

        mv = wait_for(corrected_version, 60, "the correction to arrive as a mask version")
        assert mv.image_id == image_id and mv.source == "annotation" and mv.version == 2
        np.testing.assert_array_equal(read_mask(state.store, mv), corrected)
        with unit_of_work(state.factory) as session:
            assert session.scalars(select(Image.id)).all() == sorted(i for i, _ in stored.values())  # no new image

        # -- `export --format labelstudio` imports into Label Studio and its masks decode identically ----------
        out = tmp_path / "ls-export"
        exported = runner.invoke(
            cli, ["export", "--project", "cine", "--out", str(out), "--format", "labelstudio"], env=env
        )
        assert exported.exit_code == 0, exported.output
        import json

        other = _create_project(ls, api, "re-import", (out / "label_config.xml").read_text())
        _ok(api.post(f"{ls.url}/api/projects/{other}/import", json=json.loads((out / "tasks.json").read_text())), 201)
        current = {stored[i][0]: frames[i][1] for i in (0, 2)} | {image_id: corrected}
        reimported = _tasks(ls, api, other)
        assert len(reimported) == 3
        for task in reimported:
            (ann,) = task["annotations"]
            np.testing.assert_array_equal(
                _class_mask(ann["result"], (96, 128)), current[task["data"]["sonoseg_image_id"]]
            )
    finally:
        backend.close()
        state.close()
        runtime.close()


# -- Label Studio's own label stream follows sonoseg's ranking (issue 12) ------------------------------
RANKED_TASKS = 6
SONOGRAPHER_PASSWORD = "sonographer-pass-5127"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _sign_up(ls: LabelStudio, api: requests.Session, email: str) -> requests.Session:
    """A colleague joins the way Label Studio Community lets them: the organisation's invite link
    (``GET /api/invite``, as the admin), the sign-up form, then their own legacy API token
    (``GET /api/current-user/token``); an API session as them."""
    invite = f"{ls.url}{_ok(api.get(f'{ls.url}/api/invite'))['invite_url']}"
    session = requests.Session()
    form = session.get(invite, timeout=30)
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
    assert form.status_code == 200 and csrf, form.status_code
    fields = {"email": email, "password": SONOGRAPHER_PASSWORD, "csrfmiddlewaretoken": csrf.group(1)}
    signed = session.post(invite, data=fields, headers={"Referer": invite}, allow_redirects=False, timeout=30)
    assert signed.status_code == 302, signed.text[:500]  # signed up and logged in
    token = _ok(session.get(f"{ls.url}/api/current-user/token", timeout=30))["token"]
    user = requests.Session()
    user.headers["Authorization"] = f"Token {token}"
    return user


def _next_task(ls: LabelStudio, user: requests.Session, pid: int, view_id: int) -> int:
    """``GET /api/projects/<id>/next?view=<tab>``: the task Label Studio hands ``user`` (and locks to them)."""
    return int(_ok(user.get(f"{ls.url}/api/projects/{pid}/next", params={"view": view_id}, timeout=30))["id"])


def _label_as_displayed(ls: LabelStudio, user: requests.Session, pid: int, view_id: int) -> dict[str, Any]:
    """The request the web UI's *Label Tasks As Displayed* makes in tab ``view_id`` (as recorded from its
    Data Manager in Chromium, see the browser step of the test): the tab's ordering and filters in
    the body of ``POST /api/dm/actions?id=next_task``. The next task, with the queue that chose it."""
    data = _ok(user.get(f"{ls.url}/api/dm/views/{view_id}/", timeout=30))["data"]
    body = {"ordering": data["ordering"], "filters": data["filters"], "project": str(pid)}
    params: dict[str, str | int] = {"id": "next_task", "tabID": view_id, "project": pid}
    return dict(_ok(user.post(f"{ls.url}/api/dm/actions", params=params, json=body, timeout=30)))


def _label_as_displayed_in_chromium(ls: LabelStudio, pid: int, view_id: int, email: str) -> tuple[Any, int]:
    """In a real Chromium: log in as ``email``, open tab ``view_id``, press *Label Tasks As Displayed*;
    the body of the next-task request the Data Manager sent, and the id of the task it opened."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{ls.url}/user/login/")
            page.fill("input[name=email]", email)
            page.fill("input[name=password]", SONOGRAPHER_PASSWORD)
            page.click("button[type=submit], input[type=submit]")
            page.wait_for_load_state("networkidle")
            page.goto(f"{ls.url}/projects/{pid}/data?tab={view_id}")
            page.get_by_text("Label All Tasks").first.wait_for()
            with page.expect_response(lambda r: "id=next_task" in r.url) as answered:
                page.get_by_role("button", name="Toggle open").first.click()  # the arrow beside Label All Tasks
                page.get_by_text("Label Tasks As Displayed").first.click()
            response = answered.value
            assert f"tabID={view_id}" in response.url and response.ok, (response.url, response.status)
            return response.request.post_data_json, int(response.json()["id"])
        finally:
            browser.close()


def test_label_studio_hands_out_tasks_in_sonosegs_ranking_and_two_sonographers_get_different_ones(
    label_studio: LabelStudio,
) -> None:
    """Issue 12 (4): after ``publish_ranking``, the task Label Studio 1.23 Community hands out next is
    sonoseg's top-ranked one, and two sonographers get different tasks, both through the API's
    lock-aware label stream and through what the web UI's Data Manager sends."""
    ls = label_studio
    ls.wait_ready()
    api = ls.api()
    pid = _create_project(ls, api, "sonoseg ranking e2e")
    frames = [synthetic_frame(70 + i, (64, 64)) for i in range(RANKED_TASKS)]
    _upload_pngs(ls, api, pid, [(f"ranked{i}.png", img) for i, (img, _) in enumerate(frames)])
    tasks = _tasks(ls, api, pid)
    ids = [t["id"] for t in tasks]
    image_of = {t["id"]: t["data"]["image"] for t in tasks}
    mask_of = {t["id"]: frames[int(t["data"]["image"].rsplit("ranked", 1)[1].split(".")[0])][1] for t in tasks}
    order = [ids[i] for i in (3, 5, 0, 4, 2, 1)]  # sonoseg's ranking, best first: not the task-id order
    _ok(api.patch(f"{ls.url}/api/projects/{pid}/", json={"sampling": "Uniform sampling"}))  # random until published
    alice_email, bob_email = f"sonographer-a-{pid}@example.com", f"sonographer-b-{pid}@example.com"
    client = LabelStudioClient(ls.url, ls.personal_access_token())

    # -- publish: every task's rank in its data (image kept), the tab in that order, Sequential sampling --
    published = publish_ranking(client, pid, ranks_in_order(order), annotators=[alice_email, bob_email])
    assert (published.tasks_ranked, published.tasks_updated, published.missing) == (RANKED_TASKS, RANKED_TASKS, ())
    assert published.view_created and published.sampling_changed
    for task in _tasks(ls, api, pid):
        position = order.index(task["id"])
        assert task["data"]["image"] == image_of[task["id"]]
        assert task["data"][RANK_KEY] == format_rank(position + 1)
        assert task["data"][QUEUE_KEY] == (alice_email, bob_email)[position % 2]  # dealt out in turn
    assert _ok(api.get(f"{ls.url}/api/projects/{pid}/"))["sampling"] == SEQUENTIAL_SAMPLING
    listed = _ok(api.get(f"{ls.url}/api/tasks/", params={"view": published.view_id, "project": pid}))
    assert [t["id"] for t in listed["tasks"]] == order
    again = publish_ranking(client, pid, ranks_in_order(order), annotators=[alice_email, bob_email])
    assert not again.changed and again.tasks_unchanged == RANKED_TASKS, again  # idempotent: nothing written
    assert (again.view_id, again.annotator_views) == (published.view_id, published.annotator_views)

    alice, bob = _sign_up(ls, api, alice_email), _sign_up(ls, api, bob_email)

    # -- the API's label stream on the shared tab: ranked, and lock-aware -----------------------------------
    assert _next_task(ls, alice, pid, published.view_id) == order[0]
    assert _next_task(ls, bob, pid, published.view_id) == order[1]  # alice holds the first
    assert _next_task(ls, alice, pid, published.view_id) == order[0]  # she keeps hers

    # -- the web UI's Label Tasks As Displayed on the shared tab: ranked, but not lock-aware ----------------
    # (Label Studio 1.23's "Data manager queue" hands everyone the tab's first task; docs/labelstudio.md)
    shared = _label_as_displayed(ls, bob, pid, published.view_id)
    assert (shared["id"], shared["queue"]) == (order[0], "Data manager queue")

    # -- ... so each sonographer labels their own tab: their share, in ranking order, never the same task ---
    alice_tab, bob_tab = published.annotator_views[alice_email], published.annotator_views[bob_email]
    assert _label_as_displayed(ls, alice, pid, alice_tab)["id"] == order[0]
    assert _label_as_displayed(ls, bob, pid, bob_tab)["id"] == order[1]
    _annotate(ls, alice, order[0], mask_of[order[0]], lead_time=2.0)  # alice submits: her stream moves on
    assert _label_as_displayed(ls, alice, pid, alice_tab)["id"] == order[2]
    assert _label_as_displayed(ls, bob, pid, bob_tab)["id"] == order[1]
    assert _next_task(ls, bob, pid, published.view_id) == order[1]

    # -- the same through the Data Manager in a real browser (where playwright and Chromium are installed) --
    if CHROMIUM is not None and importlib.util.find_spec("playwright") is not None:
        sent, opened = _label_as_displayed_in_chromium(ls, pid, bob_tab, bob_email)
        assert opened == order[1]
        assert sent["ordering"] == [f"tasks:data.{RANK_KEY}"]
        queue_filters = [i for i in sent["filters"]["items"] if i["filter"] == f"filter:tasks:data.{QUEUE_KEY}"]
        assert [f["value"] for f in queue_filters] == [bob_email], sent
