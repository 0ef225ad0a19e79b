"""A signal to `sonoseg worker --beat` ends every process the worker started (issue item 16).

Real processes: the worker runs under `setsid` (its own session and process group, as
supervisors and `make run` start it), on SQLite with the embedded broker, prefork pool (the
default). After it has trained once (or run housekeeping ticks through its pool), the test
signals the worker's pid only, as `kill PID` does, and then reads /proc: no process of the
worker's process group may survive the worker's shutdown timeout.

- SIGTERM after a training run, SIGINT after ticks through the pool;
- a beat that ignores SIGTERM (what an orphaned beat amounts to): killed within the timeout;
- SIGKILL of the worker (a supervisor's last resort, the OOM killer): the embedded beat dies
  with it, the pool children too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from backend.db.migrate import upgrade
from backend.db.models import Project, SchedulerHeartbeat, TrainingRun
from backend.db.session import SessionFactory, make_engine, make_session_factory, unit_of_work
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.support.processes import WORKER_BOOT, WORKER_PRESET, worker_environment

pytestmark = [pytest.mark.slow, pytest.mark.sqlite, pytest.mark.xdist_group("sonoseg-workers")]

REPO = Path(__file__).resolve().parents[1]
SHUTDOWN_TIMEOUT = 3.0
# A beat that does not act on SIGTERM: the state an orphaned beat is in when its worker exits.
DEAF_BEAT = (
    textwrap.dedent("""
    import signal
    from celery.signals import beat_embedded_init

    @beat_embedded_init.connect(weak=False)
    def _deaf(**_kwargs):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
