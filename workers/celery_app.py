"""The Celery app, built from :class:`~backend.settings.Settings` (broker, result backend, schedule).

Three queues, so a deployment can place work on the right machines:

- ``train``: training runs (GPU machines; one run at a time per worker process);
- ``predict``: batch re-prediction after a promotion (GPU or CPU);
- ``housekeeping``: light periodic work: hand due runs to the broker, reap runs whose worker
  died, drain pending webhook events, the nightly "anything changed?" retrain.

Delivery: tasks are acknowledged late and re-queued when their worker process dies
(``task_acks_late``, ``task_reject_on_worker_lost``), one message at a time
(``worker_prefetch_multiplier=1``). That is safe only because every task is idempotent: the
database row is the truth (a run is claimed by a compare-and-set on its status), so a duplicate
or redelivered message is a no-op. With Redis an unacknowledged message is redelivered after
``visibility_timeout``; it is set longer than the longest training budget.

The embedded default (kombu's SQLAlchemy transport on a SQLite file) needs no service but has no
fanout exchange, so remote control, mingle and gossip are off there (``sonoseg worker`` passes the
matching flags), and an unacknowledged message dies with its worker: the outbox dispatcher and
the stale-run reaper (``workers/tasks/housekeeping.py``) make that harmless.
"""

from __future__ import annotations

import logging

from celery import Celery
from kombu.entity import Queue

from backend.errors import NotReady
from backend.runtime import Runtime
from backend.settings import Settings
from workers.names import QUEUE_HOUSEKEEPING, QUEUES, TASK_MODULES, TASK_ROUTES

log = logging.getLogger(__name__)


def is_embedded_broker(broker_url: str) -> bool:
    """True for kombu's SQLAlchemy transport (no fanout: no remote control, mingle, gossip)."""
    return broker_url.startswith(("sqla+", "sqlalchemy+"))


def visibility_timeout_seconds(settings: Settings) -> int:
    """Longer than the longest training run, so Redis does not redeliver a run still training.

    Per-project budgets above the global one are not known here; the database claim makes a
    redelivery harmless anyway, it only costs a no-op task.
    """
    return int(max(3600.0, 2 * settings.train_max_minutes * 60 + 600))


def transport_options(settings: Settings) -> dict[str, object]:
    """Redis transport options: the redelivery delay and the key namespace of this installation.

    ``global_keyprefix`` (kombu and Celery's Redis backend) prefixes every key, queues, unacked
    sets and results alike, so installations sharing one Redis never see each other's messages.
    """
    options: dict[str, object] = {"visibility_timeout": visibility_timeout_seconds(settings)}
    if settings.broker_namespace:
        options["global_keyprefix"] = f"{settings.broker_namespace}:"
    return options


def make_celery(settings: Settings | None = None) -> Celery:
    """A new Celery app for ``settings`` (default: from the environment), tasks registered."""
    from workers import signals  # noqa: F401  (connects worker_process_init)
    from workers.schedules import beat_schedule

    settings = settings or Settings.from_env()
    app = Celery("sonoseg", include=list(TASK_MODULES))
    embedded = is_embedded_broker(settings.broker_url)
    conf: dict[str, object] = {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        "task_queues": tuple(Queue(name) for name in QUEUES),
        "task_default_queue": QUEUE_HOUSEKEEPING,
        "task_routes": TASK_ROUTES,
        "result_expires": 24 * 3600,
        "worker_enable_remote_control": not embedded,
        "worker_send_task_events": not embedded,
        "task_send_sent_event": not embedded,
        "beat_schedule": beat_schedule(settings),
        "beat_schedule_filename": str(settings.data_dir / "celerybeat-schedule"),
    }
    if not embedded:
        # Redis/SQS-style transports: redeliver only after the longest run (see the docstring).
        conf["broker_transport_options"] = transport_options(settings)
        if settings.result_backend.startswith(("redis://", "rediss://")):
            conf["result_backend_transport_options"] = transport_options(settings)
    app.conf.update(conf)
    app.sonoseg_runtime = Runtime.from_settings(settings)
    return app


def runtime_of(app: Celery) -> Runtime:
    """The process's :class:`~backend.runtime.Runtime` of an app made by :func:`make_celery`.

    Built lazily (first use in each process), so the prefork parent never opens a database
    connection its children would inherit; :mod:`workers.signals` drops any that were.
    """
    rt = getattr(app, "sonoseg_runtime", None)
    if not isinstance(rt, Runtime):
        raise NotReady("this Celery app was not built by workers.celery_app.make_celery: no sonoseg settings")
    return rt


def __getattr__(name: str) -> Celery:
    """``celery -A workers.celery_app flower|inspect|events``: an app from the environment, on demand.

    Nothing is built at import time; ``sonoseg worker`` and ``sonoseg beat`` call
    :func:`make_celery` themselves.
    """
    if name == "app":
        return make_celery()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
