"""The curators' review queue (``sonoseg review``): labels worth a second look, worst first.

Four kinds of item, each with a score and a reason; agreement (Dice 1.0) is never queued:

- ``model_disagreement``: Dice between the current label and the serving model's prediction,
  lowest first. The prediction is the serving model's latest stored one for the image (a
  ``prediction`` row and its ``prediction`` mask version); images without one are run through
  the serving model (loaded only if needed). When no model serves, or it cannot be loaded, the
  kind is skipped (wholly or for the images without a stored prediction) and the report says so.
- ``inter_rater``: images with active annotation versions by two or more authors: the lowest Dice
  between the newest version of each author, lowest first.
- ``conflicting_duplicate``: open ``conflicting_duplicate`` label issues (identical pixels,
  different imported masks); score: the lowest Dice between the conflicting versions.
- ``size_outlier``: an object (8-connected component, as in :mod:`.stats`) of a class whose area
  is outside ``median +- k * 1.4826 * MAD`` of that class's object areas over the project's
  current labels (``k`` = :data:`SIZE_OUTLIER_K` = 3.5: the modified z-score rule of Iglewicz and
  Hoaglin; the scale is floored at 5 % of the median and at 1 px, so a class of equal-sized
  objects does not make every small deviation an outlier; applied when the class has at least
  :data:`MIN_OBJECTS_FOR_SPREAD` objects), or smaller than :data:`MIN_OBJECT_PIXELS` (16 px: a
  stray brush dab), whatever the class. Score: the robust z of the most extreme flagged object of
  that class in the image, highest first (0.0 where the class has too few objects for a spread).
  One item per image and class.

Dice is :func:`backend.services.annotations.correction_dice` (mean over the foreground classes
present in either mask). The queue lists the kinds in that order, each sorted, at most ``limit``
items per kind, ranked 1.. over the whole queue.

Three phases, so that no transaction is held across a mask read or an inference (with SQLite
every transaction holds the write lock, see backend/db/session.py); nothing is written to the
database:

1. :func:`plan_review` (the caller's unit of work): a fixed number of queries, whatever the
   project's size: the current labels, the serving model, its stored predictions, the images
   with several annotators, the open conflicts; store keys only, no ORM objects;
2. :func:`build_review` (no session): one linear pass reading each current label once (and its
   stored prediction), inference in chunks for the images without one, then the rater groups and
   the conflicts; keeps only the ``limit`` worst of each kind;
3. :func:`write_overlays` (no session): one PNG per item (:func:`backend.model.overlay.review_panel`).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.db.models import Image, LabelIssue, MaskVersion, ModelVersion, Prediction, Project
from backend.errors import InvalidInput, SonosegError
from backend.services.annotations import correction_dice
from backend.services.masks import label_order_key
from backend.services.predictions import ServingModel
from backend.services.serving import ServingRow
from backend.services.stats import Progress, object_sizes, read_mask_key
from backend.storage.blobs import BlobStore

log = logging.getLogger(__name__)

KINDS = ("model_disagreement", "inter_rater", "conflicting_duplicate", "size_outlier")
SIZE_OUTLIER_K = 3.5
MIN_OBJECT_PIXELS = 16
MIN_OBJECTS_FOR_SPREAD = 5
MAD_TO_SD = 1.4826  # MAD x this estimates the standard deviation of a normal distribution
SCALE_FLOOR_OF_MEDIAN = 0.05
DEFAULT_LIMIT = 20
INFERENCE_CHUNK = 16
_OVERLAY_NAME = re.compile(r"^\d{3,}_(" + "|".join(KINDS) + r")_image\d+\.png$")

Loader = Callable[[ServingRow], ServingModel]


@dataclass(frozen=True)
class MaskRef:
    """A stored mask version, as the review needs it."""

    mask_version_id: int
    version: int
    source: str
    author: str | None
    blob_key: str

    def describe(self) -> str:
        return f"v{self.version} ({self.source}{f' by {self.author}' if self.author else ''})"


@dataclass(frozen=True)
class LabelledImage:
    image_id: int
    image_key: str
    label: MaskRef  # the current label
    prediction: MaskRef | None  # the serving model's latest stored prediction, if any


@dataclass(frozen=True)
class MaskGroup:
    """Versions of one image to compare with each other (annotators' newest, or a conflict's)."""

    image_id: int
    image_key: str
    versions: tuple[MaskRef, ...]
    issue_id: int | None = None


@dataclass(frozen=True)
class ReviewPlan:
    """What :func:`plan_review` read from the database."""

    project_id: int
    project: str
    class_names: tuple[str, ...]
    serving: ServingRow | None
    labelled: tuple[LabelledImage, ...]
    raters: tuple[MaskGroup, ...]  # the newest active annotation version of each author (>= 2)
    conflicts: tuple[MaskGroup, ...]  # open conflicting_duplicate issues


@dataclass(frozen=True)
class ReviewItem:
    """One entry of the queue. ``other`` is the third panel's stored mask (a prediction, a second
    rater's or conflicting version); ``other_mask`` holds a prediction made now (not stored)."""

    rank: int
    kind: str
    image_id: int
    score: float
    reason: str
    image_key: str
    label: MaskRef
    other: MaskRef | None
    captions: tuple[str, str, str]
    overlay: str | None = None
    other_mask: NDArray[Any] | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "kind": self.kind,
            "image_id": self.image_id,
            "score": round(self.score, 6),
            "reason": self.reason,
            "label_mask_version_id": self.label.mask_version_id,
            "label_version": self.label.version,
            "other_mask_version_id": self.other.mask_version_id if self.other else None,
            "other_version": self.other.version if self.other else None,
            "fresh_prediction": self.other_mask is not None,
            "overlay": self.overlay,
        }


