"""Real worker processes (`sonoseg worker --pool solo --beat`) on SQLite with the embedded broker,
and on PostgreSQL with Redis when SONOSEG_TEST_POSTGRES_URL and SONOSEG_TEST_REDIS_URL are set.

- corrections posted to the backend's /webhook become exactly one training run and one new
  model version, which /setup then reports;
- kill -9 of the worker mid-training: the run is retried by the next worker, the previous model
  serves meanwhile, and no orphan checkpoint is left or registered.

The workers train a tiny preset (registered by the boot snippet below) within a 2-3 s budget.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from backend.db.migrate import upgrade
from backend.db.models import Image, ModelVersion, Project, TrainingRun
from backend.db.session import SessionFactory, make_engine, make_session_factory, unit_of_work
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.conftest import POSTGRES_URL, REDIS_URL
from tests.support.frames import blob_pairs
from tests.support.models import WORKER_TINY, register_model, save_tiny_checkpoint, tiny_spec
from tests.support.processes import WORKER_BOOT, WORKER_PRESET, worker_environment

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sonoseg-workers")]

REPO = Path(__file__).resolve().parents[1]
LS_PROJECT = 3


@dataclass
class Backend:
    name: str
    database_url: str
    broker_url: str = ""
    result_backend: str = ""
    namespace: str = ""


@pytest.fixture(
    params=[
        pytest.param("sqlite", marks=pytest.mark.sqlite, id="sqlite"),
        pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.redis], id="postgres-redis"),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", f"sqlite:///{tmp_path / 'data' / 'sonoseg.db'}")
    if not (POSTGRES_URL and REDIS_URL):
        pytest.skip("SONOSEG_TEST_POSTGRES_URL and SONOSEG_TEST_REDIS_URL are needed")

    # A namespace of this test's own: a worker left running by an earlier (killed) test run, or
    # another run sharing this Redis, must not take this test's messages (it did, in CI).
    namespace = f"sonoseg-test-{uuid.uuid4().hex[:12]}"
    request.addfinalizer(lambda: _drop_namespace(namespace))
    url: str = request.getfixturevalue("pg_scratch")()
    return Backend("postgres", url, REDIS_URL, REDIS_URL, namespace)


def _drop_namespace(namespace: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def make_settings(backend: Backend, tmp_path: Path, **changes: Any) -> Settings:
    base = Settings(
        data_dir=tmp_path / "data",
        database_url=backend.database_url,
        broker_url=backend.broker_url,
        result_backend=backend.result_backend,
        broker_namespace=backend.namespace,
        local_files_root=tmp_path / "files",
        model_preset=WORKER_PRESET,
        device="cpu",
        train_max_minutes=0.04,
        retrain_after=4,
        retrain_debounce_seconds=1.0,
        dispatch_interval_seconds=1.0,
        train_heartbeat_seconds=0.5,
        train_stale_after_seconds=3.0,
        train_max_attempts=2,
        repredict_after_promotion=False,
        retrain_cron="off",
        model_poll_seconds=0.2,
    )
    return base.replace(**changes)


class Worker:
    """`sonoseg worker --pool solo --beat` in its own process group (beat runs as a child)."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()/kill9()
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER_BOOT, "worker", "--pool", "solo", "--beat"],
            cwd=REPO,
            env=worker_environment(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill9(self) -> None:
        """What a power cut or the OOM killer does: no cleanup, no acknowledgement, nothing."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[[Settings], Worker]]:
    started: list[Worker] = []

    def start(settings: Settings) -> Worker:
        worker = Worker(settings, tmp_path / f"worker-{len(started) + 1}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, workers: list[Worker]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for worker in workers:
            if worker.process.poll() is not None:
                raise AssertionError(
                    f"worker exited ({worker.process.returncode}) while waiting for {what}:\n{worker.tail()}"
                )
        time.sleep(0.3)
    logs = "\n".join(w.tail() for w in workers)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def migrated_factory(settings: Settings) -> SessionFactory:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    return make_session_factory(engine)


def runs(factory: SessionFactory) -> list[TrainingRun]:
    with factory() as s:
        return list(s.scalars(select(TrainingRun).order_by(TrainingRun.id)))


def versions(factory: SessionFactory) -> list[ModelVersion]:
    with factory() as s:
        return list(s.scalars(select(ModelVersion).order_by(ModelVersion.id)))


def checkpoint_files(store: LocalBlobStore) -> set[str]:
    root = store.root / "checkpoints"
    return {str(p.relative_to(store.root)) for p in root.rglob("*.safetensors")} if root.exists() else set()


def frames(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return blob_pairs(n, seed=11)


def subjects_for_splits(key: bytes, project_id: int, wanted: dict[str, int]) -> list[tuple[str, str]]:
    """(subject hint, split) pairs giving ``wanted`` images per split, as sonoseg will assign them."""
    from backend.services.pseudonyms import pseudonymise
    from backend.services.splits import assign_split

    chosen: list[tuple[str, str]] = []
    left = dict(wanted)
    i = 0
    while any(left.values()):
        hint = f"patient-{i}"
        split = assign_split(pseudonymise(f"subject:{hint}", key), salt=str(project_id))
        if left.get(split, 0) > 0:
            chosen.append((hint, split))
            left[split] -= 1
        i += 1
    return chosen


def test_corrections_posted_to_the_backend_train_one_run_and_setup_serves_the_new_version(
    backend: Backend, tmp_path: Path, workers: Callable[[Settings], Worker]
) -> None:
    from backend.api.app import AppState, create_app
    from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
    from backend.services.pseudonyms import load_or_create_key
    from tests.support.frames import png_bytes
    from tests.support.payloads import annotation_event

    settings = make_settings(backend, tmp_path)
    factory = migrated_factory(settings)
    worker = workers(settings)
    app = create_app(settings, start_background=True)
    state: AppState = app.extensions["sonoseg"]
    try:
        client = app.test_client()
        setup = client.post("/setup", json={"project": f"{LS_PROJECT}.1764000000", "schema": DEFAULT_LABEL_CONFIG})
        assert setup.status_code == 200 and setup.get_json()["model_version"] == "untrained"
        with factory() as s:
            project_id = s.scalars(select(Project.id).where(Project.ls_project_id == LS_PROJECT)).one()

        # retrain_after = 4 corrections of training images, plus 2 validation images for the gate.
        plan = subjects_for_splits(load_or_create_key(settings.data_dir), project_id, {"train": 4, "val": 2})
        settings.local_files_root.mkdir(parents=True)  # type: ignore[union-attr]
        for i, ((hint, _split), (pixels, mask)) in enumerate(zip(plan, frames(len(plan)), strict=True)):
            name = f"frame{i}.png"
            (settings.local_files_root / name).write_bytes(png_bytes(pixels))  # type: ignore[operator]
            payload = annotation_event(
                "ANNOTATION_CREATED", 500 + i, 100 + i, f"/data/local-files/?d={name}", mask, ls_project_id=LS_PROJECT
            )
            payload["task"]["data"]["subject"] = hint
            resp = client.post("/webhook", json=payload)
            assert resp.status_code == 200 and resp.get_json()["status"] == "recorded", resp.get_json()

        def trained() -> bool:
            done = [r for r in runs(factory) if r.status in ("succeeded", "failed")]
            return bool(done) and any(v.status == "serving" for v in versions(factory))

        wait_for(trained, 150, "a training run and a serving model", [worker])

        def setup_version() -> str | None:
            uid: str = client.post("/setup", json={"project": LS_PROJECT}).get_json()["model_version"]
            return None if uid == "untrained" else uid

        served = wait_for(setup_version, 20, "/setup to report the new version", [worker])
        time.sleep(3 * settings.dispatch_interval_seconds)  # give a (wrong) second run the chance to appear
        all_runs, all_versions = runs(factory), versions(factory)
        summary = [(r.trigger, r.status, r.attempts) for r in all_runs]
        assert summary == [("annotations", "succeeded", 1)], all_runs[0].error
        assert [(v.uid, v.status) for v in all_versions] == [(served, "serving")]
        with factory() as s:
            version = s.get_one(ModelVersion, all_versions[0].id)
            snapshot_splits = sorted(s.get_one(Image, mv.image_id).split for mv in version.training_masks)
            expected_splits = sorted(split for _hint, split in plan)
            actual_splits = sorted(s.scalars(select(Image.split).where(Image.project_id == project_id)))
        assert actual_splits == expected_splits  # the subject hints landed where this test planned them
        assert snapshot_splits == ["train"] * 4
        assert version.metrics["n_val"] == 2 and version.checkpoint_sha256
        assert all_runs[0].device == "cpu" and all_runs[0].model_version_id == version.id
    finally:
        state.close()


def register_serving_model(factory: SessionFactory, store: LocalBlobStore, project_id: int, tmp_path: Path) -> str:
    """An untrained network of the workers' preset, serving: the model that must keep serving."""
    path = tmp_path / "v0.safetensors"
    save_tiny_checkpoint(path, spec=tiny_spec(**WORKER_TINY))
    return register_model(factory, store, project_id, path).uid


def test_kill_9_mid_training_retries_the_run_while_the_previous_model_keeps_serving(
    backend: Backend, tmp_path: Path, workers: Callable[[Settings], Worker]
) -> None:
    from backend.services.images import SourceInfo, add_image
    from backend.services.masks import add_mask_version
    from cli.main import cli

    settings = make_settings(backend, tmp_path, train_max_minutes=2.0)
    factory = migrated_factory(settings)
    store = LocalBlobStore(settings.store_dir)
    with unit_of_work(factory) as s:
        project = Project(name="nerves", class_names=["Nerve", "Vessel"], auto_retrain=False)
        s.add(project)
        s.flush()
        for i, (pixels, mask) in enumerate(frames(6)):
            image = add_image(s, store, project, pixels, subject=f"s{i}", source=SourceInfo("import")).image
            image.split = "train" if i < 4 else "val"
            s.flush()
            add_mask_version(s, store, project, image, mask, source="import")
        project_id = project.id
    before = register_serving_model(factory, store, project_id, tmp_path)

    first = workers(settings)
    env = {
        "SONOSEG_DATA_DIR": str(settings.data_dir),
        "SONOSEG_DATABASE_URL": settings.database_url,
        "SONOSEG_BROKER_URL": settings.broker_url,
        "SONOSEG_RESULT_BACKEND": settings.result_backend,
        "SONOSEG_BROKER_NAMESPACE": settings.broker_namespace,
    }
    queued = CliRunner().invoke(cli, ["train", "--project", "nerves"], env=env)
    assert queued.exit_code == 0 and "queued" in queued.output, queued.output

    def training() -> bool:
        run = runs(factory)[0]
        return run.status == "running" and run.progress.get("phase") == "training"

    wait_for(training, 90, "the run to be training", [first])
    time.sleep(1.5)
    first.kill9()

    (run,) = runs(factory)
    assert run.status == "running" and run.attempts == 1  # nobody knows yet
    assert [(v.uid, v.status) for v in versions(factory)] == [(before, "serving")]

    second = workers(make_settings(backend, tmp_path, train_max_minutes=0.04))
    wait_for(lambda: runs(factory)[0].status in ("succeeded", "failed"), 120, "the retried run to finish", [second])
    (run,) = runs(factory)
    assert (run.status, run.attempts) == ("succeeded", 2), run.error
    registered = versions(factory)
    assert len(registered) == 2 and registered[0].uid == before
    assert registered[1].status in ("serving", "candidate") and registered[1].gate_reason
    assert sum(v.status == "serving" for v in registered) == 1
    for version in registered:
        assert store.verify(version.checkpoint_key or "")
    assert checkpoint_files(store) == {v.checkpoint_key for v in registered}  # nothing orphaned by the kill
    scratch = settings.data_dir / "tmp" / "runs"
    wait_for(lambda: not any(scratch.iterdir()), 20, "the killed attempt's scratch files to be swept", [second])
    status = CliRunner().invoke(cli, ["status"], env=env)
    assert status.exit_code == 0 and f"run {run.id} manual succeeded on cpu" in status.output, status.output
