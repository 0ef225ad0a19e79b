"""Worker process signals: a forked pool child must not reuse its parent's database connections.

Celery's prefork pool forks children after the parent may have touched the database (the beat
embedded in ``sonoseg worker --beat``, or the outbox dispatcher). A connection shared across a fork
corrupts both sides' protocol state, so each child drops the inherited pool without closing the
parent's sockets (SQLAlchemy's documented ``engine.dispose(close=False)``).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import current_app
from celery.signals import worker_process_init

log = logging.getLogger(__name__)


@worker_process_init.connect
def dispose_inherited_engines(**_kwargs: Any) -> None:
    from workers.celery_app import WorkerRuntime

    runtime = getattr(current_app, "sonoseg_runtime", None)
    if isinstance(runtime, WorkerRuntime):
        runtime.after_fork()
        log.debug("worker process init: inherited database connections dropped")
