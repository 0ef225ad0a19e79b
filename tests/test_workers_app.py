"""The Celery app's delivery settings and schedule, and the tasks' wiring through a real worker
thread on the embedded broker (SQLite file)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.schedules import crontab
from sqlalchemy import select

from backend.db.migrate import upgrade
from backend.db.models import Project, TrainingRun
from backend.db.session import make_engine, make_session_factory, unit_of_work
from backend.errors import InvalidInput
from backend.services.training import requests
from backend.settings import Settings
from workers.celery_app import make_celery, runtime_of
from workers.names import (
    QUEUES,
    TASK_DISPATCH,
    TASK_PREDICT_PROJECT,
    TASK_ROUTES,
    TASK_SCORE_NEW_IMAGES,
    TASK_SCORE_PROJECT,
    TASK_TRAIN,
)
from workers.schedules import beat_schedule, parse_cron


def test_delivery_is_late_acked_one_at_a_time_and_requeued_on_worker_loss(tmp_path: Path) -> None:
    app = make_celery(Settings(data_dir=tmp_path))
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert [q.name for q in conf.task_queues] == list(QUEUES) == ["train", "predict", "housekeeping"]
    assert conf.task_routes[TASK_TRAIN] == {"queue": "train"}
    assert conf.task_routes[TASK_PREDICT_PROJECT] == {"queue": "predict"}
    assert conf.broker_url.startswith("sqla+sqlite:///") and conf.result_backend.startswith("db+sqlite:///")
    assert not conf.worker_enable_remote_control  # the SQLAlchemy transport has no fanout exchange
    assert "visibility_timeout" not in (conf.broker_transport_options or {})


def test_redis_never_redelivers_a_run_that_is_still_within_its_budget(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        broker_url="redis://127.0.0.1:6379/0",
        result_backend="redis://127.0.0.1:6379/1",
        train_max_minutes=90,
    )
    conf = make_celery(settings).conf
    assert conf.broker_transport_options["visibility_timeout"] > 90 * 60
    assert conf.result_backend_transport_options["visibility_timeout"] > 90 * 60
    assert conf.worker_enable_remote_control and conf.worker_send_task_events  # Flower / celery events work


def test_a_broker_namespace_prefixes_every_redis_key(tmp_path: Path) -> None:
    plain = make_celery(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0")).conf
    assert "global_keyprefix" not in plain.broker_transport_options
    conf = make_celery(
        Settings(
            data_dir=tmp_path,
            broker_url="redis://127.0.0.1:6379/0",
            result_backend="redis://127.0.0.1:6379/1",
            broker_namespace="staging",
        )
    ).conf
    assert conf.broker_transport_options["global_keyprefix"] == "staging:"
    assert conf.result_backend_transport_options["global_keyprefix"] == "staging:"


@pytest.mark.redis
def test_two_namespaces_on_one_redis_never_see_each_others_messages(tmp_path: Path) -> None:
    """What the namespace is for: a worker of one installation cannot take the other's task."""
    import uuid

    import redis

    from tests.conftest import REDIS_URL

    if not REDIS_URL:
        pytest.skip("SONOSEG_TEST_REDIS_URL is needed")
    names = [f"sonoseg-test-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    apps = [
        make_celery(Settings(data_dir=tmp_path / n, broker_url=REDIS_URL, result_backend=REDIS_URL, broker_namespace=n))
        for n in names
    ]
    try:
        apps[0].send_task(TASK_DISPATCH, queue="housekeeping")
        with apps[1].connection_for_read() as conn:
            other = conn.default_channel.basic_get("housekeeping", no_ack=True)
        with apps[0].connection_for_read() as conn:
            mine = conn.default_channel.basic_get("housekeeping", no_ack=True)
        assert other is None
        assert mine is not None and mine.headers["task"] == TASK_DISPATCH
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for n in names:
            keys = list(client.scan_iter(match=f"{n}:*"))
            if keys:
                client.delete(*keys)
        client.close()


def test_every_task_has_a_stable_name_and_a_route(tmp_path: Path) -> None:
    app = make_celery(Settings(data_dir=tmp_path))
    app.loader.import_default_modules()
    names = {name for name in app.tasks if name.startswith("sonoseg.")}
    assert names == set(TASK_ROUTES)
    for name in names:
        assert app.tasks[name].acks_late, name


def test_beat_schedule_and_cron_parsing(tmp_path: Path) -> None:
    schedule = beat_schedule(Settings(data_dir=tmp_path, dispatch_interval_seconds=3, retrain_cron="30 1 * * 1-5"))
    assert schedule["dispatch-due-runs"]["schedule"] == 3 and schedule["dispatch-due-runs"]["task"] == TASK_DISPATCH
    nightly = schedule["scheduled-retrain"]["schedule"]
    assert isinstance(nightly, crontab) and nightly.hour == {1} and nightly.minute == {30}
    assert nightly.day_of_week == {1, 2, 3, 4, 5}
    assert "scheduled-retrain" not in beat_schedule(Settings(data_dir=tmp_path, retrain_cron="off"))
    assert schedule["score-new-images"]["task"] == TASK_SCORE_NEW_IMAGES
    assert TASK_ROUTES[TASK_SCORE_NEW_IMAGES] == {"queue": "housekeeping"}
    assert TASK_ROUTES[TASK_SCORE_PROJECT] == {"queue": "predict"}  # loads the model: where predictions run
    assert parse_cron("  OFF ") is None
    for bad in ("0 2 * *", "99 2 * * *"):
        with pytest.raises(InvalidInput, match="SONOSEG_RETRAIN_CRON"):
            parse_cron(bad)


@pytest.fixture
def embedded_app(tmp_path: Path) -> Iterator[Celery]:
    settings = Settings(data_dir=tmp_path / "data", device="cpu", train_stale_after_seconds=60)
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    app = make_celery(settings)
    yield app
    runtime_of(app).close()


def test_a_worker_thread_dispatches_runs_and_a_duplicate_message_is_a_no_op(embedded_app: Celery) -> None:
    rt = runtime_of(embedded_app)
    with unit_of_work(rt.factory) as s:
        project = Project(name="empty", class_names=["Nerve"])
        s.add(project)
        s.flush()
        run = requests.request_training(s, project, "manual")
        assert run is not None
        run_id = run.id
    factory = make_session_factory(rt.engine)

    def status() -> str:
        with factory() as s:
            return s.scalars(select(TrainingRun.status).where(TrainingRun.id == run_id)).one()

    with start_worker(embedded_app, pool="solo", perform_ping_check=False, shutdown_timeout=30, queues=list(QUEUES)):
        embedded_app.send_task(TASK_DISPATCH)  # what beat sends every few seconds
        deadline = time.monotonic() + 60
        while status() not in ("failed", "succeeded") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status() == "failed"  # nothing labelled: it fails, with a reason
        duplicate = embedded_app.send_task(TASK_TRAIN, args=[run_id]).get(timeout=60)
        assert duplicate == {"run_id": run_id, "status": "skipped"}
    with factory() as s:
        row = s.get_one(TrainingRun, run_id)
        assert row.attempts == 1 and "no labelled training image" in (row.error or "")
        assert row.dispatched_at is not None and row.celery_task_id
