"""Mirror Label Studio into the database: projects, task images, annotations.

Webhook processing, ``/predict`` and reconciliation (:mod:`backend.services.reconciliation`)
find a task's stored image and its project through :class:`LabelStudioMirror`, and record
annotations through :mod:`backend.services.annotations`, so an annotation recorded from a
webhook and the same annotation pulled by reconciliation produce the same rows, and applying
either twice changes nothing.

Network I/O (downloading an image, listing tasks) never happens inside a database transaction:
with SQLite every transaction holds the write lock, and webhooks must be recorded within Label
Studio's 1 s timeout while we download.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.db.models import Image, ImageSource, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import NotFound, NotReady
from backend.labelstudio.config import LabelConfig, parse_label_config
from backend.labelstudio.images import TaskImageFetcher
from backend.labelstudio.payloads import LsTask
from backend.services.images import SourceInfo, add_image, load_pixels, record_source
from backend.services.projects import get_or_create_project
from backend.services.pseudonyms import load_or_create_key, pseudonymise, source_ref
from backend.settings import Settings
from backend.storage.blobs import BlobStore, staged_writes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskImage:
    """A task's image as stored: ids and size; ``pixels`` only when they were needed."""

    image_id: int
    project_id: int
    width: int
    height: int
    pixels: NDArray[Any] | None = None


@dataclass(frozen=True)
class ProjectRef:
    """A Label Studio project as the request path needs it, cached in memory per label config."""

    project_id: int
    ls_project_id: int
    config: LabelConfig
    class_names: tuple[str, ...]
    config_digest: str


def config_digest(label_config: str) -> str:
    return hashlib.sha256(label_config.encode()).hexdigest()


@dataclass(frozen=True)
class ImageLimits:
    """How large a task image may be, and the process-wide decode memory budget."""

    max_side: int
    max_bytes: int
    decode_memory_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageLimits:
        return cls(settings.max_image_side, settings.max_image_bytes, settings.decode_memory_bytes)


