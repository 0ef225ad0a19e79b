"""Test helpers for the Label Studio backend: HTTP servers and a small model.

- :class:`ServedApp`: any WSGI app on a loopback port in a thread (werkzeug, threaded), so
  sonoseg is exercised through real HTTP, as Label Studio calls it.
- :class:`FakeLabelStudio`: the few Label Studio endpoints sonoseg calls (token refresh, uploads,
  presign, projects, tasks), with both token kinds, recording every request's Authorization
  header so tests can prove where credentials went. :class:`FakeCloud` is the other host a
  presigned URL points to.
- :func:`start_label_studio`: a REAL Label Studio from ``.venv-ls`` on loopback, for the
  end-to-end test.
- :func:`start_worker`: a real ``sonoseg worker --pool solo --beat`` process, configured from the
  same :class:`~backend.settings.Settings` as the server under test, training a tiny preset.
- :func:`register_model`: a checkpoint of a tiny network put in the store and made to serve.
- :func:`annotation_event` and friends: webhook bodies with brush results encoded by Label
  Studio's own SDK, as the editor saves them.
- :func:`dataset_pairs`: ultrasound frames with masks (``../shared/data/usgra-seg`` when present,
  generated otherwise).
"""

from __future__ import annotations

import base64
import io
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from flask import Flask, Response, abort, jsonify, redirect, request
from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Response as BaseResponse

from backend.errors import CheckpointError
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.services.serving import ServedModel, ServingRow
from backend.settings import Settings
from tests.synthetic_data import synthetic_frame

REPO = Path(__file__).resolve().parents[1]
LS_VENV = REPO / ".venv-ls"
SHARED_DATA = REPO.parent / "shared" / "data" / "usgra-seg"
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServedApp:
    """A WSGI app served on 127.0.0.1 (or ``host``) in a daemon thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        self.server: BaseWSGIServer = make_server(host, 0, app, threaded=True)
        self.host = host
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def png_bytes(pixels: np.ndarray) -> bytes:
    from backend.imaging.io import encode_png

    return encode_png(pixels)


def fake_jwt(payload: str = "x") -> str:
    """Something shaped like a JWT (header names an alg), as Label Studio's PATs are."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    return f"{header}.{b64(payload.encode())}.{b64(b'signature')}"


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None