@dataclass(frozen=True)
class KindCount:
    kind: str
    candidates: int  # items of this kind found, before ``limit``
    listed: int


@dataclass(frozen=True)
class ReviewReport:
    project_id: int
    project: str
    class_names: tuple[str, ...]
    model_uid: str | None
    items: tuple[ReviewItem, ...]
    counts: tuple[KindCount, ...]  # one per kind, in KINDS order
    notes: tuple[str, ...]  # kinds skipped and why, how predictions were obtained
    size_rule: str

    def to_json(self) -> dict[str, Any]:
        return {
            "project_id": self.project_id,
            "project": self.project,
            "class_names": list(self.class_names),
            "model_uid": self.model_uid,
            "items": [item.to_json() for item in self.items],
            "counts": [dataclasses.asdict(c) for c in self.counts],
            "notes": list(self.notes),
            "size_rule": self.size_rule,
        }


# -- phase 1: the database ---------------------------------------------------------------------------
def _ref(mv: MaskVersion) -> MaskRef:
    return MaskRef(mv.id, mv.version, mv.source, mv.author, mv.blob_key)


def plan_review(session: Session, project: Project) -> ReviewPlan:
    """Read what the review needs, in a fixed number of queries; no mask is read here."""
    pid = project.id
    serving_row = session.execute(
        select(
            ModelVersion.project_id,
            ModelVersion.id,
            ModelVersion.uid,
            ModelVersion.checkpoint_key,
            ModelVersion.checkpoint_sha256,
        ).where(ModelVersion.project_id == pid, ModelVersion.status == "serving")
    ).one_or_none()
    serving = ServingRow(*serving_row) if serving_row is not None else None

    predictions: dict[int, MaskRef] = {}
    if serving is not None:
        latest = (
            select(func.max(Prediction.id).label("id"))
            .join(Image, Prediction.image_id == Image.id)
            .where(
                Image.project_id == pid,
                Prediction.model_version_id == serving.model_version_id,
                Prediction.mask_version_id.is_not(None),
            )
            .group_by(Prediction.image_id)
            .subquery()
        )
        for image_id, mv in session.execute(
            select(Prediction.image_id, MaskVersion)
            .join(latest, Prediction.id == latest.c.id)
            .join(MaskVersion, MaskVersion.id == Prediction.mask_version_id)
        ):
            predictions[int(image_id)] = _ref(mv)

    labelled = tuple(
        LabelledImage(mv.image_id, image_key, _ref(mv), predictions.get(mv.image_id))
        for mv, image_key in session.execute(
            select(MaskVersion, Image.blob_key)
            .join(Image, MaskVersion.image_id == Image.id)
            .where(Image.project_id == pid, MaskVersion.is_current)
            .order_by(MaskVersion.image_id)
        )
    )

    annotated = (
        MaskVersion.source == "annotation",
        MaskVersion.active,
        MaskVersion.author.is_not(None),
    )
    several = (
        select(MaskVersion.image_id)
        .join(Image, MaskVersion.image_id == Image.id)
        .where(Image.project_id == pid, *annotated)
        .group_by(MaskVersion.image_id)
        .having(func.count(func.distinct(MaskVersion.author)) >= 2)
    )
    newest: dict[tuple[int, str], MaskVersion] = {}
    image_keys: dict[int, str] = {}
    current: set[int] = set()
    for mv, image_key in session.execute(
        select(MaskVersion, Image.blob_key)
        .join(Image, MaskVersion.image_id == Image.id)
        .where(MaskVersion.image_id.in_(several), *annotated)
    ):
        key = (mv.image_id, mv.author or "")
        if key not in newest or label_order_key(mv) > label_order_key(newest[key]):
            newest[key] = mv
        image_keys[mv.image_id] = image_key
        if mv.is_current:
            current.add(mv.id)
    by_image: dict[int, list[MaskVersion]] = {}
    for (image_id, _author), mv in sorted(newest.items()):
        by_image.setdefault(image_id, []).append(mv)
    raters = tuple(
        MaskGroup(
            image_id, image_keys[image_id], tuple(_ref(mv) for mv in sorted(mvs, key=lambda m: m.id not in current))
        )
        for image_id, mvs in sorted(by_image.items())
    )

    issues = session.execute(
        select(LabelIssue.id, LabelIssue.image_id, LabelIssue.mask_version_ids, Image.blob_key)
        .join(Image, LabelIssue.image_id == Image.id)
        .where(
            LabelIssue.project_id == pid,
            LabelIssue.kind == "conflicting_duplicate",
            LabelIssue.status == "open",
        )
        .order_by(LabelIssue.id)
    ).all()
    ids = sorted({int(i) for row in issues for i in (row[2] or ())})
    versions = {mv.id: mv for mv in session.scalars(select(MaskVersion).where(MaskVersion.id.in_(ids)))} if ids else {}
    conflicts = tuple(
        MaskGroup(
            image_id,
            image_key,
            tuple(_ref(versions[int(i)]) for i in (mv_ids or ()) if int(i) in versions),
            issue_id=int(issue_id),
        )
        for issue_id, image_id, mv_ids, image_key in issues
        if image_id is not None
    )
    return ReviewPlan(pid, project.name, tuple(project.class_names), serving, labelled, raters, conflicts)


