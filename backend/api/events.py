"""The server's background drain of recorded webhook events (:class:`EventDrainer`).

A webhook is only recorded inside the request (Label Studio waits 1 s); turning it into labels
(downloads, decoding) happens here, in a daemon thread, and in the Celery workers' periodic
drain, whichever comes first. Processing is idempotent, so both may run.
"""

from __future__ import annotations

import logging
import threading

from backend.api.metrics import Metrics
from backend.services.sync import LabelStudioMirror
from backend.services.webhooks import process_pending_events
from backend.settings import Settings

log = logging.getLogger(__name__)

EVENT_DRAIN_SECONDS = 0.5


class EventDrainer:
    """Processes pending webhook events in a daemon thread: every ~0.5 s, or at once when nudged."""

    def __init__(
        self, mirror: LabelStudioMirror, settings: Settings, metrics: Metrics, interval: float = EVENT_DRAIN_SECONDS
    ) -> None:
        self._mirror = mirror
        self._settings = settings
        self._metrics = metrics
        self._interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def nudge(self) -> None:
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sonoseg-webhook-events", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain_once(self) -> int:
        report = process_pending_events(self._mirror, self._settings)
        for result, count in (("processed", report.processed), ("ignored", report.ignored), ("failed", report.failed)):
            if count:
                self._metrics.events_processed.labels(result=result).inc(count)
        return report.total

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                while self.drain_once() and not self._stop.is_set():
                    pass  # a full batch: there may be more right away
            except Exception:  # the database may be briefly unavailable; the next round retries
                log.exception("webhook event processing failed; retrying in %.1f s", self._interval)