@dataclass
class FakeLabelStudio:
    """Label Studio's API surface that sonoseg uses, in memory."""

    pat: str = field(default_factory=lambda: fake_jwt(secrets.token_hex(4)))
    legacy_token: str = LEGACY_TOKEN
    files: dict[str, bytes] = field(default_factory=dict)  # "/data/upload/1/a.png" -> bytes
    projects: dict[int, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> task (with "annotations")
    cloud_url: str = ""  # where presign redirects to
    seen: list[Seen] = field(default_factory=list)
    valid_access: set[str] = field(default_factory=set)
    refreshes: int = 0

    def expire_access_tokens(self) -> None:
        self.valid_access.clear()

    def app(self) -> Flask:
        app = Flask("fake-label-studio")

        @app.before_request
        def _record_and_check() -> Response | None:
            self.seen.append(Seen(request.method, request.full_path.rstrip("?"), request.headers.get("Authorization")))
            if request.path == "/api/token/refresh/":
                return None
            auth = request.headers.get("Authorization", "")
            ok = auth == f"Token {self.legacy_token}" or (
                auth.startswith("Bearer ") and auth[len("Bearer ") :] in self.valid_access
            )
            if not ok:
                return Response(
                    '{"detail": "Authentication credentials were not provided."}', 401, mimetype="application/json"
                )
            return None

        @app.post("/api/token/refresh/")
        def refresh() -> Response:
            body = request.get_json(silent=True) or {}
            if body.get("refresh") != self.pat:
                return Response('{"detail": "Token is invalid"}', 401, mimetype="application/json")
            self.refreshes += 1
            access = f"access-{self.refreshes}-{secrets.token_hex(4)}"
            self.valid_access.add(access)
            return jsonify({"access": access})

        @app.get("/data/upload/<path:rest>")
        def upload(rest: str) -> Response:
            data = self.files.get(f"/data/upload/{rest}")
            if data is None:
                abort(404)
            return Response(data, mimetype="image/png")

        @app.get("/data/local-files/")
        def local_files() -> Response:
            data = self.files.get(f"/data/local-files/?d={request.args.get('d', '')}")
            if data is None:
                abort(404)
            return Response(data, mimetype="image/png")

        @app.get("/tasks/<int:task_id>/presign/")
        def presign(task_id: int) -> BaseResponse:
            fileuri = base64.urlsafe_b64decode(request.args["fileuri"]).decode()
            name = fileuri.rsplit("/", 1)[-1]
            return redirect(f"{self.cloud_url}/bucket/{name}?X-Amz-Signature=abc", 303)

        @app.get("/api/projects/<int:project_id>/")
        def project(project_id: int) -> Response:
            if project_id not in self.projects:
                abort(404)
            return jsonify(self.projects[project_id])

        @app.get("/api/tasks/")
        def task_list() -> Response:
            project_id = int(request.args["project"])
            page, size = int(request.args.get("page", 1)), int(request.args.get("page_size", 100))
            tasks = [t for t in self.tasks.values() if t["project"] == project_id]
            chunk = tasks[(page - 1) * size : page * size]
            if page > 1 and not chunk:
                abort(404)
            return jsonify({"tasks": chunk, "total": len(tasks)})

        @app.get("/api/tasks/<int:task_id>/")
        def task(task_id: int) -> Response:
            if task_id not in self.tasks:
                abort(404)
            return jsonify(self.tasks[task_id])

        return app


@dataclass
class FakeCloud:
    """The host behind a presigned URL (or an allowed image host): serves bytes, records headers."""

    files: dict[str, bytes] = field(default_factory=dict)  # "/bucket/a.png" -> bytes
    seen: list[Seen] = field(default_factory=list)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> absolute URL

    def app(self) -> Flask:
        app = Flask("fake-cloud")

        @app.get("/<path:rest>")
        def serve(rest: str) -> BaseResponse:
            path = "/" + rest
            self.seen.append(Seen("GET", path, request.headers.get("Authorization")))
            if path in self.redirects:
                return redirect(self.redirects[path], 302)
            data = self.files.get(path)
            if data is None:
                abort(404)
            return Response(data, mimetype="image/png")

        return app


# -- a stand-in model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    probabilities: np.ndarray
    mask: np.ndarray
    score: float
    uncertainty: float


class ThresholdModel:
    """A deterministic stand-in for the network: > 170 is Nerve (1), < 15 is Vessel (2)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, images: Sequence[np.ndarray]) -> list[Frame]:
        self.calls.append(len(images))
        frames = []
        for image in images:
            mask = np.zeros(image.shape, np.uint8)
            mask[image > 170] = 1
            mask[image < 15] = 2
            probs = np.full((3, *image.shape), 0.05, np.float32)
            for c in range(3):
                probs[c][mask == c] = 0.9
            frames.append(Frame(probs, mask, 0.9, 0.1))
        return frames


def fake_loader(model: ThresholdModel, loads: list[str], fail: set[str]) -> Any:
    """A ModelHolder loader serving ``model`` for any version; uids in ``fail`` raise, as a corrupt checkpoint."""

    def load(row: ServingRow) -> ServedModel:
        if row.uid in fail:
            raise CheckpointError(f"checkpoint of {row.uid} is corrupt")
        loads.append(row.uid)
        return ServedModel(row.uid, row.model_version_id, row.project_id, ("Nerve", "Vessel"), model)

    return load


# -- a tiny model ----------------------------------------------------------------------------------
def tiny_spec(classes: tuple[str, ...] = ("Nerve", "Vessel")) -> Any:
    """A ~120k-parameter residual U-Net on frames scaled to 1/8 (512 -> 64): trains in seconds on a CPU."""
    from backend.model.spec import ModelSpec

    return ModelSpec(
        arch="resunet_2d",
        classes=classes,
        features=(8, 16, 32, 64),
        encoder_blocks=(1, 1, 1, 1),
        decoder_blocks=(1, 1, 1),
        patch_size=(64, 64),
        input_scale=0.125,
        full_resolution_skip=True,
    )


def save_tiny_checkpoint(path: Path, classes: tuple[str, ...] = ("Nerve", "Vessel"), seed: int = 0) -> str:
    """An untrained tiny network's checkpoint; returns its sha256."""
    import torch

    from backend.model.checkpoint import Checkpoint, save_checkpoint
    from backend.model.networks import build_model

    torch.manual_seed(seed)
    spec = tiny_spec(classes)
    return save_checkpoint(path, Checkpoint(spec=spec, state_dict=build_model(spec).state_dict()))


def train_tiny_model(pairs: list[tuple[np.ndarray, np.ndarray]], path: Path, *, seconds: float) -> str:
    """Fit the tiny network to ``pairs`` for a wall-clock budget (with the model engine); returns the sha256.

    No augmentation and no validation split: this is a smoke model that must overlap the labels of
    the very images it saw, not a model to judge quality by.
    """
    from backend.model.augment import AugmentConfig
    from backend.model.data import TrainData
    from backend.model.train import train
    from backend.model.train_config import TrainConfig

    init = path.with_suffix(".init.safetensors")
    save_tiny_checkpoint(init)
    config = TrainConfig(
        preset="cpu_small_unet",
        epochs=10_000,
        iterations_per_epoch=10,
        batch_size=min(6, len(pairs)),
        optimizer="adamw",
        learning_rate=1e-2,
        weight_decay=0.0,
        max_minutes=seconds / 60,
        device="cpu",
        val_fraction=0.0,
        num_threads=2,
        deep_supervision=False,
        oversample_foreground=0.0,
        augment=AugmentConfig(enabled=False),
    )
    result = train(config, TrainData(pairs=pairs, classes=("Nerve", "Vessel")), init_checkpoint=init)
    return result.save(path)


def register_model(factory: Any, store: Any, project_id: int, checkpoint: Path, uid: str, *, serve: bool = True) -> int:
    """Put ``checkpoint`` in the store and record a ModelVersion (serving, retiring the previous)."""
    from sqlalchemy import update

    from backend.db.models import ModelVersion
    from backend.db.session import unit_of_work

    blob = store.put_file("checkpoints", checkpoint, ".safetensors")
    with unit_of_work(factory) as session:
        if serve:
            session.execute(
                update(ModelVersion)
                .where(ModelVersion.project_id == project_id, ModelVersion.status == "serving")
                .values(status="retired")
            )
        mv = ModelVersion(
            project_id=project_id,
            uid=uid,
            status="serving" if serve else "candidate",
            arch="resunet_2d",
            checkpoint_key=blob.key,
            checkpoint_sha256=blob.sha256,
        )
        session.add(mv)
        session.flush()
        return int(mv.id)


# -- data ------------------------------------------------------------------------------------------
def generated_pair(seed: int, size: tuple[int, int] = (512, 512)) -> tuple[np.ndarray, np.ndarray]:
    """A speckled frame with a bright 'nerve' ellipse (1) and a dark round 'vessel' (2)."""
    return synthetic_frame(seed, size)


def dataset_pairs(n: int, *, offset: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``n`` (name, image, mask) training pairs: real usgra-seg images when present (never test/)."""
    if SHARED_DATA.is_dir():
        from backend.imaging.io import read_image, read_mask

        names = sorted(p.name for p in (SHARED_DATA / "images").glob("*.png"))[offset : offset + n]
        return [
            (name, read_image(SHARED_DATA / "images" / name)[0].pixels, read_mask(SHARED_DATA / "masks" / name))
            for name in names
        ]
    return [(f"gen{offset + i:04d}.png", *generated_pair(offset + i)) for i in range(n)]


# -- webhook bodies, as Label Studio 1.23 sends them (shapes read from its serializers) ----------
LABELS = ("Nerve", "Vessel")


def project_payload(ls_project_id: int, label_config: str = DEFAULT_LABEL_CONFIG) -> dict[str, Any]:
    return {
        "id": ls_project_id,
        "title": f"project {ls_project_id}",
        "label_config": label_config,
        "created_at": "2026-11-25T10:00:00.000000Z",
    }


def brush_results(mask: np.ndarray) -> list[dict[str, Any]]:
    """One brushlabels region per class present, RLE by label_studio_sdk (the editor's format)."""
    from label_studio_sdk.converter.brush import mask2rle

    h, w = mask.shape
    results = []
    for index, label in enumerate(LABELS, start=1):
        region = mask == index
        if region.any():
            results.append(
                {
                    "id": f"r{index}",
                    "from_name": "tag",
                    "to_name": "image",
                    "type": "brushlabels",
                    "original_width": w,
                    "original_height": h,
                    "image_rotation": 0,
                    "value": {
                        "format": "rle",
                        "rle": mask2rle((region * 255).astype(np.uint8)),
                        "brushlabels": [label],
                    },
                }
            )
    return results


def annotation(
    ann_id: int,
    task_id: int,
    mask: np.ndarray | None,
    *,
    cancelled: bool = False,
    updated_at: str = "2026-11-25T10:00:00Z",
) -> dict[str, Any]:
    return {
        "id": ann_id,
        "result": [] if mask is None else brush_results(mask),
        "was_cancelled": cancelled,
        "ground_truth": False,
        "completed_by": 1,
        "task": task_id,
        "project": None,
        "lead_time": 12.5,
        "created_at": "2026-11-25T10:00:00Z",
        "updated_at": updated_at,
    }


def annotation_event(
    action: str,
    ann_id: int,
    task_id: int,
    image_url: str,
    mask: np.ndarray | None,
    *,
    ls_project_id: int = 3,
    cancelled: bool = False,
    updated_at: str = "2026-11-25T10:00:00Z",
) -> dict[str, Any]:
    return {
        "action": action,
        "annotation": annotation(ann_id, task_id, mask, cancelled=cancelled, updated_at=updated_at),
        "task": {"id": task_id, "data": {"image": image_url}, "project": ls_project_id, "is_labeled": True},
        "project": project_payload(ls_project_id),
    }


def deleted_event(action: str, ids: list[int], ls_project_id: int = 3) -> dict[str, Any]:
    key = "annotations" if action == "ANNOTATIONS_DELETED" else "tasks"
    return {"action": action, key: [{"id": i} for i in ids], "project": project_payload(ls_project_id)}


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
    os.killpg(process.pid, signal.SIGTERM)  # our own session: the server and its children only
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
WORKER_SPEC = {
    "arch": "resunet_2d",
    "features": (4, 8, 16),
    "encoder_blocks": (1, 1, 1),
    "decoder_blocks": (1, 1),
    "patch_size": (32, 32),
    "input_scale": 0.25,
    "full_resolution_skip": True,
}
# `sonoseg` with one more network preset, so a worker trains in seconds on a CPU (as tests/test_workers_e2e.py).
WORKER_BOOT = textwrap.dedent(f"""
    from backend.model.spec import PRESETS, ModelSpec
    PRESETS[{WORKER_PRESET!r}] = lambda classes: ModelSpec(classes=tuple(classes), **{WORKER_SPEC!r})
    from cli.main import main
    main()
""")


def worker_environment(settings: Settings) -> dict[str, str]:
    """The environment that makes ``Settings.from_env()`` in a worker equal ``settings`` (the parts a
    worker reads), so the server under test and its worker cannot disagree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SONOSEG_", "LABEL_STUDIO_"))}
    env.update(
        {
            "SONOSEG_DATA_DIR": str(settings.data_dir),
            "SONOSEG_DATABASE_URL": settings.database_url,
            "SONOSEG_BROKER_URL": settings.broker_url,
            "SONOSEG_RESULT_BACKEND": settings.result_backend,
            "LABEL_STUDIO_URL": settings.label_studio_url,
            "LABEL_STUDIO_API_KEY": settings.label_studio_api_key,
            "SONOSEG_MODEL_PRESET": settings.model_preset,
            "SONOSEG_DEVICE": settings.device,
            "SONOSEG_TRAIN_MAX_MINUTES": repr(settings.train_max_minutes),
            "SONOSEG_RETRAIN_AFTER": str(settings.retrain_after),
            "SONOSEG_RETRAIN_DEBOUNCE_SECONDS": repr(settings.retrain_debounce_seconds),
            "SONOSEG_DISPATCH_INTERVAL_SECONDS": repr(settings.dispatch_interval_seconds),
            "SONOSEG_TRAIN_HEARTBEAT_SECONDS": repr(settings.train_heartbeat_seconds),
            "SONOSEG_TRAIN_STALE_AFTER_SECONDS": repr(settings.train_stale_after_seconds),
            "SONOSEG_TRAIN_MAX_ATTEMPTS": str(settings.train_max_attempts),
            "SONOSEG_GATE_METRIC": settings.gate_metric,
            "SONOSEG_GATE_MARGIN": repr(settings.gate_margin),
            "SONOSEG_REPREDICT_AFTER_PROMOTION": "true" if settings.repredict_after_promotion else "false",
            "SONOSEG_RETRAIN_CRON": settings.retrain_cron or "off",
            "SONOSEG_MODEL_POLL_SECONDS": repr(settings.model_poll_seconds),
            "SONOSEG_LOG_LEVEL": "INFO",
            "OMP_NUM_THREADS": "1",  # leave the other core to the server, Label Studio and the test
        }
    )
    if settings.local_files_root is not None:
        env["SONOSEG_LOCAL_FILES_ROOT"] = str(settings.local_files_root)
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


def copy_png(src: np.ndarray) -> io.BytesIO:
    return io.BytesIO(png_bytes(src))


__all__ = [
    "LABELS",
    "WORKER_PRESET",
    "FakeCloud",
    "FakeLabelStudio",
    "Frame",
    "LabelStudio",
    "ServedApp",
    "ThresholdModel",
    "WorkerProcess",
    "annotation",
    "annotation_event",
    "brush_results",
    "copy_png",
    "dataset_pairs",
    "deleted_event",
    "fake_jwt",
    "fake_loader",
    "free_port",
    "generated_pair",
    "label_studio_available",
    "png_bytes",
    "project_payload",
    "register_model",
    "save_tiny_checkpoint",
    "start_label_studio",
    "start_worker",
    "tiny_spec",
    "train_tiny_model",
    "wait_for",
    "worker_environment",
]
