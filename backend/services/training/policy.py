"""The retrain policy, pure: thresholds, debounce, what counts as a change. No database.

See :mod:`backend.services.training.requests` for how the policy is applied to a project.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from backend.db.models import Project
from backend.settings import Settings

MAX_DEBOUNCE_FACTOR = 5.0
"""A burst of saves may delay a queued run by at most this many debounce periods in total."""


# -- policy: pure ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrainPolicy:
    """A project's effective policy: its overrides, else the settings."""

    retrain_after: int
    debounce_seconds: float
    max_minutes: float
    auto: bool


def policy_for(project: Project, settings: Settings) -> RetrainPolicy:
    return RetrainPolicy(
        retrain_after=project.retrain_after if project.retrain_after is not None else settings.retrain_after,
        debounce_seconds=settings.retrain_debounce_seconds,
        max_minutes=project.train_max_minutes if project.train_max_minutes is not None else settings.train_max_minutes,
        auto=bool(project.auto_retrain),
    )


def count_changes(current: Mapping[int, int], snapshot: Mapping[int, int]) -> int:
    """Images whose label differs between two ``{image_id: mask_version_id}`` maps (new, changed
    or removed)."""
    return sum(1 for image_id in set(current) | set(snapshot) if current.get(image_id) != snapshot.get(image_id))


def retrain_due(changed: int, policy: RetrainPolicy) -> bool:
    """Whether ``changed`` training labels warrant an automatic run (``retrain_after`` 0: never)."""
    return policy.auto and policy.retrain_after > 0 and changed >= policy.retrain_after


def debounce_until(now: dt.datetime, first_queued_at: dt.datetime, debounce_seconds: float) -> dt.datetime:
    """The new start deadline after a save: ``debounce`` from now, but never later than
    :data:`MAX_DEBOUNCE_FACTOR` periods after the run was queued (a steady stream of saves
    must not postpone training forever)."""
    period = dt.timedelta(seconds=max(0.0, debounce_seconds))
    return min(now + period, first_queued_at + MAX_DEBOUNCE_FACTOR * period)