# -- phase 2: masks and the model ---------------------------------------------------------------------
class _Worst:
    """The ``limit`` items with the smallest keys pushed so far, and how many were pushed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0
        self._heap: list[tuple[tuple[float, ...], int, ReviewItem]] = []  # a max-heap by key (negated)
        self._order = itertools.count()

    def push(self, key: tuple[float, ...], item: ReviewItem) -> None:
        self.seen += 1
        entry = (tuple(-k for k in key), next(self._order), item)
        if len(self._heap) < self.limit:
            heapq.heappush(self._heap, entry)
        elif entry[0] > self._heap[0][0]:
            heapq.heapreplace(self._heap, entry)

    def items(self) -> list[ReviewItem]:
        return [item for _, _, item in sorted(self._heap, key=lambda e: (e[0], -e[1]), reverse=True)]


class _LazyModel:
    """The serving model, loaded on first need (never when every image has a stored prediction)."""

    def __init__(self, serving: ServingRow | None, loader: Loader | None, notes: list[str]) -> None:
        self.serving, self.loader, self.notes = serving, loader, notes
        self._tried = False
        self._model: ServingModel | None = None

    def get(self) -> ServingModel | None:
        if self._tried or self.serving is None:
            return self._model
        self._tried = True
        if self.loader is None:
            self.notes.append(f"model {self.serving.uid} was not loaded (no loader given)")
            return None
        try:
            self._model = self.loader(self.serving)
        except SonosegError as exc:
            self.notes.append(f"model {self.serving.uid} could not be loaded: {exc.message}")
        return self._model


def class_lut(model_classes: Sequence[str], project_classes: Sequence[str]) -> NDArray[np.uint8]:
    """Model mask value -> project class index, by name (0 for a class the project lacks)."""
    lut = np.zeros(len(model_classes) + 1, dtype=np.uint8)
    index = {name: i + 1 for i, name in enumerate(project_classes)}
    for i, name in enumerate(model_classes, start=1):
        lut[i] = index.get(name, 0)
    return lut


def _read_pixels(store: BlobStore, key: str) -> NDArray[Any]:
    return read_mask_key(store, key)  # a stored image is a grey PNG, like a mask


def _min_pair(masks: Sequence[NDArray[Any]], n_classes: int) -> tuple[float, int, int]:
    """The lowest Dice over all pairs of ``masks``, and the pair's indices."""
    best = (2.0, 0, 1)
    for i, j in itertools.combinations(range(len(masks)), 2):
        dice = correction_dice(masks[j], masks[i], n_classes)
        if dice < best[0]:
            best = (dice, i, j)
    return best


