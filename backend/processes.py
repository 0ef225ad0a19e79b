"""The processes a worker started, read from ``/proc`` (Linux; no psutil), and how to end them.

``sonoseg worker`` owns every process it forks: the prefork pool children, the beat embedded by
``--beat``, anything a task started. Celery stops those itself on a clean shutdown, but it does
not wait for the embedded beat (one SIGTERM, no join, no escalation) and nothing ties the beat's
life to the worker's: :func:`end_descendants` is the worker command's last step, and
:func:`die_with_parent` is run by the embedded beat when it starts (see docs/workers.md).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc")
GONE_STATES = ("Z", "X", "x")  # a zombie or a dead entry runs nothing


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    pgid: int
    state: str
    start_ticks: int  # with pid, identifies a process across pid reuse
    command: str

    @property
    def running(self) -> bool:
        return self.state not in GONE_STATES


def read_process(pid: int) -> ProcessInfo | None:
    """``/proc/<pid>/stat`` parsed; None when the process is gone (or there is no /proc)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return None
    except OSError:
        return None
    left, right = stat.find("("), stat.rfind(")")
    fields = stat[right + 2 :].split()
    try:
        return ProcessInfo(
            pid=pid,
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            state=fields[0],
            start_ticks=int(fields[19]),
            command=stat[left + 1 : right],
        )
    except (IndexError, ValueError):
        return None


def all_processes() -> list[ProcessInfo]:
    try:
        names = os.listdir(PROC)
    except OSError:
        return []
    found = (read_process(int(name)) for name in names if name.isdigit())
    return [p for p in found if p is not None]


def descendants(root: int) -> list[ProcessInfo]:
    """Every running process below ``root`` (children, grandchildren...), parents first."""
    by_parent: dict[int, list[ProcessInfo]] = {}
    for proc in all_processes():
        if proc.running:
            by_parent.setdefault(proc.ppid, []).append(proc)
    out: list[ProcessInfo] = []
    todo = [root]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            if child.pid != root and child not in out:
                out.append(child)
                todo.append(child.pid)
    return out


def _alive(proc: ProcessInfo) -> bool:
    now = read_process(proc.pid)
    return now is not None and now.running and now.start_ticks == proc.start_ticks


def _reap(procs: list[ProcessInfo]) -> None:
    """Collect those of ``procs`` that are exited children of this process (no zombies left);
    never ``waitpid(-1)``, which would steal other owners' children (subprocess.Popen)."""
    me = os.getpid()
    for proc in procs:
        if proc.ppid == me:
            try:
                os.waitpid(proc.pid, os.WNOHANG)
            except (ChildProcessError, OSError):
                pass


def _signal(proc: ProcessInfo, sig: int) -> None:
    if _alive(proc):
        try:
            os.kill(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def end_descendants(timeout: float, *, root: int | None = None, poll: float = 0.05) -> list[ProcessInfo]:
    """SIGTERM every process below ``root`` (default: this one), wait up to ``timeout`` seconds,
    SIGKILL what is left; returns the processes that had to be killed.

    Descendants are read once, before the first signal, so a grandchild re-parented to init when
    its parent exits is still ended. Pids are checked against their start time: a pid reused
    meanwhile is never signalled.
    """
    root = os.getpid() if root is None else root
    procs = descendants(root)
    if not procs:
        return []
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        _reap(procs)
        left = [p for p in procs if _alive(p)]
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    for proc in left:
        log.warning(
            "process %d (%s) did not exit within %.0f s of SIGTERM; killing it", proc.pid, proc.command, timeout
        )
        _signal(proc, signal.SIGKILL)
    end = time.monotonic() + 5.0
    while any(_alive(p) for p in left) and time.monotonic() < end:
        _reap(left)
        time.sleep(poll)
    _reap(procs)
    return left


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent ``parent`` dies (Linux
    ``PR_SET_PDEATHSIG``, what Celery does for its prefork pool children). If the parent is
    already gone, end now. False where the platform cannot do it."""
    try:
        from billiard.util import set_pdeathsig

        set_pdeathsig(sig)
    except (ImportError, OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
    return True
