"""A queued run must not wait forever, silently, when no scheduler runs (issue item 15).

The scheduler heartbeat (``scheduler_heartbeat``, written by every dispatch tick and by beat
itself), its verdict with the allowance, stalled runs with their reason, and where it shows:
``sonoseg status``, ``/health``, and the log of a worker started without ``--beat``. On the real
database fixtures (SQLite, and PostgreSQL when SONOSEG_TEST_POSTGRES_URL is set).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, event, select

from backend.db.base import utcnow
from backend.db.models import Project, SchedulerHeartbeat, TrainingRun
from backend.db.session import SessionFactory, unit_of_work
from backend.services.scheduler import (
    SchedulerHealthCache,
    allowance_seconds,
    record_heartbeat,
    scheduler_health,
    stalled_runs,
)
from backend.services.status import collect_status
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore

FIX = "start `sonoseg beat` or `sonoseg worker --beat`"
T0 = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.UTC)


def ago(seconds: float, now: dt.datetime = T0) -> dt.datetime:
    return now - dt.timedelta(seconds=seconds)


def heartbeat_row(factory: SessionFactory, name: str = "beat") -> tuple[str | None, int | None, dt.datetime] | None:
    with factory() as s:
        row = s.get(SchedulerHeartbeat, name)
        return (row.host, row.pid, row.beat_at) if row is not None else None


def add_run(
    factory: SessionFactory,
    *,
    status: str = "queued",
    created: dt.datetime,
    not_before: dt.datetime | None,
    dispatched: dt.datetime | None = None,
    name: str = "p",
) -> int:
    with unit_of_work(factory) as s:
        project = Project(name=name, class_names=["Nerve"])
        s.add(project)
        s.flush()
        run = TrainingRun(
            project_id=project.id,
            trigger="start_training",
            status=status,
            created_at=created,
            not_before=not_before,
            dispatched_at=dispatched,
            started_at=created if status == "running" else None,
            heartbeat_at=created if status == "running" else None,
        )
        s.add(run)
        s.flush()
        return run.id


# -- the allowance -------------------------------------------------------------------------------------
def test_the_allowance_is_three_ticks_and_never_under_30_seconds() -> None:
    assert allowance_seconds(Settings(dispatch_interval_seconds=5.0)) == 30.0
    assert allowance_seconds(Settings(dispatch_interval_seconds=1.0)) == 30.0
    assert allowance_seconds(Settings(dispatch_interval_seconds=20.0)) == 60.0


# -- the heartbeat row -------------------------------------------------------------------------------------
def test_record_heartbeat_inserts_then_updates_one_row(factory: SessionFactory) -> None:
    with unit_of_work(factory) as s:
        record_heartbeat(s, host="a", pid=1, now=ago(10))
    assert heartbeat_row(factory) == ("a", 1, ago(10))
    with unit_of_work(factory) as s:
        record_heartbeat(s, host="b", pid=2, now=ago(5))
    assert heartbeat_row(factory) == ("b", 2, ago(5))
    with factory() as s:
        assert len(s.scalars(select(SchedulerHeartbeat)).all()) == 1


def test_a_late_writer_never_moves_the_heartbeat_back(factory: SessionFactory) -> None:
    """Beat and the worker running its tick both write: the later time wins, whoever writes last."""
    with unit_of_work(factory) as s:
        record_heartbeat(s, host="beat-host", pid=7, now=ago(1))
    with unit_of_work(factory) as s:
        record_heartbeat(s, host="worker-host", pid=8, now=ago(20))
    assert heartbeat_row(factory) == ("beat-host", 7, ago(1))


def test_concurrent_writers_leave_one_row(factory: SessionFactory) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def write(i: int) -> None:
        with unit_of_work(factory) as s:
            record_heartbeat(s, host=f"h{i}", pid=i, now=ago(30 - i))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(12)))
    row = heartbeat_row(factory)
    assert row is not None and row[2] == ago(30 - 11) and row[1] == 11


# -- the verdict ---------------------------------------------------------------------------------------------
def test_never_seen_is_not_ok_and_names_the_fix(factory: SessionFactory, settings: Settings) -> None:
    with factory() as s:
        health = scheduler_health(s, settings, now=T0)
    assert (health.ok, health.last_seen, health.age_seconds) == (False, None, None)
    assert FIX in health.message


def test_fresh_within_the_allowance_and_stale_past_it(factory: SessionFactory, settings: Settings) -> None:
    settings = settings.replace(dispatch_interval_seconds=5.0)  # allowance 30 s
    with unit_of_work(factory) as s:
        record_heartbeat(s, host="node1", pid=42, now=ago(29))
    with factory() as s:
        fresh = scheduler_health(s, settings, now=T0)
        stale = scheduler_health(s, settings, now=T0 + dt.timedelta(seconds=2))
    assert fresh.ok and fresh.age_seconds == pytest.approx(29) and fresh.last_seen == ago(29)
    assert "node1 pid 42" in fresh.message
    assert not stale.ok and stale.age_seconds == pytest.approx(31)
    assert "no scheduler seen for 31 s" in stale.message and FIX in stale.message


# -- stalled runs ---------------------------------------------------------------------------------------------
def test_a_run_queued_past_the_allowance_without_a_scheduler_is_stalled_with_the_fix(
    factory: SessionFactory, settings: Settings
) -> None:
    stalled_id = add_run(factory, created=ago(300), not_before=ago(100), name="a")
    add_run(factory, created=ago(300), not_before=ago(10), name="b")  # due 10 s ago: not yet
    add_run(factory, created=ago(300), not_before=T0 + dt.timedelta(seconds=60), name="c")  # debounce waiting
    add_run(factory, status="running", created=ago(900), not_before=ago(900), name="d")  # running: not queued
    created_only = add_run(factory, created=ago(45), not_before=None, name="e")  # no not_before: created counts
    with unit_of_work(factory) as s:
        record_heartbeat(s, host="old", pid=1, now=ago(600))
    with factory() as s:
        stalled = stalled_runs(s, settings, now=T0)
    assert [(r.run_id, round(r.queued_for_seconds)) for r in stalled] == [(stalled_id, 100), (created_only, 45)]
    for r in stalled:
        assert r.reason == f"no scheduler seen for 600 s: {FIX} (exactly one per deployment)"


def test_with_a_live_scheduler_the_reason_points_at_the_workers(factory: SessionFactory, settings: Settings) -> None:
    never_sent = add_run(factory, created=ago(200), not_before=ago(200), name="a")
    sent = add_run(factory, created=ago(200), not_before=ago(200), dispatched=ago(150), name="b")
    with unit_of_work(factory) as s:
        record_heartbeat(s, host="beat", pid=1, now=ago(2))
    with factory() as s:
        reasons = {r.run_id: r.reason for r in stalled_runs(s, settings, now=T0)}
    assert "housekeeping" in reasons[never_sent] and FIX not in reasons[never_sent]
    assert "train` queue" in reasons[sent] and FIX not in reasons[sent]


# -- the dispatch tick records it ---------------------------------------------------------------------------
def test_the_dispatch_tick_records_the_heartbeat_with_the_sender(factory: SessionFactory, settings: Settings) -> None:
    from workers.celery_app import make_celery
    from workers.names import TASK_DISPATCH
    from workers.tasks.housekeeping import sender_identity

    app = make_celery(settings)
    app.loader.import_default_modules()
    assert heartbeat_row(factory) is None
    before = utcnow()
    result = app.tasks[TASK_DISPATCH].apply()  # the task body, in this process
    assert result.successful(), result.traceback
    row = heartbeat_row(factory)
    assert row is not None and row[0] == socket.gethostname() and row[1] == os.getpid() and row[2] >= before
    # Beat's messages carry origin "gen<pid>@<host>": the row names the beat, not the worker.
    assert sender_identity("gen4242@beat-host") == ("beat-host", 4242)
    assert sender_identity("sonoseg-train@gpu1") == (socket.gethostname(), os.getpid())
    assert sender_identity(None) == (socket.gethostname(), os.getpid())


def test_beat_writes_its_own_heartbeat_after_sending_a_tick(factory: SessionFactory, settings: Settings) -> None:
    """So a worker busy with a long run (ticks queued behind it) does not make a live beat look dead."""
    from backend.runtime import Runtime
    from workers.signals import BeatHeartbeat

    beat = BeatHeartbeat()
    beat.sent()  # not started: not a beat process, nothing happens
    runtime = Runtime.from_settings(settings)
    try:
        beat.start(runtime, period=0.2)
        time.sleep(0.5)
        assert heartbeat_row(factory) is None  # nothing sent yet: nothing claimed
        beat.sent()
        deadline = time.monotonic() + 10
        while heartbeat_row(factory) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        row = heartbeat_row(factory)
        assert row is not None and row[1] == os.getpid()
    finally:
        runtime.close()


# -- sonoseg status ----------------------------------------------------------------------------------------------
def test_status_shows_the_scheduler_and_flags_stalled_runs(
    engine: Engine, factory: SessionFactory, settings: Settings, store: LocalBlobStore
) -> None:
    from cli.main import report_text

    run_id = add_run(factory, created=utcnow() - dt.timedelta(hours=1), not_before=None)
    report = collect_status(engine, store, settings=settings)
    sched = report["scheduler"]
    assert sched["ok"] is False and FIX in sched["message"]
    assert [s["run_id"] for s in sched["stalled_runs"]] == [run_id]
    text = report_text(report)
    assert "scheduler: WARNING: no scheduler has ever been seen" in text
    assert f"STALLED run {run_id}" in text and FIX in text

    with unit_of_work(factory) as s:
        record_heartbeat(s, host="node1", pid=9)
        s.get_one(TrainingRun, run_id).status = "cancelled"
    report = collect_status(engine, store, settings=settings)
    assert report["scheduler"]["ok"] is True and report["scheduler"]["stalled_runs"] == []
    assert "scheduler: ok: scheduler seen" in report_text(report) and "STALLED" not in report_text(report)


def test_sonoseg_status_on_the_command_line(tmp_path: Path) -> None:
    from cli.main import cli

    env = {"SONOSEG_DATA_DIR": str(tmp_path / "data")}
    runner = CliRunner()
    assert runner.invoke(cli, ["db", "upgrade"], env=env).exit_code == 0
    out = runner.invoke(cli, ["status"], env=env)
    assert out.exit_code == 0 and "scheduler: WARNING" in out.output and FIX in out.output, out.output


# -- /health -------------------------------------------------------------------------------------------------------
def test_health_reports_the_scheduler_and_reads_the_row_at_most_every_few_seconds(settings: Settings) -> None:
    from backend.api.app import AppState, create_app

    app = create_app(settings, start_background=False)
    state: AppState = app.extensions["sonoseg"]
    reads: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "scheduler_heartbeat" in statement:
            reads.append(statement)

    event.listen(state.runtime.engine, "before_cursor_execute", count)
    try:
        client = app.test_client()
        resp = client.get("/health")
        assert resp.status_code == 200
        body = resp.get_json()
        assert body["status"] == "UP" and body["scheduler"]["ok"] is False and FIX in body["scheduler"]["message"]
        with unit_of_work(state.factory) as s:
            record_heartbeat(s, host="node1", pid=5)
        for _ in range(20):
            assert client.get("/health").status_code == 200
        assert len(reads) == 1  # cached: one read for 21 requests
        assert client.get("/health").get_json()["scheduler"]["ok"] is False  # not re-read yet
    finally:
        event.remove(state.runtime.engine, "before_cursor_execute", count)
        state.close()


def test_the_health_cache_refreshes_in_the_background(factory: SessionFactory, settings: Settings) -> None:
    cache = SchedulerHealthCache(factory, settings, refresh_seconds=0.2)
    assert cache.get().ok is False
    with unit_of_work(factory) as s:
        record_heartbeat(s, host="node1", pid=5)
    time.sleep(0.3)
    cache.get()  # starts the refresh, answers with what it has
    deadline = time.monotonic() + 5
    while not cache.get().ok and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.get().ok and "node1 pid 5" in cache.get().message


def test_health_stays_200_when_the_database_cannot_be_read(settings: Settings) -> None:
    from backend.api.app import AppState, create_app

    app = create_app(settings, start_background=False)
    state: AppState = app.extensions["sonoseg"]

    def broken() -> None:
        raise RuntimeError("database unreachable")

    state.runtime.factory = broken  # type: ignore[assignment]
    try:
        resp = app.test_client().get("/health")
        assert resp.status_code == 200 and resp.get_json()["status"] == "UP"
        assert resp.get_json()["scheduler"]["ok"] is False
        assert "database unreachable" in resp.get_json()["scheduler"]["message"]
    finally:
        state.close()


# -- a worker without --beat warns ---------------------------------------------------------------------------------
def test_the_startup_check_warns_without_a_heartbeat_and_not_with_one(
    factory: SessionFactory, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from workers.signals import warn_without_scheduler

    with caplog.at_level(logging.INFO, logger="workers.signals"):
        assert warn_without_scheduler(settings, 30.0) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "without --beat" in warnings[0].getMessage() and FIX in warnings[0].getMessage()
    caplog.clear()
    with unit_of_work(factory) as s:
        record_heartbeat(s, host="node1", pid=5)
    with caplog.at_level(logging.INFO, logger="workers.signals"):
        assert warn_without_scheduler(settings, 30.0) is True
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.slow
@pytest.mark.sqlite
@pytest.mark.xdist_group("sonoseg-workers")
def test_a_worker_started_without_beat_logs_a_warning_naming_the_fix(tmp_path: Path) -> None:
    from tests.support.processes import WORKER_BOOT, worker_environment
    from tests.test_worker_shutdown import group_processes, migrated_factory

    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'data' / 'sonoseg.db'}",
        dispatch_interval_seconds=1.0,
        retrain_cron="off",
    )
    migrated_factory(settings)
    log_path = tmp_path / "worker.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", WORKER_BOOT, "worker", "-Q", "train"],
            cwd=Path(__file__).resolve().parents[1],
            env=worker_environment(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + allowance_seconds(settings) + 40
            text = ""
            while time.monotonic() < deadline and "runs without --beat" not in text:
                assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
                time.sleep(0.5)
                text = log_path.read_text(errors="replace")
            assert "WARNING" in text and "runs without --beat" in text and FIX in text, text[-3000:]
            os.kill(process.pid, signal.SIGTERM)
            process.wait(30)
            assert not group_processes(process.pid)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


@pytest.mark.slow
@pytest.mark.sqlite
@pytest.mark.xdist_group("sonoseg-workers")
def test_beat_is_seen_even_when_no_worker_runs_its_ticks(tmp_path: Path) -> None:
    """`--beat` on a worker that consumes only `train`: no tick ever runs, beat's own heartbeat shows."""
    from tests.support.processes import WORKER_BOOT, worker_environment
    from tests.test_worker_shutdown import group_processes, migrated_factory

    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'data' / 'sonoseg.db'}",
        dispatch_interval_seconds=1.0,
        retrain_cron="off",
    )
    factory = migrated_factory(settings)
    log_path = tmp_path / "worker.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", WORKER_BOOT, "worker", "-Q", "train", "--beat"],
            cwd=Path(__file__).resolve().parents[1],
            env=worker_environment(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 40
            while heartbeat_row(factory) is None and time.monotonic() < deadline:
                assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
                time.sleep(0.25)
            row = heartbeat_row(factory)
            assert row is not None, log_path.read_text(errors="replace")[-3000:]
            beat_pids = {pid for pid, _state, _cmd in group_processes(process.pid) if pid != process.pid}
            assert row[1] in beat_pids  # written by the embedded beat itself
            with factory() as s:
                assert scheduler_health(s, settings).ok
                assert s.scalar(select(TrainingRun.id)) is None
            assert "Task sonoseg.dispatch_due_runs[" not in log_path.read_text(errors="replace")  # no tick ran
            os.kill(process.pid, signal.SIGTERM)
            process.wait(30)
            assert not group_processes(process.pid)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