def build_review(
    plan: ReviewPlan,
    store: BlobStore,
    loader: Loader | None = None,
    *,
    limit: int = DEFAULT_LIMIT,
    k: float = SIZE_OUTLIER_K,
    min_object_pixels: int = MIN_OBJECT_PIXELS,
    on_item: Progress | None = None,
) -> ReviewReport:
    """Score every candidate of every kind and keep the ``limit`` worst of each (no session).

    ``loader`` turns the plan's serving row into a model (``serving.load_from_store(...)``); it is
    called once, and only when some labelled image has no stored prediction of the serving model.
    Inference runs in chunks of :data:`INFERENCE_CHUNK` frames.
    """
    if limit < 1:
        raise InvalidInput(f"limit must be at least 1, got {limit}")
    if k <= 0 or min_object_pixels < 0:
        raise InvalidInput(f"the size outlier rule needs k > 0 and a minimum size >= 0, got k={k}, {min_object_pixels}")
    n = len(plan.class_names)
    notes: list[str] = []
    model = _LazyModel(plan.serving, loader, notes)
    uid = plan.serving.uid if plan.serving is not None else None
    worst = {kind: _Worst(limit) for kind in KINDS}
    total = len(plan.labelled) + len(plan.raters) + len(plan.conflicts)
    done = 0
    stored = fresh = unscored = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if on_item is not None:
            on_item(done, total)

    def disagreement(item: LabelledImage, label: NDArray[Any], pred: NDArray[Any], mask: NDArray[Any] | None) -> None:
        dice = correction_dice(pred, label, n)
        if dice >= 1.0:
            return
        how = (
            "a prediction made now"
            if mask is not None
            else f"its stored prediction {item.prediction.describe() if item.prediction else ''}"
        )
        worst["model_disagreement"].push(
            (dice, item.image_id),
            ReviewItem(
                0,
                "model_disagreement",
                item.image_id,
                dice,
                f"Dice {dice:.3f} between the label {item.label.describe()} and model {uid} ({how})",
                item.image_key,
                item.label,
                item.prediction if mask is None else None,
                ("image", f"label {item.label.describe()}", f"model {uid}"),
                other_mask=mask,
            ),
        )

    pending: list[tuple[LabelledImage, NDArray[Any]]] = []

    def flush() -> None:
        nonlocal fresh, unscored
        if not pending:
            return
        served = model.get()
        if served is None:
            unscored += len(pending)
            pending.clear()
            return
        try:
            outputs = served.predict([_read_pixels(store, item.image_key) for item, _ in pending])
        except SonosegError as exc:
            notes.append(f"inference failed on {len(pending)} image(s): {exc.message}")
            unscored += len(pending)
            pending.clear()
            return
        lut = class_lut(served.classes, plan.class_names)
        for (item, label), output in zip(pending, outputs, strict=True):
            pred = lut[np.asarray(output.mask, np.int64)]
            fresh += 1
            disagreement(item, label, pred, pred)
        pending.clear()

    # one pass over the current labels: object sizes, and Dice against the model
    sizes: list[list[tuple[int, NDArray[np.int64]]]] = [[] for _ in range(n + 1)]
    for index, item in enumerate(plan.labelled):
        label = read_mask_key(store, item.label.blob_key)
        for cls in np.unique(label):
            if 0 < cls <= n:
                sizes[int(cls)].append((index, object_sizes(label, int(cls))))
        if plan.serving is not None:
            if item.prediction is not None:
                stored += 1
                disagreement(item, label, read_mask_key(store, item.prediction.blob_key), None)
            else:
                pending.append((item, label))
                if len(pending) >= INFERENCE_CHUNK:
                    flush()
        tick()
    flush()
    if plan.serving is None:
        notes.append(f"model_disagreement skipped: no model serves project {plan.project!r}")
    else:
        notes.append(
            f"model_disagreement: {stored} image(s) compared with stored predictions of {uid}, {fresh} with "
            f"predictions made now" + (f", {unscored} not compared" if unscored else "")
        )

    for kind, groups in (("inter_rater", plan.raters), ("conflicting_duplicate", plan.conflicts)):
        for group in groups:
            tick()
            if len(group.versions) < 2:
                continue
            masks = [read_mask_key(store, v.blob_key) for v in group.versions]
            dice, i, j = _min_pair(masks, n)
            if kind == "inter_rater" and dice >= 1.0:
                continue
            a, b = group.versions[i], group.versions[j]
            if kind == "inter_rater":
                reason = f"Dice {dice:.3f} between {a.author} (v{a.version}) and {b.author} (v{b.version})"
                if len(group.versions) > 2:
                    reason += f" (lowest pair of {len(group.versions)} annotators)"
                captions = ("image", f"{a.author} v{a.version}", f"{b.author} v{b.version}")
            else:
                reason = (
                    f"open issue {group.issue_id}: identical pixels, versions {a.version} and {b.version} "
                    f"differ (Dice {dice:.3f}); `sonoseg masks choose --image {group.image_id} --version N`"
                )
                captions = ("image", f"version {a.version}", f"version {b.version}")
            worst[kind].push(
                (dice, group.image_id),
                ReviewItem(0, kind, group.image_id, dice, reason, group.image_key, a, b, captions),
            )

    _size_outliers(plan, sizes, worst["size_outlier"], k=k, min_object_pixels=min_object_pixels)

    items: list[ReviewItem] = []
    for kind in KINDS:
        items.extend(worst[kind].items())
    ranked = tuple(dataclasses.replace(item, rank=rank) for rank, item in enumerate(items, start=1))
    counts = tuple(KindCount(kind, worst[kind].seen, len(worst[kind].items())) for kind in KINDS)
    rule = (
        f"outside median +- {k:g} x 1.4826 x MAD of the class's object areas (scale >= {SCALE_FLOOR_OF_MEDIAN:.0%} of "
        f"the median and >= 1 px; classes with >= {MIN_OBJECTS_FOR_SPREAD} objects), or below {min_object_pixels} px"
    )
    return ReviewReport(plan.project_id, plan.project, plan.class_names, uid, ranked, counts, tuple(notes), rule)


