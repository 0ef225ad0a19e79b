"""Worker and beat process signals.

- A forked pool child must not reuse its parent's database connections. Celery's prefork pool
  forks children after the parent may have touched the database (the outbox dispatcher), and a
  connection shared across a fork corrupts both sides' protocol state, so each child drops the
  inherited pool without closing the parent's sockets (SQLAlchemy's ``engine.dispose(close=False)``).
- The beat embedded by ``sonoseg worker --beat`` is a forked process that nothing ties to the
  worker (Celery sends it one SIGTERM at shutdown and never waits): it asks the kernel to kill it
  when the worker dies (``PR_SET_PDEATHSIG``, as Celery does for pool children). The worker
  command ends whatever is left when it exits (``backend/processes.py``, docs/workers.md).
- Beat leaves a scheduler heartbeat after it sends a dispatch tick (from a thread: the scheduler
  loop never waits on the database), so a worker busy training does not hide a live beat; the
  tick itself records it too (``workers/tasks/housekeeping.py``).
- A worker started without ``--beat`` warns, one allowance after it is ready, when no scheduler
  heartbeat has been seen: its queued runs would wait forever.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from typing import Any

from celery import current_app
from celery.signals import after_task_publish, beat_embedded_init, beat_init, worker_process_init, worker_ready

from backend.runtime import Runtime
from backend.settings import Settings

log = logging.getLogger(__name__)


@worker_process_init.connect
def dispose_inherited_engines(**_kwargs: Any) -> None:

    runtime = getattr(current_app, "sonoseg_runtime", None)
    if isinstance(runtime, Runtime):
        runtime.after_fork()
        log.debug("worker process init: inherited database connections dropped")


# -- the embedded beat dies with its worker -----------------------------------------------------------
@beat_embedded_init.connect
def embedded_beat_dies_with_the_worker(**_kwargs: Any) -> None:
    from billiard.process import current_process

    from backend.processes import die_with_parent

    parent = getattr(current_process(), "_parent_pid", None) or os.getppid()
    if die_with_parent(parent):
        log.debug("embedded beat (pid %d) will be killed if worker %d dies", os.getpid(), parent)


# -- beat's own heartbeat ------------------------------------------------------------------------------
class BeatHeartbeat:
    """In a beat process: after beat sends a dispatch tick, write the scheduler heartbeat (its
    send time) from a daemon thread, at most every ``period`` seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent_at: dt.datetime | None = None
        self._first = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, runtime: Runtime, period: float) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(
                target=self._loop, args=(runtime, period), name="sonoseg-beat-heartbeat", daemon=True
            )
            self._thread.start()

    def sent(self) -> None:
        if self._thread is None:  # not a beat process: a worker or a CLI sending a task
            return
        from backend.db.base import utcnow

        with self._lock:
            self._sent_at = utcnow()
        self._first.set()

    def _loop(self, runtime: Runtime, period: float) -> None:
        from backend.db.session import unit_of_work
        from backend.services.scheduler import record_heartbeat

        written: dt.datetime | None = None
        self._first.wait()
        while True:
            with self._lock:
                at = self._sent_at
            if at is not None and at != written:
                try:
                    with unit_of_work(runtime.factory) as session:
                        record_heartbeat(session, host=socket.gethostname(), pid=os.getpid(), now=at)
                    written = at
                except Exception as exc:
                    log.warning("beat: writing the scheduler heartbeat failed: %s", exc)
            time.sleep(period)


BEAT_HEARTBEAT = BeatHeartbeat()


@beat_init.connect
def start_beat_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    from backend.services.scheduler import allowance_seconds

    runtime = getattr(getattr(sender, "app", None), "sonoseg_runtime", None)
    if not isinstance(runtime, Runtime):
        return
    runtime.after_fork()  # the embedded beat is a fork of the worker: never share its connections
    BEAT_HEARTBEAT.start(runtime, period=allowance_seconds(runtime.settings) / 3)


@after_task_publish.connect
def note_dispatch_sent(sender: Any = None, **_kwargs: Any) -> None:
    from workers.names import TASK_DISPATCH

    if sender == TASK_DISPATCH:
        BEAT_HEARTBEAT.sent()


# -- a worker without beat says when no scheduler runs ------------------------------------------------
def warn_without_scheduler(settings: Settings, waited_seconds: float) -> bool:
    """Log a WARNING when no scheduler heartbeat is fresh; True when one is. Own engine, closed."""
    from backend.db.session import make_engine, make_session_factory, unit_of_work
    from backend.services.scheduler import scheduler_health

    engine = make_engine(settings.database_url)
    try:
        with unit_of_work(make_session_factory(engine)) as session:
            health = scheduler_health(session, settings)
    except Exception as exc:
        log.warning("could not read the scheduler heartbeat: %s", exc)
        return False
    finally:
        engine.dispose()
    if health.ok:
        log.info("scheduler check: %s", health.message)
        return True
    log.warning("this worker runs without --beat and %.0f s after start-up %s", waited_seconds, health.message)
    return False


@worker_ready.connect
def check_for_a_scheduler(sender: Any = None, **_kwargs: Any) -> None:
    from backend.services.scheduler import allowance_seconds

    controller = getattr(sender, "controller", None)
    if controller is None or getattr(controller, "beat", None) is not None:
        return  # beat runs inside this worker
    runtime = getattr(getattr(sender, "app", None), "sonoseg_runtime", None)
    if not isinstance(runtime, Runtime):
        return
    grace = allowance_seconds(runtime.settings)
    timer = threading.Timer(grace, warn_without_scheduler, args=(runtime.settings, grace))
    timer.name = "sonoseg-scheduler-check"
    timer.daemon = True
    timer.start()