""")
    + WORKER_BOOT
)


def make_settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'data' / 'sonoseg.db'}",
        model_preset=WORKER_PRESET,
        device="cpu",
        train_max_minutes=0.04,
        retrain_debounce_seconds=1.0,
        dispatch_interval_seconds=1.0,
        train_heartbeat_seconds=0.5,
        train_stale_after_seconds=30.0,
        repredict_after_promotion=False,
        retrain_cron="off",
    )


def migrated_factory(settings: Settings) -> SessionFactory:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    return make_session_factory(engine)


def group_processes(pgid: int) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of every live process in process group ``pgid``, from /proc."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append((int(name), fields[0], cmdline[-80:]))
    return found


class Worker:
    def __init__(self, settings: Settings, log_path: Path, *, boot: str = WORKER_BOOT) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-c", boot, "worker", "--beat", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)],
            cwd=REPO,
            env=worker_environment(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # setsid: the worker leads its own process group
        )

    @property
    def pgid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.process.poll() is not None:
                raise AssertionError(
                    f"worker exited ({self.process.returncode}) waiting for {what}:\n{self.log()[-3000:]}"
                )
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.log()[-3000:]}")

    def close(self) -> None:
        """Whatever the test did: nothing of this worker's group is left running."""
        for pid, _state, _cmd in group_processes(self.pgid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.wait(10)
        self._log.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(settings: Settings, **kwargs: Any) -> Worker:
        worker = Worker(settings, tmp_path / f"worker-{len(started) + 1}.log", **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def queue_a_training_run(factory: SessionFactory, store: LocalBlobStore) -> int:
    from backend.model.synthetic import make_blob_pairs
    from backend.services.images import SourceInfo, add_image
    from backend.services.masks import add_mask_version
    from backend.services.training.requests import request_training

    with unit_of_work(factory) as s:
        project = Project(name="nerves", class_names=["Nerve", "Vessel"], auto_retrain=False)
        s.add(project)
        s.flush()
        for i, (pixels, mask) in enumerate(make_blob_pairs(6, size=(128, 128), seed=11)):
            image = add_image(s, store, project, pixels, subject=f"s{i}", source=SourceInfo("import")).image
            image.split = "train" if i < 4 else "val"
            s.flush()
            add_mask_version(s, store, project, image, np.asarray(mask, dtype=np.uint8), source="import")
        run = request_training(s, project, "manual")
        assert run is not None
        return run.id


def run_status(factory: SessionFactory, run_id: int) -> str | None:
    with factory() as s:
        return s.scalar(select(TrainingRun.status).where(TrainingRun.id == run_id))


def heartbeat_pid(factory: SessionFactory) -> int | None:
    with factory() as s:
        row = s.get(SchedulerHeartbeat, "beat")
        return row.pid if row is not None else None


def children_running(worker: Worker) -> list[tuple[int, str, str]]:
    """The worker's group besides the worker itself: its beat and pool processes."""
    return [p for p in group_processes(worker.pgid) if p[0] != worker.pgid]


def assert_group_gone_after(worker: Worker, sig: int, *, exit_within: float = 40.0) -> float:
    """Send ``sig`` to the worker's pid only; when the worker has exited, nothing of its group runs."""
    t0 = time.monotonic()
    os.kill(worker.process.pid, sig)
    try:
        worker.process.wait(exit_within)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"the worker did not exit within {exit_within:.0f} s of {signal.Signals(sig).name}:\n{worker.log()[-3000:]}"
        ) from None
    took = time.monotonic() - t0
    left = group_processes(worker.pgid)
    assert not left, (
        f"{signal.Signals(sig).name}: the worker exited after {took:.1f} s and left {left} running "
        f"(parent 1: orphaned)\n{worker.log()[-3000:]}"
    )
    return took


def test_sigterm_after_a_training_run_ends_the_embedded_beat_and_the_pool(
    tmp_path: Path, workers: Callable[..., Worker]
) -> None:
    settings = make_settings(tmp_path)
    factory = migrated_factory(settings)
    run_id = queue_a_training_run(factory, LocalBlobStore(settings.store_dir))
    worker = workers(settings)
    worker.wait_for(lambda: run_status(factory, run_id) in ("succeeded", "failed"), 50, "the training run")
    assert run_status(factory, run_id) == "succeeded", worker.log()[-3000:]
    before = children_running(worker)
    assert len(before) >= 2, before  # the embedded beat and one pool process
    assert_group_gone_after(worker, signal.SIGTERM)
    assert worker.process.returncode == 0
    assert "Warm shutdown" in worker.log()


def test_sigint_after_ticks_through_the_pool_ends_every_child(tmp_path: Path, workers: Callable[..., Worker]) -> None:
    settings = make_settings(tmp_path)
    factory = migrated_factory(settings)
    worker = workers(settings)
    # A dispatch tick ran through a pool process: it recorded the scheduler heartbeat, naming the
    # beat that sent it (a process of this worker's group, not the worker itself).
    beat_pid = worker.wait_for(lambda: heartbeat_pid(factory), 40, "a dispatch tick through the pool")
    assert beat_pid in {pid for pid, _s, _c in children_running(worker)}
    assert_group_gone_after(worker, signal.SIGINT)


def test_a_beat_deaf_to_sigterm_is_killed_within_the_shutdown_timeout(
    tmp_path: Path, workers: Callable[..., Worker]
) -> None:
    settings = make_settings(tmp_path)
    factory = migrated_factory(settings)
    worker = workers(settings, boot=DEAF_BEAT)
    worker.wait_for(lambda: heartbeat_pid(factory), 40, "beat to tick")
    took = assert_group_gone_after(worker, signal.SIGTERM)
    assert took >= SHUTDOWN_TIMEOUT  # it waited for the beat, then killed it
    assert "did not exit within" in worker.log() and "killed 1 process(es)" in worker.log()


def test_kill_9_of_the_worker_takes_its_embedded_beat_and_pool_along(
    tmp_path: Path, workers: Callable[..., Worker]
) -> None:
    settings = make_settings(tmp_path)
    factory = migrated_factory(settings)
    worker = workers(settings)
    worker.wait_for(lambda: heartbeat_pid(factory), 40, "beat to tick")
    assert len(children_running(worker)) >= 2
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait(10)
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT
    while group_processes(worker.pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_processes(worker.pgid), f"left behind by kill -9: {group_processes(worker.pgid)}"
