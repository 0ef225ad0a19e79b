"""What the views of one app need, built once per app (per gunicorn worker): :class:`AppState`."""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import Flask, current_app

from backend.api.events import EventDrainer
from backend.api.metrics import Metrics
from backend.errors import NotReady
from backend.runtime import Runtime, RuntimeParts
from backend.services.serving import ModelHolder
from backend.settings import Settings

EXTENSION_KEY = "sonoseg"


@dataclass
class AppState(RuntimeParts):
    """The process's :class:`~backend.runtime.Runtime` plus what only the HTTP side has: the
    serving models, the metrics and the background webhook-event drain. ``factory``, ``store``
    and ``mirror`` are the runtime's (:class:`~backend.runtime.RuntimeParts`)."""

    runtime: Runtime
    holder: ModelHolder
    metrics: Metrics
    drainer: EventDrainer
    background: bool = False
    _closed: bool = field(default=False, repr=False)

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    def nudge_events(self) -> None:
        if self.background:
            self.drainer.nudge()

    def close(self) -> None:
        """Stop the background threads and release database connections (tests, shutdown)."""
        if self._closed:
            return
        self._closed = True
        self.drainer.stop()
        self.holder.stop()
        self.runtime.close()


def state_of(app: Flask | None = None) -> AppState:
    """The :class:`AppState` of ``app`` (default: the app handling the current request)."""
    state = (app or current_app).extensions.get(EXTENSION_KEY)
    if not isinstance(state, AppState):
        raise NotReady("this Flask app was not built by backend.api.app.create_app")
    return state