class LabelStudioMirror:
    """Label Studio projects and task images as stored here, with their in-memory caches.

    One per process (built by :class:`backend.runtime.Runtime`). It opens its own short units of
    work on purpose: a task image is downloaded between two of them, never inside one (see the
    module docstring). Annotations are applied by :mod:`backend.services.annotations` in the
    caller's session.
    """

    def __init__(
        self,
        factory: SessionFactory,
        store: BlobStore,
        fetcher: TaskImageFetcher,
        *,
        limits: ImageLimits,
        key_dir: Path,
    ) -> None:
        self.factory = factory
        self.store = store
        self.fetcher = fetcher
        self.limits = limits
        self.key_dir = key_dir
        self._key: bytes | None = None
        self._key_lock = threading.Lock()
        self._projects: dict[int, ProjectRef] = {}
        self._projects_lock = threading.Lock()
        # (project id, task id) -> (url, image id, width, height): tasks whose image is stored.
        self._task_images: dict[tuple[int, int], tuple[str, int, int, int]] = {}

    def project_ref(self, ls_project_id: int, label_config: str | None, title: str | None = None) -> ProjectRef:
        """The project for a /setup or /predict call: from memory when this config was seen before.

        ``label_config`` None uses the last config seen for the project (memory, then database).
        Only a new project or a changed config touches the database.
        """
        cached = self._projects.get(ls_project_id)
        if cached is not None and (label_config is None or cached.config_digest == config_digest(label_config)):
            return cached

        def load() -> ProjectRef:
            with unit_of_work(self.factory) as session:
                project, config = self.ensure_project(session, ls_project_id, label_config, title)
                return ProjectRef(
                    project.id,
                    ls_project_id,
                    config,
                    tuple(project.class_names),
                    config_digest(project.label_config or ""),
                )

        ref = retry_on_conflict(load)
        with self._projects_lock:
            self._projects[ls_project_id] = ref
        return ref

    def cached_projects(self) -> list[ProjectRef]:
        return list(self._projects.values())

    def forget_tasks(self, project_id: int, task_ids: list[int]) -> None:
        """Drop deleted tasks from the in-memory image cache."""
        for task_id in task_ids:
            self._task_images.pop((project_id, task_id), None)

    # -- projects ----------------------------------------------------------------------------
    def ensure_project(
        self, session: Session, ls_project_id: int, label_config: str | None, title: str | None = None
    ) -> tuple[Project, LabelConfig]:
        """The Project for a Label Studio project, created on first sight (classes from its config).

        ``label_config`` None means "use the one recorded before"; a project never seen with a
        config cannot be used yet.
        """
        project = session.scalars(select(Project).where(Project.ls_project_id == ls_project_id)).one_or_none()
        config_text = label_config if label_config else (project.label_config if project is not None else None)
        if not config_text:  # the caller's request names a project we cannot serve: a 404, not a 503
            raise NotFound(
                f"Label Studio project {ls_project_id} has not been set up yet (no label config known): "
                "connect the model in Label Studio, or run `sonoseg sync`"
            )
        config = parse_label_config(config_text)
        if project is None or project.label_config != config_text or list(config.labels) != project.class_names:
            project = get_or_create_project(
                session,
                title or f"label-studio-{ls_project_id}",
                class_names=tuple(config.labels),
                ls_project_id=ls_project_id,
                label_config=config_text,
            )
        return project, config

    # -- task images ---------------------------------------------------------------------------
    def task_image_of(
        self, project_id: int, config: LabelConfig, task: LsTask, *, need_pixels: bool = False
    ) -> TaskImage:
        """The stored image of a parsed task (its URL under the config's image key, its subject)."""
        return self.task_image(
            project_id,
            task.id,
            task.image_url(config.image_value_key),
            subject_hint=task.subject,
            need_pixels=need_pixels,
            pushed_image_id=task.sonoseg_image_id,
        )

    def task_image(
        self,
        project_id: int,
        task_id: int | None,
        url: str,
        *,
        subject_hint: str | None = None,
        need_pixels: bool = False,
        pushed_image_id: int | None = None,
    ) -> TaskImage:
        """The stored image for a task, downloading it only if the task (at this URL) is new.

        ``pushed_image_id``: the ``sonoseg_image_id`` a task made by ``sonoseg push`` carries. It
        is trusted only for a task never seen here (no source recorded for its id) and only for an
        image of this project; a task whose URL changed since is downloaded as any other.
        """
        if task_id is not None and not need_pixels:
            known_here = self._task_images.get((project_id, task_id))
            if known_here is not None and known_here[0] == url:
                return TaskImage(known_here[1], project_id, known_here[2], known_here[3])
        if task_id is not None:
            with unit_of_work(self.factory) as session:
                known = session.execute(
                    select(
                        Image.id, Image.width, Image.height, Image.blob_key, ImageSource.source_ref, ImageSource.active
                    )
                    .join(ImageSource, ImageSource.image_id == Image.id)
                    .where(ImageSource.project_id == project_id, ImageSource.ls_task_id == task_id)
                ).first()
                if known is not None and known.source_ref == self.source_ref(url) and known.active:
                    image = session.get(Image, known.id)
                    pixels = load_pixels(self.store, image) if need_pixels and image is not None else None
                    self._task_images[(project_id, task_id)] = (url, known.id, known.width, known.height)
                    return TaskImage(known.id, project_id, known.width, known.height, pixels)
                pushed = session.get(Image, pushed_image_id) if known is None and pushed_image_id else None
                if pushed is not None and pushed.project_id == project_id:
                    project = session.get_one(Project, project_id)
                    info = SourceInfo("labelstudio", ref=self.source_ref(url), ls_task_id=task_id)
                    record_source(session, project, pushed, info)
                    pixels = load_pixels(self.store, pushed) if need_pixels else None
                    self._task_images[(project_id, task_id)] = (url, pushed.id, pushed.width, pushed.height)
                    return TaskImage(pushed.id, project_id, pushed.width, pushed.height, pixels)
        fetched = self.fetcher.fetch(url, task_id=task_id)
        pixels = self._decode(fetched.data, fetched.name)
        subject = self._subject(project_id, task_id, url, subject_hint)
        image_id, width, height = retry_on_conflict(
            lambda: self._store_image(project_id, task_id, url, pixels, subject)
        )
        if task_id is not None:
            self._task_images[(project_id, task_id)] = (url, image_id, width, height)
        return TaskImage(image_id, project_id, width, height, pixels if need_pixels else None)

    def _store_image(
        self, project_id: int, task_id: int | None, url: str, pixels: NDArray[Any], subject: str
    ) -> tuple[int, int, int]:
        with staged_writes(self.store) as staged, unit_of_work(self.factory) as session:
            project = session.get(Project, project_id)
            if project is None:
                raise NotReady(f"project {project_id} disappeared while its image was downloaded")
            added = add_image(
                session,
                staged,
                project,
                pixels,
                subject=subject,
                source=SourceInfo("labelstudio", ref=self.source_ref(url), ls_task_id=task_id),
            )
            return added.image.id, added.image.width, added.image.height

    def _decode(self, data: bytes, name: str) -> NDArray[Any]:
        from backend.imaging.budget import shared_budget
        from backend.imaging.io import read_image_bytes

        # One budget per process, shared by /predict's fetch threads and webhook decodes.
        frames = read_image_bytes(
            data,
            name,
            max_side=self.limits.max_side,
            max_bytes=self.limits.max_bytes,
            budget=shared_budget(self.limits.decode_memory_bytes),
        )
        if len(frames) > 1:
            log.info("%s has %d frames; Label Studio shows the first, so sonoseg uses frame 0", name, len(frames))
        return frames[0].pixels

    def _subject(self, project_id: int, task_id: int | None, url: str, hint: str | None) -> str:
        """Pseudonym of the task's subject: its ``subject`` field when given, else the task itself."""
        raw = f"subject:{hint}" if hint else f"ls-task:{project_id}:{task_id if task_id is not None else url}"
        return pseudonymise(raw, self._pseudonym_key())

    def source_ref(self, url: str) -> str:
        """The stored reference of a task's image URL (upload URLs carry the original file name)."""
        return source_ref(url, self._pseudonym_key())

    def _pseudonym_key(self) -> bytes:
        """The installation's pseudonym key, created once even when requests race for it.

        Another thread or process may be creating the key file at this very moment (it exists
        but is still empty): wait for it rather than fail or read a short key.
        """
        with self._key_lock:
            for _ in range(100):
                if self._key is not None:
                    return self._key
                try:
                    key = load_or_create_key(self.key_dir)
                except (FileExistsError, ValueError):  # being created: missing or partly written
                    key = b""
                if len(key) == 32:
                    self._key = key
                    return key
                time.sleep(0.02)
        raise NotReady(f"the pseudonym key in {self.key_dir} is unreadable or malformed")


T = TypeVar("T")


def retry_on_conflict(work: Callable[[], T], attempts: int = 3) -> T:
    """Run a unit of work again when a concurrent one inserted the same row first.

    Image and project rows are unique by content hash / Label Studio id: two requests seeing the
    same new image at once both try to insert it on PostgreSQL; the loser retries and finds it.
    """
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except IntegrityError:
            if attempt == attempts:
                raise
            log.info("concurrent insert of the same row; retrying (%d/%d)", attempt, attempts - 1)
    raise NotReady("unreachable")  # pragma: no cover
