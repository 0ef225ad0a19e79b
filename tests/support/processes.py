"""Real processes for end-to-end tests: Label Studio from ``.venv-ls`` and ``sonoseg worker``.

- :func:`start_label_studio`: a REAL Label Studio on loopback with a fresh SQLite database, a user
  and a legacy token (:data:`~tests.support.fake_labelstudio.LEGACY_TOKEN`).
- :func:`start_worker`: a real ``sonoseg worker --pool solo --beat`` process whose environment is
  ``settings.to_env()`` (:func:`worker_environment`), so it reads the very
  :class:`~backend.settings.Settings` the server under test runs on, training the tiny
  :data:`WORKER_PRESET`.
- :func:`wait_for`: poll until something holds, or fail the test saying what did not happen.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from backend.settings import Settings
from tests.support.fake_labelstudio import LEGACY_TOKEN
from tests.support.models import TINY, WORKER_TINY
from tests.support.servers import free_port

REPO = Path(__file__).resolve().parents[2]
LS_VENV = REPO / ".venv-ls"


# -- a real Label Studio -----------------------------------------------------------------------------
@dataclass
class LabelStudio:
    url: str
    legacy_token: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self) -> requests.Session:
        s = requests.Session()
        s.headers["Authorization"] = f"Token {self.legacy_token}"
        return s

    _pat: str | None = field(default=None, init=False, repr=False)

    def wait_ready(self, timeout: float = 300.0) -> None:
        _wait_ready(self, timeout)

    def personal_access_token(self) -> str:
        """The admin's personal access token (Account & Settings -> Create), made on first use.

        Label Studio allows one live token per user (a second ``POST /api/token/`` is refused),
        so tests sharing one server share it.
        """
        if self._pat is None:
            resp = self.api().post(f"{self.url}/api/token/", timeout=30)
            if resp.status_code != 201:
                raise RuntimeError(f"POST /api/token/: {resp.status_code} {resp.text[:300]}")
            self._pat = str(resp.json()["token"])
        return self._pat


def label_studio_available() -> str | None:
    """None when .venv-ls can run Label Studio, else the reason it cannot."""
    exe = LS_VENV / "bin" / "label-studio"
    if not exe.exists():
        return f"{exe} is missing (`make test` installs Label Studio into .venv-ls)"
    return None


@contextmanager
def start_label_studio(tmp: Path, *, wait: bool = True, timeout: float = 300.0) -> Iterator[LabelStudio]:
    """A real Label Studio on 127.0.0.1 with a fresh SQLite database, a user and a legacy token.

    ``ML_BLOCK_LOCAL_IP`` and ``SSRF_PROTECTION_ENABLED`` are off, so it may call a backend and
    a webhook on loopback (Label Studio 1.23.1+ refuses them by default); its check for a newer
    release on PyPI is off too. Its first start migrates a new database (about a minute):
    ``wait=False`` returns at once, so the caller can work meanwhile and call ``wait_ready``.
    """
    port = free_port()
    data_dir = tmp / "ls-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = tmp / "label-studio.log"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "SONOSEG_", "DJANGO_", "DATABASE_"))
    }
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
            "HOME": str(tmp),  # keep ~/.local/share/label-studio out of the real home
            "PATH": f"{LS_VENV / 'bin'}:{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(LS_VENV),
        }
    )
    cmd = [
        str(LS_VENV / "bin" / "label-studio"),
        "start",
        "--no-browser",
        "--host",
        f"http://127.0.0.1:{port}",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--username",
        "admin@example.com",
        "--password",
        secrets.token_hex(12),
        "--user-token",
        LEGACY_TOKEN,
        "--enable-legacy-api-token",
    ]
    log = open(log_path, "wb")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ls = LabelStudio(f"http://127.0.0.1:{port}", LEGACY_TOKEN, data_dir, process, log_path)
    try:
        if wait:
            ls.wait_ready(timeout)
        yield ls
    finally:
        _stop(process)
        log.close()


def _wait_ready(ls: LabelStudio, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    api = ls.api()
    while time.monotonic() < deadline:
        if ls.process.poll() is not None:
            raise RuntimeError(f"Label Studio exited with {ls.process.returncode}:\n{_tail(ls.log_path)}")
        try:
            if api.get(f"{ls.url}/api/projects/", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"Label Studio did not answer within {timeout:.0f} s:\n{_tail(ls.log_path)}")


def _stop(process: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)  # our own session: the process and its children only
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except OSError:
        return ""


# -- a real worker process ----------------------------------------------------------------------------
WORKER_PRESET = "test_tiny"
# `sonoseg` with one more network preset, tests.support.models.tiny_spec(classes, **WORKER_TINY), so a
# worker trains in seconds on a CPU. The spec's fields are written out (not imported from tests/),
# so the boot code runs from any working directory.
# The worker runs in a process group of its own (the tests signal it as a whole), so it would
# outlive a test run that is killed before its teardown, keep polling the broker and take the
# messages of later runs (it did, in CI, on a shared Redis). The guard thread kills the group,
# beat included, as soon as the test process that started it is gone.
ORPHAN_GUARD = textwrap.dedent("""
    import os, signal, threading, time
    def _guard(parent=os.getppid()):
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)
    threading.Thread(target=_guard, name="orphan-guard", daemon=True).start()
""")

WORKER_BOOT = ORPHAN_GUARD + textwrap.dedent(f"""
    from backend.model.spec import PRESETS, ModelSpec
    PRESETS[{WORKER_PRESET!r}] = lambda classes: ModelSpec(classes=tuple(classes), **{ {**TINY, **WORKER_TINY}!r})
    from cli.main import main
    main()
""")


def worker_environment(settings: Settings) -> dict[str, str]:
    """The environment in which ``Settings.from_env()`` in a worker equals ``settings`` (it is
    ``settings.to_env()``), so the server under test and its worker cannot disagree.

    The test's own ``SONOSEG_*`` and ``LABEL_STUDIO_*`` variables are dropped; the rest of the
    environment is kept, with ``OMP_NUM_THREADS=1``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SONOSEG_", "LABEL_STUDIO_"))}
    env.update(settings.to_env())
    env["OMP_NUM_THREADS"] = "1"  # leave the other core to the server, Label Studio and the test
    return env


@dataclass
class WorkerProcess:
    """``sonoseg worker --pool solo --beat`` in its own process group (beat runs as a child)."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def check_alive(self, what: str) -> None:
        """Fail at once, with the worker's log, if it exited while the test waits for ``what``."""
        if self.process.poll() is not None:
            raise AssertionError(
                f"the worker exited ({self.process.returncode}) while waiting for {what}:\n{self.tail()}"
            )

    def tail(self, n: int = 4000) -> str:
        return _tail(self.log_path, n)

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
        """:func:`wait_for`, failing early if the worker dies, with its log when it times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            self.check_alive(what)
            time.sleep(interval)
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {what}; the worker's log ends:\n{self.tail()}"
        )


@contextmanager
def start_worker(settings: Settings, log_path: Path) -> Iterator[WorkerProcess]:
    """A real worker with beat on ``settings`` (all queues), killed with its whole process group on exit."""
    log = open(log_path, "ab")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER_BOOT, "worker", "--pool", "solo", "--beat"],
        cwd=REPO,
        env=worker_environment(settings),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield WorkerProcess(process, log_path)
    finally:
        _stop(process, grace=10.0)
        try:  # beat's process, or anything else the worker left behind in its group
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
