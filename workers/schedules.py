"""The beat schedule: the periodic housekeeping that keeps the retraining loop moving.

- every ``dispatch_interval_seconds``: hand queued runs whose debounce has passed to the broker
  (the outbox: the database row is the truth, a message is only a wake-up call);
- every minute: reap runs whose worker stopped sending heartbeats, and drain webhook events the
  server recorded but could not process;
- on ``retrain_cron`` (default 02:00 UTC): retrain every project whose labels changed since its
  last trained version (nothing changed: nothing runs).

Exactly one beat must run per deployment (``sonoseg beat``, or ``sonoseg worker --beat`` on a
single machine); two would only duplicate idempotent wake-ups, but waste work.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from backend.errors import InvalidInput
from backend.settings import Settings

HOUSEKEEPING_PERIOD_SECONDS = 60.0
_DISABLED = ("", "off", "none", "never", "false")


def parse_cron(expression: str) -> crontab | None:
    """``"m h dom mon dow"`` (UTC) -> a crontab; None when disabled ("off")."""
    text = expression.strip().lower()
    if text in _DISABLED:
        return None
    parts = text.split()
    if len(parts) != 5:
        raise InvalidInput(
            f"SONOSEG_RETRAIN_CRON must have 5 fields (minute hour day month weekday), got {expression!r}"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = parts
    try:
        return crontab(
            minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year, day_of_week=day_of_week
        )
    except ValueError as exc:
        raise InvalidInput(f"SONOSEG_RETRAIN_CRON {expression!r} is not a valid crontab: {exc}") from exc


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The ``beat_schedule`` config for ``settings`` (task names from workers.names)."""
    from workers.names import (
        TASK_DISPATCH,
        TASK_DRAIN_WEBHOOKS,
        TASK_REAP,
        TASK_SCHEDULED_RETRAIN,
        TASK_SCORE_NEW_IMAGES,
    )

    if settings.dispatch_interval_seconds <= 0:
        raise InvalidInput(f"SONOSEG_DISPATCH_INTERVAL_SECONDS must be > 0, got {settings.dispatch_interval_seconds}")
    housekeeping = min(HOUSEKEEPING_PERIOD_SECONDS, max(1.0, settings.train_stale_after_seconds / 2))
    # Expire periodic wake-ups that could not be delivered in time: the next one supersedes them.
    schedule: dict[str, dict[str, Any]] = {
        "dispatch-due-runs": {
            "task": TASK_DISPATCH,
            "schedule": settings.dispatch_interval_seconds,
            "options": {"expires": max(settings.dispatch_interval_seconds * 2, 5.0)},
        },
        "reap-stale-runs": {
            "task": TASK_REAP,
            "schedule": housekeeping,
            "options": {"expires": housekeeping * 2},
        },
        "drain-webhook-events": {
            "task": TASK_DRAIN_WEBHOOKS,
            "schedule": HOUSEKEEPING_PERIOD_SECONDS,
            "options": {"expires": HOUSEKEEPING_PERIOD_SECONDS * 2},
        },
        # Frames that arrived since the last promotion get the serving model's scores (active learning).
        "score-new-images": {
            "task": TASK_SCORE_NEW_IMAGES,
            "schedule": HOUSEKEEPING_PERIOD_SECONDS,
            "options": {"expires": HOUSEKEEPING_PERIOD_SECONDS * 2},
        },
    }
    nightly = parse_cron(settings.retrain_cron)
    if nightly is not None:
        schedule["scheduled-retrain"] = {
            "task": TASK_SCHEDULED_RETRAIN,
            "schedule": nightly,
            "options": {"expires": 3600},
        }
    return schedule
