"""Is a scheduler (Celery beat) running? Queued training runs move only when one does.

Runs are handed to the broker by beat's ``dispatch-due-runs`` tick (``workers/schedules.py``).
A deployment without a beat (``sonoseg worker`` without ``--beat`` and no ``sonoseg beat``)
accepts START_TRAINING and queues the run, which then waits forever. This module makes that
visible: the scheduler leaves a heartbeat row (``scheduler_heartbeat``), and ``sonoseg status``,
``/health`` and the worker's start-up log read it.

Who writes the heartbeat (both write the same row, ``name="beat"``; ``beat_at`` never moves back):

- every dispatch tick, on the worker that runs it (``workers/tasks/housekeeping.py``), with the
  identity of the process that sent the tick (beat), so the row proves beat -> broker -> worker;
- the beat process itself, after it sends a dispatch tick (``workers/signals.py``), so a worker
  busy with a long training run (one process, all queues: ticks wait behind the run) does not
  make a live beat look dead.

The allowance: a heartbeat older than ``max(3 x SONOSEG_DISPATCH_INTERVAL_SECONDS, 30 s)`` means
no scheduler is running (three missed ticks, and never less than 30 s so a slow tick or a
restart is not an alarm). A queued run still queued that long past its ``not_before`` (or its
creation) is *stalled*; :func:`stalled_runs` says why and what to do.

The caller opens the session (``unit_of_work``); nothing here commits.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from backend.db.base import utcnow
from backend.db.models import SchedulerHeartbeat, TrainingRun
from backend.db.session import SessionFactory, unit_of_work
from backend.settings import Settings

log = logging.getLogger(__name__)

BEAT = "beat"
MIN_ALLOWANCE_SECONDS = 30.0
MISSED_TICKS = 3
FIX = "start `sonoseg beat` or `sonoseg worker --beat` (exactly one per deployment)"


def allowance_seconds(settings: Settings) -> float:
    """How old the heartbeat may be before no scheduler counts as running: 3 ticks, >= 30 s."""
    return max(MISSED_TICKS * float(settings.dispatch_interval_seconds), MIN_ALLOWANCE_SECONDS)


def record_heartbeat(
    session: Session, *, name: str = BEAT, host: str | None, pid: int | None, now: dt.datetime | None = None
) -> None:
    """Upsert the heartbeat row ``name``: one statement, safe against concurrent writers
    (SQLite and PostgreSQL ``ON CONFLICT``); ``beat_at`` keeps the later of the two times."""
    now = now or utcnow()
    values = {"name": name[:64], "host": host[:200] if host else None, "pid": pid, "beat_at": now}
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    else:  # pragma: no cover - sonoseg runs on SQLite and PostgreSQL only
        row = session.get(SchedulerHeartbeat, values["name"], with_for_update=True)
        if row is None:
            session.add(SchedulerHeartbeat(**values))
        elif row.beat_at is None or row.beat_at <= now:
            row.host, row.pid, row.beat_at = host[:200] if host else None, pid, now
        session.flush()
        return
    stmt = insert(SchedulerHeartbeat).values(**values)
    newer = stmt.excluded.beat_at >= SchedulerHeartbeat.beat_at
    stmt = stmt.on_conflict_do_update(
        index_elements=[SchedulerHeartbeat.name],
        set_={
            "host": case((newer, stmt.excluded.host), else_=SchedulerHeartbeat.host),
            "pid": case((newer, stmt.excluded.pid), else_=SchedulerHeartbeat.pid),
            "beat_at": case((newer, stmt.excluded.beat_at), else_=SchedulerHeartbeat.beat_at),
        },
    )
    session.execute(stmt)


@dataclass(frozen=True)
class SchedulerHealth:
    last_seen: dt.datetime | None
    age_seconds: float | None
    ok: bool
    message: str

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "last_seen": self.last_seen.isoformat(timespec="seconds") if self.last_seen else None,
            "age_seconds": None if self.age_seconds is None else round(self.age_seconds, 1),
            "message": self.message,
        }


def judge_heartbeat(
    last_seen: dt.datetime | None,
    settings: Settings,
    *,
    now: dt.datetime | None = None,
    host: str | None = None,
    pid: int | None = None,
) -> SchedulerHealth:
    """The verdict on a heartbeat seen at ``last_seen`` (None: never), without the database."""
    now = now or utcnow()
    allowance = allowance_seconds(settings)
    if last_seen is None:
        return SchedulerHealth(
            None, None, False, f"no scheduler has ever been seen: queued training runs are never dispatched; {FIX}"
        )
    age = max(0.0, (now - last_seen).total_seconds())
    who = f" ({host or '?'} pid {pid})" if host or pid else ""
    if age <= allowance:
        return SchedulerHealth(last_seen, age, True, f"scheduler seen {age:.0f} s ago{who}")
    return SchedulerHealth(
        last_seen,
        age,
        False,
        f"no scheduler seen for {age:.0f} s (allowance {allowance:.0f} s, last{who}): "
        f"queued training runs are not dispatched; {FIX}",
    )


def scheduler_health(session: Session, settings: Settings, *, now: dt.datetime | None = None) -> SchedulerHealth:
    """Whether a scheduler was seen within :func:`allowance_seconds` (one primary-key read)."""
    row = session.get(SchedulerHeartbeat, BEAT)
    if row is None:
        return judge_heartbeat(None, settings, now=now)
    return judge_heartbeat(row.beat_at, settings, now=now, host=row.host, pid=row.pid)


@dataclass(frozen=True)
class StalledRun:
    run_id: int
    project_id: int
    queued_for_seconds: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "project_id": self.project_id,
            "queued_for_seconds": round(self.queued_for_seconds, 1),
            "reason": self.reason,
        }


def stalled_runs(session: Session, settings: Settings, *, now: dt.datetime | None = None) -> list[StalledRun]:
    """Runs still ``queued`` more than the allowance past their ``not_before`` (or creation),
    each with the likely reason and its fix."""
    now = now or utcnow()
    allowance = allowance_seconds(settings)
    due_since = func.coalesce(TrainingRun.not_before, TrainingRun.created_at)
    rows = session.execute(
        select(
            TrainingRun.id,
            TrainingRun.project_id,
            TrainingRun.not_before,
            TrainingRun.created_at,
            TrainingRun.dispatched_at,
        )
        .where(TrainingRun.status == "queued", due_since < now - dt.timedelta(seconds=allowance))
        .order_by(TrainingRun.id)
    ).all()
    if not rows:
        return []
    health = scheduler_health(session, settings, now=now)
    busy = session.scalar(select(func.count(TrainingRun.id)).where(TrainingRun.status == "running")) or 0
    stalled: list[StalledRun] = []
    for run_id, project_id, not_before, created_at, dispatched_at in rows:
        since = not_before or created_at
        waited = max(0.0, (now - since).total_seconds())
        if not health.ok:
            age = f"{health.age_seconds:.0f} s" if health.age_seconds is not None else "ever"
            reason = f"no scheduler seen for {age}: {FIX}"
        elif dispatched_at is None:
            reason = (
                "the scheduler runs but has not dispatched it: is a worker consuming the `housekeeping` "
                "queue? (`sonoseg worker -Q housekeeping`; see its log for dispatch errors)"
            )
        elif busy:
            reason = (
                f"dispatched, waiting for a free `train` worker ({busy} run(s) training); "
                "add a worker (`sonoseg worker -Q train`) if this is not expected"
            )
        else:
            reason = "dispatched but not claimed: start a worker on the `train` queue (`sonoseg worker -Q train`)"
        stalled.append(StalledRun(run_id, project_id, waited, reason))
    return stalled


class SchedulerHealthCache:
    """:func:`scheduler_health` for ``/health``, which must answer at once: the row is read in a
    background thread at most every ``refresh_seconds``; a request never waits on the database
    except (up to ``first_wait_seconds``) for the very first read."""

    def __init__(
        self,
        factory: SessionFactory,
        settings: Settings,
        *,
        refresh_seconds: float = 3.0,
        first_wait_seconds: float = 0.25,
    ) -> None:
        self._factory = factory
        self._settings = settings
        self._refresh = refresh_seconds
        self._first_wait = first_wait_seconds
        self._lock = threading.Lock()
        self._row: tuple[dt.datetime | None, str | None, int | None] | None = None
        self._error: str | None = None
        self._read_at = -float("inf")
        self._reading: threading.Event | None = None

    def _read(self, done: threading.Event) -> None:
        try:
            with unit_of_work(self._factory) as session:
                row = session.get(SchedulerHeartbeat, BEAT)
                value = (row.beat_at, row.host, row.pid) if row is not None else (None, None, None)
            with self._lock:
                self._row, self._error = value, None
        except Exception as exc:
            log.warning("reading the scheduler heartbeat failed: %s", exc)
            with self._lock:
                self._error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            with self._lock:
                self._read_at = time.monotonic()
                self._reading = None
            done.set()

    def get(self, *, now: dt.datetime | None = None) -> SchedulerHealth:
        with self._lock:
            reading = self._reading
            if reading is None and time.monotonic() - self._read_at >= self._refresh:
                reading = self._reading = threading.Event()
                threading.Thread(target=self._read, args=(reading,), name="scheduler-health", daemon=True).start()
            first = self._row is None and self._error is None
        if first and reading is not None:
            reading.wait(self._first_wait)
        with self._lock:
            row, error = self._row, self._error
        if row is None:
            message = f"scheduler heartbeat not readable: {error}" if error else "scheduler heartbeat not read yet"
            return SchedulerHealth(None, None, False, message)
        last_seen, host, pid = row
        return judge_heartbeat(last_seen, self._settings, now=now, host=host, pid=pid)
