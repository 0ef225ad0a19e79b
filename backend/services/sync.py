"""Mirror Label Studio into the database: projects, task images, annotations.

Webhook processing, ``/predict`` and reconciliation (:mod:`backend.services.reconciliation`,
behind :meth:`LabelStudioMirror.reconcile`) all go through :class:`LabelStudioMirror`,
so an annotation recorded from a webhook and the same annotation pulled by reconciliation
produce the same rows, and applying either twice changes nothing.

Network I/O (downloading an image, listing tasks) never happens inside a database transaction:
with SQLite every transaction holds the write lock, and webhooks must be recorded within Label
Studio's 1 s timeout while we download.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.db.models import Image, ImageSource, MaskVersion, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import InvalidInput, NotReady
from backend.labelstudio.config import ClassMap, LabelConfig, parse_label_config
from backend.labelstudio.images import TaskImageFetcher
from backend.labelstudio.results import results_to_mask
from backend.services.images import add_image, load_pixels
from backend.services.masks import add_mask_version, deactivate_annotation
from backend.services.predictions import lock_images, record_correction
from backend.services.projects import get_or_create_project
from backend.services.pseudonyms import load_or_create_key, pseudonymise
from backend.services.reconciliation import SyncReport, reconcile_project
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



def ls_project_id_of(value: object) -> int:
    """Label Studio's project reference -> its id: ``"12.1700000000"`` (/setup, /predict), 12, or ``{"id": 12}``."""
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool):
        raise InvalidInput("project must be an id, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        head = value.split(".", 1)[0].strip()
        if head.isdigit():
            return int(head)
    raise InvalidInput(f"cannot read a Label Studio project id from {str(value)[:40]!r}")


def config_digest(label_config: str) -> str:
    return hashlib.sha256(label_config.encode()).hexdigest()


def author_of(annotation: Mapping[str, Any]) -> str | None:
    """A stable, non-identifying author reference: Label Studio's user id, never the e-mail."""
    who = annotation.get("completed_by")
    if isinstance(who, Mapping):
        who = who.get("id")
    return f"ls-user:{who}" if isinstance(who, int) and not isinstance(who, bool) else None


class LabelStudioMirror:
    """Records Label Studio projects, task images and annotations; one per process."""

    def __init__(self, settings: Settings, factory: SessionFactory, store: BlobStore, fetcher: TaskImageFetcher) -> None:
        self.settings = settings
        self.factory = factory
        self.store = store
        self.fetcher = fetcher
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
                return ProjectRef(project.id, ls_project_id, config, tuple(project.class_names),
                                  config_digest(project.label_config or ""))

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
        if not config_text:
            raise NotReady(
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
    def image_url(self, config: LabelConfig, task_data: object) -> str:
        if not isinstance(task_data, Mapping):
            raise InvalidInput("the task has no 'data' object")
        url = task_data.get(config.image_value_key)
        if not isinstance(url, str) or not url:
            raise InvalidInput(f"the task's data has no image under {config.image_value_key!r}")
        return url

    def task_image(
        self,
        project_id: int,
        task_id: int | None,
        url: str,
        *,
        subject_hint: str | None = None,
        need_pixels: bool = False,
    ) -> TaskImage:
        """The stored image for a task, downloading it only if the task (at this URL) is new."""
        if task_id is not None and not need_pixels:
            known_here = self._task_images.get((project_id, task_id))
            if known_here is not None and known_here[0] == url:
                return TaskImage(known_here[1], project_id, known_here[2], known_here[3])
        if task_id is not None:
            with unit_of_work(self.factory) as session:
                known = session.execute(
                    select(Image.id, Image.width, Image.height, Image.blob_key, ImageSource.uri, ImageSource.active)
                    .join(ImageSource, ImageSource.image_id == Image.id)
                    .where(ImageSource.project_id == project_id, ImageSource.ls_task_id == task_id)
                ).first()
                if known is not None and known.uri == url and known.active:
                    image = session.get(Image, known.id)
                    pixels = load_pixels(self.store, image) if need_pixels and image is not None else None
                    self._task_images[(project_id, task_id)] = (url, known.id, known.width, known.height)
                    return TaskImage(known.id, project_id, known.width, known.height, pixels)
        fetched = self.fetcher.fetch(url, task_id=task_id)
        pixels = self._decode(fetched.data, fetched.name)
        subject = self._subject(project_id, task_id, url, subject_hint)
        image_id, width, height = retry_on_conflict(lambda: self._store_image(project_id, task_id, url, pixels, subject))
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
                session, staged, project, pixels, subject=subject, source_kind="labelstudio", uri=url, ls_task_id=task_id
            )
            return added.image.id, added.image.width, added.image.height

    def _decode(self, data: bytes, name: str) -> NDArray[Any]:
        from backend.imaging.io import read_image_bytes

        frames = read_image_bytes(
            data, name, max_side=self.settings.max_image_side, max_bytes=self.settings.max_image_bytes
        )
        if len(frames) > 1:
            log.info("%s has %d frames; Label Studio shows the first, so sonoseg uses frame 0", name, len(frames))
        return frames[0].pixels

    def _subject(self, project_id: int, task_id: int | None, url: str, hint: str | None) -> str:
        """Pseudonym of the task's subject: its ``subject`` field when given, else the task itself."""
        raw = f"subject:{hint}" if hint else f"ls-task:{project_id}:{task_id if task_id is not None else url}"
        return pseudonymise(raw, self._pseudonym_key())

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
                    key = load_or_create_key(self.settings.data_dir)
                except (FileExistsError, ValueError):  # being created: missing or partly written
                    key = b""
                if len(key) == 32:
                    self._key = key
                    return key
                time.sleep(0.02)
        raise NotReady(f"the pseudonym key in {self.settings.data_dir} is unreadable or malformed")

    # -- annotations ---------------------------------------------------------------------------
    def apply_annotation(
        self,
        session: Session,
        project: Project,
        config: LabelConfig,
        image_id: int,
        annotation: Mapping[str, Any],
        *,
        webhook_event_id: int | None = None,
    ) -> str:
        """Record one Label Studio annotation of one image; idempotent.

        Returns what happened: ``created`` (first version from this annotation), ``updated``
        (its mask changed), ``unchanged``, ``deactivated`` (it is now a skip), or ``ignored``
        (a skip we never held as a label). A skipped task (``was_cancelled``) is not a label.
        """
        ann_id = annotation_id(annotation)
        if annotation.get("was_cancelled"):
            return "deactivated" if deactivate_annotation(session, ann_id) else "ignored"
        lock_images(session, [image_id])
        image = session.get(Image, image_id)
        if image is None:
            raise NotReady(f"image {image_id} is gone")
        results = annotation.get("result") or []
        if not isinstance(results, list):
            raise InvalidInput(f"annotation {ann_id}: 'result' must be a list")
        decoded = results_to_mask(results, config, ClassMap(tuple(project.class_names)), image.height, image.width)
        mask = decoded.mask
        latest = session.scalars(
            select(MaskVersion)
            .where(MaskVersion.ls_annotation_id == ann_id, MaskVersion.image_id == image.id, MaskVersion.active)
            .order_by(MaskVersion.version.desc())
        ).first()
        if latest is not None and _mask_sha(mask) == latest.sha256:
            return "unchanged"
        with staged_writes(self.store) as staged:
            mv = add_mask_version(
                session,
                staged,
                project,
                image,
                mask,
                source="annotation",
                author=author_of(annotation),
                ls_annotation_id=ann_id,
                webhook_event_id=webhook_event_id,
            )
        record_correction(session, self.store, image, mv, mask)
        return "updated" if latest is not None else "created"

    # -- reconciliation ------------------------------------------------------------------------
    def reconcile(self, ls_project_id: int) -> SyncReport:
        """Pull every task and annotation of a project from Label Studio and record what we missed
        (see :func:`backend.services.reconciliation.reconcile_project`)."""
        return reconcile_project(self, ls_project_id)


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


def annotation_id(annotation: Mapping[str, Any]) -> int:
    ann_id = annotation.get("id")
    if not isinstance(ann_id, int) or isinstance(ann_id, bool):
        raise InvalidInput("an annotation without an integer 'id'")
    return ann_id



def _mask_sha(mask: NDArray[Any]) -> str:
    """sha256 of the PNG that add_mask_version would store (the encoder is deterministic)."""
    from backend.imaging.io import encode_png

    return hashlib.sha256(encode_png(mask.astype(np.uint8))).hexdigest()
