"""Background computations of the dashboard, one per page and project at a time in this process.

The per-class dataset statistics and the review queue read every current label mask (seconds to
minutes on a large project), so a page never computes them in its request: it shows the newest
cached result and asks :class:`Refresher` to compute a current one in a daemon thread. A failed
computation is remembered with its message for :data:`RETRY_AFTER_SECONDS`, so a page that keeps
polling does not start it again and again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from backend.errors import SonosegError

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 60.0


@dataclass(frozen=True)
class Failure:
    digest: str
    at: float  # time.monotonic()
    message: str


class Refresher:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[tuple[str, int], threading.Thread] = {}
        self._failures: dict[tuple[str, int], Failure] = {}

    def request(self, kind: str, project_id: int, digest: str, work: Callable[[], object]) -> None:
        """Run ``work`` in a thread unless one for (kind, project) runs or it failed lately on ``digest``."""
        key = (kind, project_id)
        with self._lock:
            running = self._threads.get(key)
            if running is not None and running.is_alive():
                return
            failed = self._failures.get(key)
            if failed is not None and failed.digest == digest and time.monotonic() - failed.at < RETRY_AFTER_SECONDS:
                return
            thread = threading.Thread(
                target=self._run, args=(key, digest, work), name=f"sonoseg-ui-{kind}-{project_id}", daemon=True
            )
            self._threads[key] = thread
            thread.start()

    def _run(self, key: tuple[str, int], digest: str, work: Callable[[], object]) -> None:
        started = time.perf_counter()
        try:
            work()
        except SonosegError as exc:
            self._fail(key, digest, exc.message)
        except Exception as exc:  # a background thread must not die silently
            log.exception("dashboard: computing %s of project %s failed", *key)
            self._fail(key, digest, f"{type(exc).__name__}: {exc}")
        else:
            with self._lock:
                self._failures.pop(key, None)
            log.info("dashboard: %s of project %s computed in %.1f s", key[0], key[1], time.perf_counter() - started)

    def _fail(self, key: tuple[str, int], digest: str, message: str) -> None:
        log.warning("dashboard: %s of project %s could not be computed: %s", key[0], key[1], message)
        with self._lock:
            self._failures[key] = Failure(digest, time.monotonic(), message)

    def busy(self, kind: str, project_id: int) -> bool:
        with self._lock:
            thread = self._threads.get((kind, project_id))
            return thread is not None and thread.is_alive()

    def failure(self, kind: str, project_id: int, digest: str) -> str | None:
        with self._lock:
            failed = self._failures.get((kind, project_id))
        return failed.message if failed is not None and failed.digest == digest else None

    def wait(self, timeout: float = 30.0) -> bool:
        """Join every running computation (tests, benchmarks); True when none is left running."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = [t for t in self._threads.values() if t.is_alive()]
            if not threads:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            threads[0].join(left)
