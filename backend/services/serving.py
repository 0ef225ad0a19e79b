"""The models this process serves: loaded once, swapped atomically when a new version is promoted.

:class:`ModelHolder` keeps one :class:`ServedModel` per project in an immutable mapping that is
replaced as a whole under a lock: a request reads the mapping once and keeps using the model it
got, so it never sees half a model, and an old model is freed when its last request finishes.

Loading (torch import, checkpoint read, network build) happens only in :meth:`ModelHolder.refresh`,
called at start-up and by the polling thread every ``model_poll_seconds``; never in a request.
A version whose checkpoint fails to load is logged and retried after ``RETRY_FAILED_SECONDS``,
while the previous model (or none) keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from numpy.typing import NDArray
from sqlalchemy import select

from backend.db.models import ModelVersion
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import NotReady, SonosegError
from backend.settings import Settings
from backend.storage.blobs import BlobStore

log = logging.getLogger(__name__)

RETRY_FAILED_SECONDS = 60.0


@dataclass(frozen=True)
class ServingRow:
    """What the database says serves a project (read without loading anything)."""

    project_id: int
    model_version_id: int
    uid: str
    checkpoint_key: str | None
    checkpoint_sha256: str | None


@dataclass(frozen=True, eq=False)
class ServedModel:
    """A loaded model version. ``predict`` is serialised: the network is not run in parallel."""

    uid: str
    model_version_id: int
    project_id: int
    classes: tuple[str, ...]  # foreground names; mask value i is classes[i - 1]
    predictor: Any  # backend.model.predict.Predictor (typed loosely: torch stays out of this module)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def predict(self, images: Sequence[NDArray[Any]]) -> Sequence[Any]:
        with self._lock:
            results: Sequence[Any] = self.predictor.predict(list(images))
            return results


Loader = Callable[[ServingRow], ServedModel]


def load_from_store(store: BlobStore, settings: Settings) -> Loader:
    """The default loader: the checkpoint from the blob store, sha256-checked, on ``settings.device``."""

    def load(row: ServingRow) -> ServedModel:
        from backend.model.predict import Predictor

        if not row.checkpoint_key:
            raise NotReady(f"model version {row.uid} has no checkpoint")
        path = store.local_path(row.checkpoint_key)
        predictor = Predictor.from_file(path, expected_sha256=row.checkpoint_sha256, device=settings.device)
        classes = tuple(predictor.spec.classes)
        return ServedModel(row.uid, row.model_version_id, row.project_id, classes, predictor)

    return load


class ModelHolder:
    """Per-project serving models for one process; thread-safe."""

    def __init__(self, factory: SessionFactory, loader: Loader, *, poll_seconds: float = 2.0) -> None:
        self._factory = factory
        self._loader = loader
        self._poll_seconds = max(0.05, float(poll_seconds))
        self._models: Mapping[int, ServedModel] = MappingProxyType({})
        self._swap_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._failed: dict[str, float] = {}  # uid -> monotonic time of the last failed load
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.loads = 0  # number of successful loads, for metrics and tests

    # -- reads (request path: no I/O) ----------------------------------------------------------
    def get(self, project_id: int) -> ServedModel | None:
        return self._models.get(project_id)

    def uid(self, project_id: int | None) -> str | None:
        model = self._models.get(project_id) if project_id is not None else None
        return model.uid if model is not None else None

    def snapshot(self) -> Mapping[int, ServedModel]:
        return self._models

    # -- refresh (background) ------------------------------------------------------------------
    def serving_rows(self) -> list[ServingRow]:
        with unit_of_work(self._factory) as session:
            rows = session.execute(
                select(
                    ModelVersion.project_id,
                    ModelVersion.id,
                    ModelVersion.uid,
                    ModelVersion.checkpoint_key,
                    ModelVersion.checkpoint_sha256,
                ).where(ModelVersion.status == "serving")
            ).all()
        return [ServingRow(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def refresh(self) -> bool:
        """Load what the database says should serve; True when anything changed.

        New models are loaded outside the swap lock, then the whole mapping is replaced at once.
        """
        with self._refresh_lock:
            rows = {row.project_id: row for row in self.serving_rows()}
            current = self._models
            loaded: dict[int, ServedModel] = {}
            for project_id, row in rows.items():
                have = current.get(project_id)
                if have is not None and have.uid == row.uid:
                    loaded[project_id] = have
                    continue
                model = self._try_load(row)
                if model is not None:
                    loaded[project_id] = model
                elif have is not None:
                    loaded[project_id] = have  # keep serving the old one rather than nothing
            changed = set(loaded) != set(current) or any(current[p] is not m for p, m in loaded.items() if p in current)
            if changed:
                with self._swap_lock:
                    self._models = MappingProxyType(loaded)
                for project_id, model in loaded.items():
                    old = current.get(project_id)
                    if old is None or old is not model:
                        log.info(
                            "project %s now serves model %s (was %s)",
                            project_id,
                            model.uid,
                            old.uid if old is not None else "none",
                        )
                for project_id in set(current) - set(loaded):
                    log.info("project %s no longer has a serving model (was %s)", project_id, current[project_id].uid)
            return changed

    def _try_load(self, row: ServingRow) -> ServedModel | None:
        failed_at = self._failed.get(row.uid)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_SECONDS:
            return None
        started = time.perf_counter()
        try:
            model = self._loader(row)
        except SonosegError as exc:
            self._failed[row.uid] = time.monotonic()
            log.error("cannot load model %s for project %s: %s", row.uid, row.project_id, exc.message)
            return None
        except Exception:  # a broken checkpoint must not take the server down
            self._failed[row.uid] = time.monotonic()
            log.exception("cannot load model %s for project %s", row.uid, row.project_id)
            return None
        self._failed.pop(row.uid, None)
        self.loads += 1
        log.info("loaded model %s for project %s in %.2f s", row.uid, row.project_id, time.perf_counter() - started)
        return model

    def start(self) -> None:
        """Poll the database for promotions in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sonoseg-model-poll", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.refresh()
            except Exception:  # the database may be briefly unavailable; try again next round
                log.exception("model refresh failed; retrying in %.1f s", self._poll_seconds)