def _size_outliers(
    plan: ReviewPlan,
    sizes: list[list[tuple[int, NDArray[np.int64]]]],
    worst: _Worst,
    *,
    k: float,
    min_object_pixels: int,
) -> None:
    for cls, name in enumerate(plan.class_names, start=1):
        if not sizes[cls]:
            continue
        areas = np.concatenate([a for _, a in sizes[cls]]).astype(np.float64)
        median = float(np.median(areas))
        mad = float(np.median(np.abs(areas - median)))
        spread = areas.size >= MIN_OBJECTS_FOR_SPREAD
        scale = max(MAD_TO_SD * mad, SCALE_FLOOR_OF_MEDIAN * median, 1.0)
        for index, image_areas in sizes[cls]:
            z = (image_areas - median) / scale
            flagged = image_areas < min_object_pixels
            if spread:
                flagged |= np.abs(z) > k
            if not flagged.any():
                continue
            candidates = np.flatnonzero(flagged)
            pick = int(
                candidates[np.argmax(np.abs(z[candidates]))]
                if spread
                else candidates[np.argmin(image_areas[candidates])]
            )
            area, zi = int(image_areas[pick]), float(z[pick])
            item = plan.labelled[index]
            if spread and abs(zi) > k:
                reason = (
                    f"{name} object of {area} px is {zi:+.1f} robust SD from the class median {median:g} px "
                    f"(MAD {mad:g} px over {areas.size} objects)"
                )
            else:
                reason = f"{name} object of {area} px is below the {min_object_pixels} px minimum (class median {median:g} px)"
            score = abs(zi) if spread else 0.0
            worst.push(
                (-score, item.image_id, cls),
                ReviewItem(
                    0,
                    "size_outlier",
                    item.image_id,
                    score,
                    reason,
                    item.image_key,
                    item.label,
                    item.prediction,
                    ("image", f"label {item.label.describe()}", "model"),
                ),
            )


