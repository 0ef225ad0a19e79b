"""Progress for long curator commands: a tqdm bar on a terminal, a log line every so often otherwise.

Services never import this: they accept an ``on_item`` callback (one call per item done), and the
command passes the one this module yields.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger("sonoseg.progress")

LOG_EVERY_SECONDS = 10.0


@contextmanager
def progress_callback(what: str, *, total: int | None = None, unit: str = "item") -> Iterator[Callable[[], None]]:
    """Yield ``tick()``; a bar on stderr when it is a terminal, else an INFO line every 10 s."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, desc=what, unit=unit, file=sys.stderr, leave=False) as bar:

            def advance() -> None:
                bar.update(1)

            yield advance
        return
    done = 0
    started = last = time.monotonic()

    def tick() -> None:
        nonlocal done, last
        done += 1
        now = time.monotonic()
        if now - last >= LOG_EVERY_SECONDS:
            last = now
            rate = done / max(now - started, 1e-9)
            log.info("%s: %d%s %ss (%.1f/s)", what, done, f"/{total}" if total else "", unit, rate)

    yield tick
    if done:
        log.info("%s: %d %ss in %.1f s", what, done, unit, time.monotonic() - started)
