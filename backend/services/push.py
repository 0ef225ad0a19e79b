"""Curated frames into Label Studio: link a project, push its frames as tasks (with their masks).

``sonoseg import`` stores de-identified grey frames (a cine DICOM becomes one PNG per frame);
Label Studio's image tag cannot show DICOM, so this is where such a file becomes something to
label. :func:`push_project` uploads each stored frame's PNG and creates one task per frame whose
data carries ``sonoseg_image_id`` and ``sonoseg_subject`` (the subject pseudonym), with the
frame's current mask as an annotation (sonographers review it) or as a prediction.

Every created task is recorded as an ``image_source`` of its image (kind ``labelstudio``, with the
task id), so webhooks and reconciliation map the task back to the same image without downloading
or hashing anything (:class:`backend.services.sync.LabelStudioMirror`). Idempotent: a frame that
already has a Label Studio task is not pushed again, and a push interrupted after Label Studio
created tasks but before they were recorded finds them again by ``sonoseg_image_id`` first.

A workflow (see :mod:`backend.services`): it uploads between short units of work of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import Image, ImageSource, MaskVersion, Project
from backend.db.session import unit_of_work
from backend.errors import Conflict, InvalidInput, NotReady
from backend.imaging.io import decode_png_bytes
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.config import ClassMap, LabelConfig, label_config_for, parse_label_config
from backend.labelstudio.results import mask_to_results
from backend.services.images import SourceInfo, record_source
from backend.services.sync import LabelStudioMirror

log = logging.getLogger(__name__)

MasksAs = Literal["annotations", "predictions", "none"]
PUSH_MODEL_VERSION = "sonoseg-import"
"""``model_version`` of masks pushed as predictions (what Label Studio shows as their source)."""
UPLOAD_PREFIX = "/data/"
"""Label Studio serves uploaded files under its MEDIA_URL, ``/data/`` (``/data/upload/<project>/...``)."""
IMAGE_ID_KEY = "sonoseg_image_id"
SUBJECT_KEY = "sonoseg_subject"


@dataclass(frozen=True)
class LinkedProject:
    project_id: int
    ls_project_id: int
    label_config: str


@dataclass
class PushReport:
    """What one push did: counts, and per-frame failures with their reasons."""

    ls_project_id: int
    candidates: int = 0
    pushed: int = 0
    already_pushed: int = 0
    recovered: int = 0  # tasks Label Studio had for frames whose task was never recorded here
    annotations: int = 0
    predictions: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


# -- linking -------------------------------------------------------------------------------------
def check_same_classes(project: Project, config: LabelConfig, ls_project_id: int) -> None:
    """A Label Studio project may serve a sonoseg project only with the same labels, in order."""
    if tuple(config.labels) != tuple(project.class_names):
        raise InvalidInput(
            f"Label Studio project {ls_project_id} labels {list(config.labels)} but project {project.name!r} "
            f"has classes {list(project.class_names)}: the same names in the same order are needed "
            "(class indices are stored in the masks)"
        )


def link_project(session: Session, project: Project, ls_project_id: int, label_config: str) -> LinkedProject:
    """Link ``project`` to an existing Label Studio project whose label config matches its classes."""
    if ls_project_id < 1:
        raise InvalidInput("a Label Studio project id is a positive integer")
    other = session.scalars(
        select(Project).where(Project.ls_project_id == ls_project_id, Project.id != project.id)
    ).one_or_none()
    if other is not None:
        raise Conflict(f"Label Studio project {ls_project_id} is already linked to sonoseg project {other.name!r}")
    if project.ls_project_id is not None and project.ls_project_id != ls_project_id:
        raise Conflict(
            f"project {project.name!r} is already linked to Label Studio project {project.ls_project_id}; "
            "a project has one Label Studio project (its task ids are recorded per image)"
        )
    config = parse_label_config(label_config)
    check_same_classes(project, config, ls_project_id)
    project.ls_project_id = ls_project_id
    project.label_config = label_config
    session.flush()
    log.info("project %s linked to Label Studio project %s", project.id, ls_project_id)
    return LinkedProject(project.id, ls_project_id, label_config)


def new_label_config(project: Project) -> str:
    """The label config a Label Studio project created for ``project`` gets (its class map)."""
    return label_config_for(tuple(project.class_names))


# -- pushing -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Frame:
    image_id: int
    blob_key: str
    subject: str
    mask_key: str | None


def push_project(
    mirror: LabelStudioMirror,
    project_id: int,
    *,
    splits: Sequence[str] = (),
    only_unlabelled: bool = False,
    masks_as: MasksAs = "annotations",
    batch_size: int = 20,
    on_item: Callable[[], None] | None = None,
) -> PushReport:
    """Create one Label Studio task per stored frame of ``project`` not pushed yet.

    ``splits``: only these splits (default all); ``only_unlabelled``: only frames without a
    current label; ``masks_as``: how a frame's current mask travels (``none``: not at all). A
    failing batch is reported with its reason and the next one still goes (nothing is recorded
    for a batch Label Studio did not take).
    """
    client = mirror.fetcher.client
    if client is None:
        raise NotReady("pushing needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
    if masks_as not in ("annotations", "predictions", "none"):
        raise InvalidInput(f"masks_as must be annotations, predictions or none, not {masks_as!r}")
    if not 1 <= batch_size <= 500:
        raise InvalidInput("batch_size must be between 1 and 500")
    with unit_of_work(mirror.factory) as session:
        project = session.get(Project, project_id)
        if project is None:
            raise InvalidInput(f"no project {project_id}")
        if project.ls_project_id is None or not project.label_config:
            raise NotReady(
                f"project {project.name!r} is not linked to a Label Studio project: run "
                "`sonoseg project link --project P --ls-project N` (or `sonoseg project create-ls`)"
            )
        ls_project_id, config = project.ls_project_id, parse_label_config(project.label_config)
        class_map = ClassMap(tuple(project.class_names))
        frames, already = _frames_to_push(session, project, splits, only_unlabelled)
    report = PushReport(ls_project_id, candidates=len(frames) + already, already_pushed=already)
    if frames:
        frames = _recover_recorded_tasks(mirror, client, project_id, ls_project_id, config, frames, report)
    for chunk in _chunks(frames, batch_size):
        try:
            _push_batch(mirror, client, project_id, ls_project_id, config, class_map, chunk, masks_as, report)
        except Exception as exc:  # one batch: Label Studio refused or went away; the next may still go
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            first, last = chunk[0].image_id, chunk[-1].image_id
            report.errors.append(f"images {first}..{last}: {message}")
            log.warning("push of images %s..%s failed: %s", first, last, message)
        if on_item is not None:
            for _ in chunk:
                on_item()
    log.info(
        "push of project %s to Label Studio project %s: %d pushed, %d already there, %d recovered, %d errors",
        project_id,
        ls_project_id,
        report.pushed,
        report.already_pushed,
        report.recovered,
        len(report.errors),
    )
    return report


def _frames_to_push(
    session: Session, project: Project, splits: Sequence[str], only_unlabelled: bool
) -> tuple[list[_Frame], int]:
    pushed = select(ImageSource.image_id).where(
        ImageSource.project_id == project.id,
        ImageSource.kind == "labelstudio",
        ImageSource.ls_task_id.is_not(None),
        ImageSource.active,
    )
    stmt = (
        select(Image.id, Image.blob_key, Image.subject, MaskVersion.blob_key, Image.id.in_(pushed))
        .outerjoin(MaskVersion, (MaskVersion.image_id == Image.id) & MaskVersion.is_current)
        .where(Image.project_id == project.id)
        .order_by(Image.id)
    )
    if splits:
        stmt = stmt.where(Image.split.in_(list(splits)))
    frames: list[_Frame] = []
    already = 0
    for image_id, blob_key, subject, mask_key, is_pushed in session.execute(stmt):
        if only_unlabelled and mask_key is not None:
            continue
        if is_pushed:
            already += 1
            continue
        frames.append(_Frame(image_id, blob_key, subject, mask_key))
    return frames, already


def _recover_recorded_tasks(
    mirror: LabelStudioMirror,
    client: LabelStudioClient,
    project_id: int,
    ls_project_id: int,
    config: LabelConfig,
    frames: list[_Frame],
    report: PushReport,
) -> list[_Frame]:
    """Tasks Label Studio already has for these frames (an earlier push that died before it
    recorded them): record them now instead of creating duplicates."""
    wanted = {f.image_id: f for f in frames}
    found: dict[int, tuple[int, str]] = {}
    for task in client.iter_tasks(ls_project_id):
        data = task.get("data")
        if not isinstance(data, dict):
            continue
        image_id, task_id, url = data.get(IMAGE_ID_KEY), task.get("id"), data.get(config.image_value_key)
        if isinstance(image_id, int) and image_id in wanted and isinstance(task_id, int) and isinstance(url, str):
            found.setdefault(image_id, (task_id, url))
    if found:
        _record_tasks(mirror, project_id, [(image_id, task_id, url) for image_id, (task_id, url) in found.items()])
        report.recovered += len(found)
    return [f for f in frames if f.image_id not in found]


def _push_batch(
    mirror: LabelStudioMirror,
    client: LabelStudioClient,
    project_id: int,
    ls_project_id: int,
    config: LabelConfig,
    class_map: ClassMap,
    chunk: list[_Frame],
    masks_as: MasksAs,
    report: PushReport,
) -> None:
    store = mirror.store
    upload_ids = client.upload_files(
        ls_project_id, [(f"sonoseg-{f.image_id}.png", store.get_bytes(f.blob_key)) for f in chunk]
    )
    stored = client.uploaded_paths(ls_project_id, upload_ids)
    missing = [i for i in upload_ids if i not in stored]
    if missing:
        raise NotReady(f"Label Studio does not list uploads {missing} it just acknowledged")
    tasks: list[dict[str, Any]] = []
    urls: list[str] = []
    n_annotations = n_predictions = 0
    for frame, upload_id in zip(chunk, upload_ids, strict=True):
        url = UPLOAD_PREFIX + stored[upload_id].lstrip("/")
        task: dict[str, Any] = {
            "data": {config.image_value_key: url, IMAGE_ID_KEY: frame.image_id, SUBJECT_KEY: frame.subject}
        }
        if frame.mask_key is not None and masks_as != "none":
            mask = decode_png_bytes(store.get_bytes(frame.mask_key))
            result = mask_to_results(mask, config, class_map)
            if masks_as == "annotations":
                task["annotations"] = [{"result": result}]
                n_annotations += 1
            else:
                task["predictions"] = [{"result": result, "model_version": PUSH_MODEL_VERSION}]
                n_predictions += 1
        tasks.append(task)
        urls.append(url)
    task_ids = client.import_tasks(ls_project_id, tasks)
    _record_tasks(mirror, project_id, [(f.image_id, t, u) for f, t, u in zip(chunk, task_ids, urls, strict=True)])
    report.pushed += len(chunk)
    report.annotations += n_annotations
    report.predictions += n_predictions


def _record_tasks(mirror: LabelStudioMirror, project_id: int, created: list[tuple[int, int, str]]) -> None:
    """Each (image id, task id, image URL) as a Label Studio source of its image."""
    with unit_of_work(mirror.factory) as session:
        project = session.get_one(Project, project_id)
        for image_id, task_id, url in created:
            image = session.get(Image, image_id)
            if image is None:
                continue
            record_source(
                session, project, image, SourceInfo("labelstudio", ref=mirror.source_ref(url), ls_task_id=task_id)
            )


def _chunks(items: list[_Frame], size: int) -> Iterator[list[_Frame]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