# -- phase 3: overlays --------------------------------------------------------------------------------
def default_review_dir(data_dir: Path, project: str) -> Path:
    """``<data_dir>/review/<project>/`` (the name made safe as a folder name)."""
    return Path(data_dir) / "review" / (re.sub(r"[^A-Za-z0-9._-]+", "_", project).strip("._") or "project")


def overlay_name(item: ReviewItem) -> str:
    return f"{item.rank:03d}_{item.kind}_image{item.image_id}.png"


def _stale(out_dir: Path) -> Iterator[Path]:
    """Overlays of an earlier review in ``out_dir`` (files named as this module names them)."""
    if out_dir.is_dir():
        yield from (p for p in out_dir.iterdir() if p.is_file() and _OVERLAY_NAME.match(p.name))


def write_overlays(
    store: BlobStore, report: ReviewReport, out_dir: Path, *, on_item: Progress | None = None
) -> ReviewReport:
    """One PNG per item in ``out_dir`` (image | label | model, see ``review_panel``), named
    ``<rank>_<kind>_image<id>.png``; overlays of an earlier review there are replaced. Returns the
    report with each item's ``overlay`` path."""
    from backend.imaging.io import encode_png
    from backend.model.overlay import review_panel

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in list(_stale(out_dir)):
            old.unlink()
    except OSError as exc:
        raise InvalidInput(f"cannot write review overlays to {out_dir}: {exc.strerror or exc}") from exc
    items = []
    for done, item in enumerate(report.items, start=1):
        frame = _read_pixels(store, item.image_key)
        label = read_mask_key(store, item.label.blob_key)
        other = item.other_mask if item.other_mask is not None else None
        if other is None and item.other is not None:
            other = read_mask_key(store, item.other.blob_key)
        title = f"#{item.rank} {item.kind} - image {item.image_id} - score {item.score:.3f}\n{item.reason}"
        panel = review_panel(frame, label, other, report.class_names, title, captions=item.captions)
        path = out_dir / overlay_name(item)
        try:
            path.write_bytes(encode_png(panel))
        except OSError as exc:
            raise InvalidInput(f"cannot write {path}: {exc.strerror or exc}") from exc
        items.append(dataclasses.replace(item, overlay=str(path)))
        if on_item is not None:
            on_item(done, len(report.items))
    return dataclasses.replace(report, items=tuple(items))
