"""A process-wide memory budget for image decodes: a byte semaphore with a bounded wait.

Why: ``/predict`` fetches and decodes up to four images at once (``FETCH_THREADS``), webhooks
and imports decode too, and one decode may briefly need several hundred MiB (see the bound in
:mod:`backend.imaging.io`). Each decode reserves its peak estimate, computed from the header
before a single pixel is decoded, and gives it back when it is done, so the decodes that run
together never hold more than ``capacity`` bytes between them.

* An estimate larger than the whole budget can never fit: it is refused at once with
  :class:`~backend.errors.PayloadTooLarge` (HTTP 413) naming both numbers.
* Otherwise the decode waits, first come first served (so one large image is not starved by a
  stream of small ones), for at most ``wait_seconds``; then :class:`DecodeBusy` (HTTP 503,
  "try again") is raised instead of hanging the request.

One budget per process (:func:`shared_budget`) is what every reader uses unless a caller passes
its own. It starts at :data:`DEFAULT_DECODE_MEMORY_BYTES`; the server sizes it from
``Settings.decode_memory_bytes`` (``SONOSEG_DECODE_MEMORY_BYTES``) through
``shared_budget(settings.decode_memory_bytes)``. This module does not import SimpleITK.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from backend.errors import InvalidInput, NotReady, PayloadTooLarge

DEFAULT_DECODE_MEMORY_BYTES = 1024 * 1024 * 1024
DEFAULT_WAIT_SECONDS = 30.0


class DecodeBusy(NotReady):
    """Other decodes held the memory budget for longer than a decode may wait (HTTP 503)."""


class DecodeBudget:
    """A byte semaphore: :meth:`reserve` holds ``nbytes`` of ``capacity`` for a ``with`` block.

    ``in_use`` and ``high_water`` (the most ever held at once) are there for metrics and tests.
    """

    def __init__(self, capacity: int, *, wait_seconds: float = DEFAULT_WAIT_SECONDS) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # waiting reservations, oldest first
        self._in_use = 0
        self._high_water = 0
        self.capacity = self._checked(capacity)
        self.wait_seconds = float(wait_seconds)

    @staticmethod
    def _checked(capacity: int) -> int:
        if int(capacity) <= 0:
            raise InvalidInput(f"the decode memory budget must be a positive number of bytes, not {capacity}")
        return int(capacity)

    @property
    def in_use(self) -> int:
        with self._cond:
            return self._in_use

    @property
    def high_water(self) -> int:
        with self._cond:
            return self._high_water

    def set_capacity(self, capacity: int) -> None:
        """Resize; reservations already held keep their bytes, waiters re-check at once."""
        with self._cond:
            self.capacity = self._checked(capacity)
            self._cond.notify_all()

    def reset_high_water(self) -> None:
        with self._cond:
            self._high_water = self._in_use

    @contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold ``nbytes`` while the block runs; ``what`` names the image in errors."""
        nbytes = max(0, int(nbytes))
        self._acquire(nbytes, what)
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= nbytes
                self._cond.notify_all()

    def _acquire(self, nbytes: int, what: str) -> None:
        with self._cond:
            if nbytes > self.capacity:
                raise PayloadTooLarge(
                    f"{what}: decoding needs an estimated {nbytes} bytes of memory, more than the whole "
                    f"{self.capacity}-byte decode memory budget (SONOSEG_DECODE_MEMORY_BYTES); "
                    "send a smaller image or raise the budget"
                )
            ticket = object()
            self._queue.append(ticket)
            deadline = time.monotonic() + self.wait_seconds
            try:
                while self._queue[0] is not ticket or self._in_use + nbytes > self.capacity:
                    if nbytes > self.capacity:  # the budget shrank while we waited
                        raise PayloadTooLarge(
                            f"{what}: decoding needs an estimated {nbytes} bytes of memory, more than the "
                            f"whole {self.capacity}-byte decode memory budget (SONOSEG_DECODE_MEMORY_BYTES)"
                        )
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DecodeBusy(
                            f"{what}: waited {self.wait_seconds:g} s for {nbytes} bytes of the "
                            f"{self.capacity}-byte decode memory budget ({self._in_use} bytes held by other "
                            "decodes); the server is busy decoding other images, try again"
                        )
                    self._cond.wait(remaining)
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now
                raise
            self._queue.popleft()
            self._in_use += nbytes
            self._high_water = max(self._high_water, self._in_use)
            self._cond.notify_all()  # the next in line may fit too


_SHARED = DecodeBudget(DEFAULT_DECODE_MEMORY_BYTES)


def shared_budget(capacity: int | None = None) -> DecodeBudget:
    """The process-wide budget; with ``capacity`` (from settings), resized to it first."""
    if capacity is not None and int(capacity) != _SHARED.capacity:
        _SHARED.set_capacity(capacity)
    return _SHARED
