"""The read model of the dashboard (``/ui``, :mod:`backend.api.ui`): typed page data, few queries.

Every page function takes the caller's session, never commits and issues a fixed number of
statements whatever the number of images, versions or runs (``tests/test_ui.py`` counts them): the
aggregates are SQL ``GROUP BY`` queries, lists are single selects of the columns a page shows.

Two pages need more than SQL: per-class dataset statistics (:mod:`.stats` reads every current
label mask) and the review queue (:mod:`.review` reads the masks and may run the serving model).
Their results are derived data, kept in a :class:`PageCache` (small JSON files under the data
directory, keyed by a digest of the rows they were computed from) and computed by the
**workflows** :func:`compute_class_stats` and :func:`compute_review`, which open their own short
units of work (no transaction is held while masks are read) and which the HTTP side runs in a
background thread. Review thumbnails are PNGs in the blob store (content-addressed); the cache's
thumbnail index maps what a thumbnail shows to its key, so none is rendered twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from backend.db.base import utcnow
from backend.db.models import (
    MASK_SOURCE_VALUES,
    SPLIT_VALUES,
    Image,
    LabelIssue,
    LabelLease,
    MaskVersion,
    ModelVersion,
    Prediction,
    Project,
    TrainingRun,
)
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import InvalidInput, NotFound, SonosegError
from backend.services import review as review_service
from backend.services import stats as stats_service
from backend.services.versions import serving_stack
from backend.storage.atomic import write_atomic
from backend.storage.blobs import BlobStore
from backend.storage.private import private_dir

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 20  # correction Dice in bins of 0.05; the last one, [0.95, 1], is "accepted"
ACCEPTED_DICE = 0.95
RUNS_SHOWN = 50
REVIEW_LIMIT = 12  # items per kind on the review page
THUMBNAIL_SIDE = 200  # longest side of one thumbnail panel, in pixels
THUMBNAIL_SUFFIX = ".thumb.png"
THUMBNAIL_VERSION = "1"  # part of the thumbnail index key: bump when the rendering changes
CACHE_KEEP = 3  # cached results kept per page and project (the newest)
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


# -- projects -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectRef:
    """What every project page shows in its header."""

    id: int
    name: str
    ls_project_id: int | None
    class_names: tuple[str, ...]
    label_studio_link: str | None


@dataclass(frozen=True)
class SplitRow:
    split: str
    images: int
    labelled: int

    @property
    def unlabelled(self) -> int:
        return self.images - self.labelled


class _SplitTotals:
    """Totals over ``splits`` for a page that shows a project's images per split."""

    splits: tuple[SplitRow, ...]

    @property
    def images(self) -> int:
        return sum(s.images for s in self.splits)

    @property
    def labelled(self) -> int:
        return sum(s.labelled for s in self.splits)

    @property
    def unlabelled(self) -> int:
        return self.images - self.labelled


@dataclass(frozen=True)
class RunBrief:
    id: int
    status: str
    trigger: str
    phase: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class ProjectSummary(_SplitTotals):
    project: ProjectRef
    splits: tuple[SplitRow, ...]  # every split, in SPLIT_VALUES order
    serving_uid: str | None
    versions: int
    last_run: RunBrief | None
    retrain_pending: bool
    auto_retrain: bool


def label_studio_link(label_studio_url: str, ls_project_id: int | None) -> str | None:
    """The project's data manager in Label Studio, when the project is linked and the URL known."""
    if ls_project_id is None or not label_studio_url:
        return None
    return f"{label_studio_url.rstrip('/')}/projects/{ls_project_id}/data"


def _ref(row: Any, label_studio_url: str) -> ProjectRef:
    return ProjectRef(
        int(row.id),
        str(row.name),
        row.ls_project_id,
        tuple(row.class_names or ()),
        label_studio_link(label_studio_url, row.ls_project_id),
    )


_PROJECT_COLUMNS = (
    Project.id,
    Project.name,
    Project.ls_project_id,
    Project.class_names,
    Project.retrain_pending,
    Project.auto_retrain,
)


def project_ref(session: Session, project_id: int, *, label_studio_url: str = "") -> ProjectRef:
    """The project's header, or :class:`NotFound`. One statement."""
    row = session.execute(select(*_PROJECT_COLUMNS).where(Project.id == project_id)).one_or_none()
    if row is None:
        raise NotFound(f"no project {project_id}; the project list is at /ui/")
    return _ref(row, label_studio_url)


def _split_rows(counts: Mapping[str, tuple[int, int]]) -> tuple[SplitRow, ...]:
    return tuple(SplitRow(s, *counts.get(s, (0, 0))) for s in SPLIT_VALUES)


def overview(session: Session, *, label_studio_url: str = "") -> tuple[ProjectSummary, ...]:
    """Every project with its counts, serving model and last run: five statements in all."""
    projects = session.execute(select(*_PROJECT_COLUMNS).order_by(Project.id)).all()
    per_split: dict[int, dict[str, tuple[int, int]]] = {}
    for pid, split, images, labelled in session.execute(
        select(Image.project_id, Image.split, func.count(Image.id), func.count(MaskVersion.id))
        .outerjoin(MaskVersion, and_(MaskVersion.image_id == Image.id, MaskVersion.is_current))
        .group_by(Image.project_id, Image.split)
    ):
        per_split.setdefault(int(pid), {})[str(split)] = (int(images), int(labelled))
    serving = {
        int(pid): str(uid)
        for pid, uid in session.execute(
            select(ModelVersion.project_id, ModelVersion.uid).where(ModelVersion.status == "serving")
        )
    }
    n_versions = {
        int(pid): int(n)
        for pid, n in session.execute(
            select(ModelVersion.project_id, func.count(ModelVersion.id)).group_by(ModelVersion.project_id)
        )
    }
    newest = select(func.max(TrainingRun.id)).group_by(TrainingRun.project_id).scalar_subquery()
    last_runs = {
        int(r.project_id): _brief(r)
        for r in session.execute(
            select(
                TrainingRun.id,
                TrainingRun.project_id,
                TrainingRun.status,
                TrainingRun.trigger,
                TrainingRun.progress,
                TrainingRun.created_at,
                TrainingRun.finished_at,
            ).where(TrainingRun.id.in_(newest))
        )
    }
    return tuple(
        ProjectSummary(
            project=_ref(p, label_studio_url),
            splits=_split_rows(per_split.get(int(p.id), {})),
            serving_uid=serving.get(int(p.id)),
            versions=n_versions.get(int(p.id), 0),
            last_run=last_runs.get(int(p.id)),
            retrain_pending=bool(p.retrain_pending),
            auto_retrain=bool(p.auto_retrain),
        )
        for p in projects
    )


def _brief(r: Any) -> RunBrief:
    progress = r.progress if isinstance(r.progress, dict) else {}
    phase = progress.get("phase")
    return RunBrief(
        int(r.id), str(r.status), str(r.trigger), str(phase) if phase else None, r.created_at, r.finished_at
    )


# -- model timeline -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassScore:
    name: str
    dice: float | None
    iou: float | None


@dataclass(frozen=True)
class VersionRow:
    """One model version and the validation metrics stored with it (``metrics`` JSON)."""

    id: int
    uid: str
    status: str
    arch: str | None
    created_at: dt.datetime
    promoted_at: dt.datetime | None
    gate_reason: str | None
    parent_uid: str | None
    has_checkpoint: bool
    fg_mdice: float | None
    fg_miou: float | None
    fg_image_dice: float | None
    gate_score: float | None  # the value of the gate metric (Settings.gate_metric)
    n_train: int | None
    n_val: int | None
    epochs: int | None
    stop_reason: str | None
    train_seconds: float | None
    per_class: tuple[ClassScore, ...]

    @property
    def serving(self) -> bool:
        return self.status == "serving"

    def class_dice(self, name: str) -> float | None:
        return next((c.dice for c in self.per_class if c.name == name), None)

    @property
    def can_promote(self) -> bool:
        """What :func:`backend.services.versions.promote` accepts (a candidate or retired version with a checkpoint)."""
        return self.status in ("candidate", "retired") and self.has_checkpoint


@dataclass(frozen=True)
class Timeline:
    project: ProjectRef
    versions: tuple[VersionRow, ...]  # oldest first
    gate_metric: str
    serving_uid: str | None
    rollback_to: str | None  # the uid a rollback would serve again, None when rollback is refused

    @property
    def classes(self) -> tuple[str, ...]:
        names = list(self.project.class_names)
        for v in self.versions:
            names.extend(c.name for c in v.per_class if c.name not in names)
        return tuple(names)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _integer(value: object) -> int | None:
    f = _number(value)
    return int(f) if f is not None else None


def _text(value: object) -> str | None:
    return str(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else None


def _per_class(metrics: Mapping[str, Any], class_names: Sequence[str]) -> tuple[ClassScore, ...]:
    report = metrics.get("val_report")
    per_class = report.get("per_class") if isinstance(report, dict) else None
    if not isinstance(per_class, dict):
        return ()
    names = [n for n in class_names if n in per_class] + [n for n in per_class if n not in class_names]
    out = []
    for name in names:
        scores = per_class.get(name)
        if isinstance(scores, dict):
            out.append(ClassScore(str(name), _number(scores.get("dice")), _number(scores.get("iou"))))
    return tuple(out)


def model_timeline(session: Session, project: ProjectRef, *, gate_metric: str = "fg_mDice") -> Timeline:
    """Every version of the project, oldest first, and what a rollback would restore: two statements."""
    rows = session.execute(
        select(
            ModelVersion.id,
            ModelVersion.uid,
            ModelVersion.status,
            ModelVersion.arch,
            ModelVersion.metrics,
            ModelVersion.gate_reason,
            ModelVersion.created_at,
            ModelVersion.promoted_at,
            ModelVersion.parent_id,
            ModelVersion.checkpoint_key,
        )
        .where(ModelVersion.project_id == project.id)
        .order_by(ModelVersion.created_at, ModelVersion.id)
    ).all()
    uid_of = {int(r.id): str(r.uid) for r in rows}
    versions = []
    for r in rows:
        metrics: Mapping[str, Any] = r.metrics if isinstance(r.metrics, dict) else {}
        versions.append(
            VersionRow(
                id=int(r.id),
                uid=str(r.uid),
                status=str(r.status),
                arch=r.arch,
                created_at=r.created_at,
                promoted_at=r.promoted_at,
                gate_reason=r.gate_reason,
                parent_uid=uid_of.get(int(r.parent_id)) if r.parent_id is not None else None,
                has_checkpoint=bool(r.checkpoint_key),
                fg_mdice=_number(metrics.get("fg_mDice")),
                fg_miou=_number(metrics.get("fg_mIoU")),
                fg_image_dice=_number(metrics.get("fg_image_dice")),
                gate_score=_number(metrics.get(gate_metric)),
                n_train=_integer(metrics.get("n_train")),
                n_val=_integer(metrics.get("n_val")),
                epochs=_integer(metrics.get("epochs")),
                stop_reason=_text(metrics.get("stop_reason")),
                train_seconds=_number(metrics.get("train_seconds")),
                per_class=_per_class(metrics, project.class_names),
            )
        )
    by_id = {v.id: v for v in versions}
    serving = next((v for v in versions if v.serving), None)
    rollback_to = None
    stack = serving_stack(session, project.id)
    # the preconditions of versions.rollback, so the page offers the button only when it would work
    if serving is not None and len(stack) >= 2 and stack[-1] == serving.id:
        previous = by_id.get(stack[-2])
        if previous is not None and previous.status != "failed" and previous.has_checkpoint:
            rollback_to = previous.uid
    return Timeline(project, tuple(versions), gate_metric, serving.uid if serving else None, rollback_to)


# -- correction effort --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EffortRow:
    """Predictions served by one model version and how much they were corrected (``correction_dice``),
    and how long the corrections took (Label Studio's ``lead_time`` of the correcting annotation)."""

    model_uid: str  # "untrained" for the empty pre-annotations served before any model
    created_at: dt.datetime | None  # of the model version (None for "untrained")
    predictions: int
    corrected: int  # predictions whose correction arrived (correction_dice known)
    accepted: int  # corrected with Dice >= ACCEPTED_DICE: taken nearly unchanged
    mean_dice: float | None
    bins: tuple[int, ...]  # HISTOGRAM_BINS counts of correction Dice over [0, 1]
    median_dice: float | None = None
    timed: int = 0  # corrections whose annotation carried a lead_time
    mean_seconds: float | None = None
    median_seconds: float | None = None

    @property
    def accepted_share(self) -> float | None:
        return self.accepted / self.corrected if self.corrected else None


@dataclass(frozen=True)
class Effort:
    project: ProjectRef
    rows: tuple[EffortRow, ...]  # "untrained" first, then versions oldest first
    bins: int = HISTOGRAM_BINS
    accepted_dice: float = ACCEPTED_DICE

    @property
    def lead_time_recorded(self) -> bool:
        """Whether any correction carried Label Studio's ``lead_time`` (older ones did not store it)."""
        return any(row.timed for row in self.rows)


def correction_effort(session: Session, project: ProjectRef) -> Effort:
    """Per model version: histograms and means in one aggregate statement; medians from a second
    one that reads the corrected predictions' (version, Dice, seconds) only.

    Medians are computed here rather than in SQL because SQLite has no percentile function.
    """
    dice = Prediction.correction_dice
    seconds = MaskVersion.lead_time_seconds
    # bounds i / n, so the last bin starts at exactly ACCEPTED_DICE (0.95, not 19 * 0.05 = 0.9500000000000001)
    n = HISTOGRAM_BINS
    bins = [
        func.sum(case((and_(dice >= i / n, dice < (i + 1) / n), 1), else_=0))
        if i < n - 1
        else func.sum(case((dice >= i / n, 1), else_=0))
        for i in range(HISTOGRAM_BINS)
    ]
    corrected_by = (
        select(Prediction.model_version_uid.label("uid"), dice.label("dice"), seconds.label("seconds"))
        .join(Image, Image.id == Prediction.image_id)
        .outerjoin(MaskVersion, MaskVersion.id == Prediction.corrected_mask_version_id)
        .where(Image.project_id == project.id)
    )
    rows = session.execute(
        select(
            Prediction.model_version_uid,
            func.min(ModelVersion.created_at),
            func.count(Prediction.id),
            func.count(dice),
            func.sum(case((dice >= ACCEPTED_DICE, 1), else_=0)),
            func.avg(dice),
            func.count(case((dice.is_not(None), seconds))),
            func.avg(case((dice.is_not(None), seconds))),
            *bins,
        )
        .join(Image, Image.id == Prediction.image_id)
        .outerjoin(ModelVersion, ModelVersion.id == Prediction.model_version_id)
        .outerjoin(MaskVersion, MaskVersion.id == Prediction.corrected_mask_version_id)
        .where(Image.project_id == project.id)
        .group_by(Prediction.model_version_uid)
    ).all()
    dices: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    for uid, d, t in session.execute(corrected_by.where(dice.is_not(None))):
        if d is not None:  # always (the WHERE); the column is nullable
            dices.setdefault(uid, []).append(float(d))
        if t is not None:
            times.setdefault(uid, []).append(float(t))
    out = [
        EffortRow(
            model_uid=str(r[0]),
            created_at=r[1],
            predictions=int(r[2]),
            corrected=int(r[3]),
            accepted=int(r[4] or 0),
            mean_dice=_number(r[5]),
            timed=int(r[6] or 0),
            mean_seconds=_number(r[7]),
            bins=tuple(int(b or 0) for b in r[8:]),
            median_dice=_median(dices.get(str(r[0]), [])),
            median_seconds=_median(times.get(str(r[0]), [])),
        )
        for r in rows
    ]
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    out.sort(key=lambda e: (e.created_at is not None, e.created_at or epoch, e.model_uid))
    return Effort(project, tuple(out))


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


# -- next to label ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NextRow:
    """One pool image in the order the project's strategy ranks it, with its scores and lease."""

    rank: int
    image_id: int
    ls_task_id: int | None
    subject: str | None
    entropy: float | None  # None: not scored by the serving model yet
    tta_disagreement: float | None
    boundary_uncertainty: float | None
    foreground_fraction: float | None
    leased_to: str | None  # a live lease's annotator
    lease_expires: dt.datetime | None


@dataclass(frozen=True)
class NextPage:
    project: ProjectRef
    strategy: str
    model_version: str | None
    pool: int  # images in the pool (unlabelled, train split)
    scored: int  # of them, scored by the serving version
    rows: tuple[NextRow, ...]  # the head of the ranking


NEXT_ROWS = 25


def next_to_label(session: Session, project: ProjectRef, *, limit: int = NEXT_ROWS) -> NextPage:
    """The head of the project's ranking as ``sonoseg al publish`` would write it, with live leases.

    The strategy's random choices are seeded by the project and serving version, so the page is the
    same on every reload until a new model serves; no lease is taken.
    """
    from backend.services import worklist

    row = session.get_one(Project, project.id)
    serving = session.scalar(
        select(ModelVersion.id).where(ModelVersion.project_id == project.id, ModelVersion.status == "serving")
    )
    seed = int(hashlib.sha256(f"{project.id}:{serving}".encode()).hexdigest()[:12], 16)
    ranked = worklist.rank_pool(session, row, rng=np.random.default_rng(seed))
    head = ranked.image_ids[:limit]
    leases = {
        lease.image_id: lease
        for lease in session.scalars(
            select(LabelLease).where(LabelLease.image_id.in_(head), LabelLease.expires_at > utcnow())
        )
    }
    rows = []
    for rank, (image_id, task_id) in enumerate(zip(head, ranked.ls_task_ids, strict=False), start=1):
        c = ranked.scored.get(image_id)
        lease = leases.get(image_id)
        rows.append(
            NextRow(
                rank,
                image_id,
                task_id,
                c.subject if c else None,
                c.entropy if c else None,
                c.tta_disagreement if c else None,
                c.boundary_uncertainty if c else None,
                c.foreground_fraction if c else None,
                lease.annotator if lease else None,
                lease.expires_at if lease else None,
            )
        )
    return NextPage(
        project, ranked.strategy, ranked.model_version, len(ranked.image_ids), len(ranked.scored), tuple(rows)
    )


# -- training runs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRow:
    """One training run, with the progress its worker last wrote (``training_run.progress``)."""

    id: int
    trigger: str
    status: str
    phase: str | None
    epoch: int | None
    step: int | None
    loss: float | None
    val_dice: float | None
    best_val_dice: float | None
    fraction: float | None  # of the training budget used, 0..1
    elapsed_s: float | None
    worker: str | None
    device: str | None
    error: str | None
    attempts: int
    from_scratch: bool
    model_uid: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    finished_at: dt.datetime | None
    details: tuple[tuple[str, str], ...]  # the other progress keys, as text

    @property
    def active(self) -> bool:
        return self.status in ("queued", "running")

    def to_json(self) -> dict[str, object]:
        def when(t: dt.datetime | None) -> str | None:
            return t.isoformat() if t is not None else None

        return {
            "id": self.id,
            "trigger": self.trigger,
            "status": self.status,
            "phase": self.phase,
            "epoch": self.epoch,
            "step": self.step,
            "loss": self.loss,
            "val_dice": self.val_dice,
            "best_val_dice": self.best_val_dice,
            "fraction": self.fraction,
            "elapsed_s": self.elapsed_s,
            "worker": self.worker,
            "device": self.device,
            "error": self.error,
            "attempts": self.attempts,
            "from_scratch": self.from_scratch,
            "model_uid": self.model_uid,
            "created_at": when(self.created_at),
            "started_at": when(self.started_at),
            "heartbeat_at": when(self.heartbeat_at),
            "finished_at": when(self.finished_at),
            "details": [list(d) for d in self.details],
        }


@dataclass(frozen=True)
class Runs:
    project: ProjectRef
    runs: tuple[RunRow, ...]  # newest first, at most RUNS_SHOWN
    total: int

    @property
    def active(self) -> bool:
        return any(r.active for r in self.runs)

    def to_json(self) -> dict[str, object]:
        return {
            "project": self.project.id,
            "total": self.total,
            "active": self.active,
            "runs": [r.to_json() for r in self.runs],
        }


_PROGRESS_FIELDS = ("phase", "epoch", "step", "loss", "val_dice", "best_val_dice", "fraction", "elapsed_s")


def training_runs(session: Session, project: ProjectRef, *, limit: int = RUNS_SHOWN) -> Runs:
    """The newest runs of the project and how many there are: two statements."""
    rows = session.execute(
        select(TrainingRun, ModelVersion.uid)
        .outerjoin(ModelVersion, ModelVersion.id == TrainingRun.model_version_id)
        .where(TrainingRun.project_id == project.id)
        .order_by(TrainingRun.id.desc())
        .limit(limit)
    ).all()
    out = []
    for run, model_uid in rows:
        p: Mapping[str, Any] = run.progress if isinstance(run.progress, dict) else {}
        out.append(
            RunRow(
                id=run.id,
                trigger=run.trigger,
                status=run.status,
                phase=_text(p.get("phase")),
                epoch=_integer(p.get("epoch")),
                step=_integer(p.get("step")),
                loss=_number(p.get("loss")),
                val_dice=_number(p.get("val_dice")),
                best_val_dice=_number(p.get("best_val_dice")),
                fraction=_number(p.get("fraction")),
                elapsed_s=_number(p.get("elapsed_s")),
                worker=run.worker,
                device=run.device,
                error=run.error,
                attempts=run.attempts,
                from_scratch=run.from_scratch,
                model_uid=model_uid,
                created_at=run.created_at,
                started_at=run.started_at,
                heartbeat_at=run.heartbeat_at,
                finished_at=run.finished_at,
                details=tuple(
                    (str(k), json.dumps(v) if not isinstance(v, str) else v)
                    for k, v in sorted(p.items())
                    if k not in _PROGRESS_FIELDS
                ),
            )
        )
    total = session.scalar(select(func.count(TrainingRun.id)).where(TrainingRun.project_id == project.id)) or 0
    return Runs(project, tuple(out), int(total))


# -- the page cache -----------------------------------------------------------------------------------
class PageCache:
    """Derived page data and the thumbnail index, as small files under ``root`` (owner-only).

    - ``<kind>/p<project>/<digest>.json``: a result computed from the rows whose digest is
      ``digest`` (the newest :data:`CACHE_KEEP` per project are kept), and ``latest.json`` naming
      the newest one, shown (marked out of date) while a new one is computed;
    - ``thumbs/<ab>/<spec>``: the store key of the thumbnail whose content digest is ``spec``.

    Files are written atomically, so concurrent processes (gunicorn workers) at worst compute the
    same result twice; a reader never sees half a file.
    """

    def __init__(self, root: Path, store: BlobStore) -> None:
        self.root = Path(root)
        self.store = store

    def _dir(self, kind: str, project_id: int) -> Path:
        if not re.fullmatch(r"[a-z]+", kind):
            raise InvalidInput(f"invalid cache kind {kind!r}")
        return self.root / kind / f"p{int(project_id)}"

    def get(self, kind: str, project_id: int, digest: str) -> bytes | None:
        if not _DIGEST.match(digest):
            return None
        try:
            return (self._dir(kind, project_id) / f"{digest}.json").read_bytes()
        except OSError:
            return None

    def latest(self, kind: str, project_id: int) -> tuple[str, bytes] | None:
        """The newest result of any digest: (digest, data)."""
        try:
            digest = json.loads((self._dir(kind, project_id) / "latest.json").read_bytes())["digest"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        data = self.get(kind, project_id, str(digest))
        return (str(digest), data) if data is not None else None

    def put(self, kind: str, project_id: int, digest: str, data: bytes) -> None:
        if not _DIGEST.match(digest):
            raise InvalidInput(f"invalid cache digest {digest!r}")
        folder = self._dir(kind, project_id)
        private_dir(folder)
        write_atomic(folder / f"{digest}.json", data)
        write_atomic(folder / "latest.json", json.dumps({"digest": digest}).encode())
        entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        kept = [p for p in entries if p.name != "latest.json"][:CACHE_KEEP]
        for old in entries:
            if old.name != "latest.json" and old not in kept:
                old.unlink(missing_ok=True)

    def thumbnail(self, spec: str) -> str | None:
        """The store key of a thumbnail already rendered for ``spec``, if it is still stored."""
        try:
            key = (self.root / "thumbs" / spec[:2] / spec).read_text().strip()
        except OSError:
            return None
        return key if key and self.store.exists(key) else None

    def put_thumbnail(self, spec: str, png: bytes) -> str:
        blob = self.store.put_bytes("images", png, THUMBNAIL_SUFFIX)
        folder = self.root / "thumbs" / spec[:2]
        private_dir(folder)
        write_atomic(folder / spec, blob.key.encode())
        return blob.key


def thumbnail_key(sha256: str) -> str | None:
    """The store key of a thumbnail named by its sha256 (what the page links to), or None if malformed."""
    return f"images/{sha256[:2]}/{sha256}{THUMBNAIL_SUFFIX}" if _DIGEST.match(sha256) else None


def _digest(parts: Sequence[object]) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()


# -- dataset statistics -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassBar:
    """Per-class statistics from the current label masks (:func:`backend.services.stats.measure_labels`)."""

    name: str
    images: int
    pixels: int
    prevalence: float
    objects: int
    median_size: float | None
    p95_size: float | None


@dataclass(frozen=True)
class ClassStats:
    digest: str  # of the labels they were computed from
    computed_at: dt.datetime
    labelled: int
    classes: tuple[ClassBar, ...]

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "digest": self.digest,
                "computed_at": self.computed_at.isoformat(),
                "labelled": self.labelled,
                "classes": [vars(c) for c in self.classes],
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClassStats:
        raw = json.loads(data)
        return cls(
            str(raw["digest"]),
            dt.datetime.fromisoformat(raw["computed_at"]),
            int(raw["labelled"]),
            tuple(ClassBar(**c) for c in raw["classes"]),
        )


@dataclass(frozen=True)
class DatasetPage(_SplitTotals):
    project: ProjectRef
    splits: tuple[SplitRow, ...]
    subjects: int
    annotators: tuple[stats_service.Count, ...]
    versions_by_source: tuple[stats_service.Count, ...]
    current_by_source: tuple[stats_service.Count, ...]
    several_label_versions: int
    conflicting_duplicates: int
    digest: str  # of the current labels (image id, mask key) and the class names
    class_stats: ClassStats | None  # the newest computed, possibly of older labels
    connectivity: int = stats_service.CONNECTIVITY

    @property
    def class_stats_current(self) -> bool:
        return self.class_stats is not None and self.class_stats.digest == self.digest


STATS_KIND = "stats"
REVIEW_KIND = "review"


def labels_digest(session: Session, project: ProjectRef) -> str:
    """A digest of the project's current labels and class names, in one aggregate statement.

    Mask version ids only grow and a label's row never moves to another image, so the count, the
    sum and the largest id of the current label versions change whenever a label is added,
    replaced, deleted or another version is made current (``sonoseg masks choose``)."""
    row = session.execute(
        select(func.count(MaskVersion.id), func.coalesce(func.sum(MaskVersion.id), 0), func.max(MaskVersion.id))
        .join(Image, Image.id == MaskVersion.image_id)
        .where(Image.project_id == project.id, MaskVersion.is_current)
    ).one()
    return _digest(["labels", *row, json.dumps(list(project.class_names))])


def _project_row(session: Session, project_id: int) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise NotFound(f"no project {project_id}; the project list is at /ui/")
    return project


def dataset_page(session: Session, cache: PageCache, project: ProjectRef) -> DatasetPage:
    """The counts a curator reads first, from aggregate statements only (eight, whatever the size;
    :func:`backend.services.stats.count_dataset` also fetches one row per label and per subject, which
    :func:`compute_class_stats` needs but a page view does not), and the newest cached per-class
    statistics; :attr:`DatasetPage.class_stats_current` says whether they are up to date."""
    pid = project.id
    in_project = Image.project_id == pid
    per_split = {
        str(split): (int(n), int(labelled))
        for split, n, labelled in session.execute(
            select(Image.split, func.count(Image.id), func.count(MaskVersion.id))
            .outerjoin(MaskVersion, and_(MaskVersion.image_id == Image.id, MaskVersion.is_current))
            .where(in_project)
            .group_by(Image.split)
        )
    }
    subjects = session.scalar(select(func.count(func.distinct(Image.subject))).where(in_project)) or 0
    by_source = {
        str(source): (int(n), int(current or 0))
        for source, n, current in session.execute(
            select(MaskVersion.source, func.count(MaskVersion.id), func.sum(case((MaskVersion.is_current, 1), else_=0)))
            .join(Image, Image.id == MaskVersion.image_id)
            .where(in_project)
            .group_by(MaskVersion.source)
        )
    }
    author = func.coalesce(MaskVersion.author, stats_service.UNKNOWN_AUTHOR)
    annotators = sorted(
        (
            stats_service.Count(str(a), int(n))
            for a, n in session.execute(
                select(author, func.count(MaskVersion.id))
                .join(Image, Image.id == MaskVersion.image_id)
                .where(in_project, MaskVersion.is_current, MaskVersion.source == "annotation")
                .group_by(author)
            )
        ),
        key=lambda c: (-c.count, c.name),
    )
    n_several = stats_service.images_with_several_label_versions(session, pid)
    conflicts = stats_service.conflicting_duplicates(session, pid)
    digest = labels_digest(session, project)
    cached = cache.get(STATS_KIND, pid, digest)
    latest = (digest, cached) if cached is not None else cache.latest(STATS_KIND, pid)
    class_stats = None
    if latest is not None:
        try:
            class_stats = ClassStats.from_bytes(latest[1])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable cached statistics file of project %s", pid)
    return DatasetPage(
        project=project,
        splits=_split_rows(per_split),
        subjects=int(subjects),
        annotators=tuple(annotators),
        versions_by_source=tuple(stats_service.Count(s, by_source.get(s, (0, 0))[0]) for s in MASK_SOURCE_VALUES),
        current_by_source=tuple(stats_service.Count(s, by_source.get(s, (0, 0))[1]) for s in MASK_SOURCE_VALUES),
        several_label_versions=n_several,
        conflicting_duplicates=conflicts,
        digest=digest,
        class_stats=class_stats,
    )


def compute_class_stats(factory: SessionFactory, store: BlobStore, cache: PageCache, project_id: int) -> ClassStats:
    """Workflow: count in one short unit of work, read every current label mask outside it, cache."""
    with unit_of_work(factory) as session:
        project = _project_row(session, project_id)
        counts = stats_service.count_dataset(session, project)
        digest = labels_digest(session, _ref(project, ""))
    measured = stats_service.measure_labels(store, counts)
    result = ClassStats(
        digest,
        utcnow(),
        measured.labelled,
        tuple(
            ClassBar(
                c.name,
                c.images,
                c.pixels,
                c.prevalence,
                c.objects,
                c.sizes.median if c.sizes else None,
                c.sizes.p95 if c.sizes else None,
            )
            for c in measured.classes
        ),
    )
    cache.put(STATS_KIND, project_id, digest, result.to_bytes())
    return result


# -- review queue -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReviewRow:
    rank: int
    kind: str
    image_id: int
    score: float
    reason: str
    captions: tuple[str, str]  # of the two thumbnail panels
    thumbnail: str | None  # the thumbnail's sha256 (served under /ui/thumbnails/), None if it failed


@dataclass(frozen=True)
class ReviewQueue:
    digest: str
    computed_at: dt.datetime
    model_uid: str | None
    items: tuple[ReviewRow, ...]
    counts: tuple[review_service.KindCount, ...]
    notes: tuple[str, ...]
    size_rule: str

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "digest": self.digest,
                "computed_at": self.computed_at.isoformat(),
                "model_uid": self.model_uid,
                "items": [{**vars(i), "captions": list(i.captions)} for i in self.items],
                "counts": [vars(c) for c in self.counts],
                "notes": list(self.notes),
                "size_rule": self.size_rule,
            }
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ReviewQueue:
        raw = json.loads(data)
        return cls(
            str(raw["digest"]),
            dt.datetime.fromisoformat(raw["computed_at"]),
            raw["model_uid"],
            tuple(ReviewRow(**{**i, "captions": tuple(i["captions"])}) for i in raw["items"]),
            tuple(review_service.KindCount(**c) for c in raw["counts"]),
            tuple(str(n) for n in raw["notes"]),
            str(raw["size_rule"]),
        )


@dataclass(frozen=True)
class ReviewPage:
    project: ProjectRef
    digest: str  # of what the queue depends on (labels, annotations, predictions, issues, serving model)
    queue: ReviewQueue | None  # the newest computed, possibly of older data
    kinds: tuple[str, ...] = review_service.KINDS

    @property
    def current(self) -> bool:
        return self.queue is not None and self.queue.digest == self.digest


def review_digest(session: Session, project_id: int) -> str:
    """A digest of everything the review queue reads, in three aggregate statements: mask versions
    (ids only grow, so count, max id and the sums over current and active rows change with any
    write), predictions, open label issues and the serving version."""
    masks = session.execute(
        select(
            func.count(MaskVersion.id),
            func.max(MaskVersion.id),
            func.sum(case((MaskVersion.is_current, MaskVersion.id), else_=0)),
            func.sum(case((MaskVersion.active, MaskVersion.id), else_=0)),
        )
        .join(Image, Image.id == MaskVersion.image_id)
        .where(Image.project_id == project_id)
    ).one()
    predictions = session.execute(
        select(func.count(Prediction.id), func.max(Prediction.id))
        .join(Image, Image.id == Prediction.image_id)
        .where(Image.project_id == project_id)
    ).one()
    other = session.execute(
        select(
            select(func.count(LabelIssue.id))
            .where(LabelIssue.project_id == project_id, LabelIssue.status == "open")
            .scalar_subquery(),
            select(func.max(LabelIssue.id)).where(LabelIssue.project_id == project_id).scalar_subquery(),
            select(ModelVersion.id)
            .where(ModelVersion.project_id == project_id, ModelVersion.status == "serving")
            .scalar_subquery(),
            select(Project.class_names).where(Project.id == project_id).scalar_subquery(),
        )
    ).one()
    return _digest([REVIEW_LIMIT, *masks, *predictions, *other[:3], json.dumps(other[3])])


def review_page(session: Session, cache: PageCache, project: ProjectRef) -> ReviewPage:
    digest = review_digest(session, project.id)
    cached = cache.get(REVIEW_KIND, project.id, digest)
    latest = (digest, cached) if cached is not None else cache.latest(REVIEW_KIND, project.id)
    queue = None
    if latest is not None:
        try:
            queue = ReviewQueue.from_bytes(latest[1])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable cached review of project %s", project.id)
    return ReviewPage(project, digest, queue)


def _fit(a: NDArray[Any], side: int) -> NDArray[Any]:
    """Nearest-neighbour scaling by an integer factor so the longer side is about ``side``."""
    longest = max(a.shape[:2])
    if longest < side:
        up = max(1, side // longest)
        return np.repeat(np.repeat(a, up, axis=0), up, axis=1)
    down = math.ceil(longest / side)
    return a[::down, ::down]


def render_thumbnail(frame: NDArray[Any], label: NDArray[Any], other: NDArray[Any] | None) -> bytes:
    """Two panels side by side, the label's and the other mask's contours over the frame (PNG bytes)."""
    from backend.imaging.io import encode_png
    from backend.model.overlay import contours

    if frame.ndim == 3:
        frame = frame[..., 0]
    grey = _fit(np.asarray(frame, np.uint8), THUMBNAIL_SIDE)
    left = contours(grey, _fit(np.asarray(label, np.uint8), THUMBNAIL_SIDE))
    right = (
        contours(grey, _fit(np.asarray(other, np.uint8), THUMBNAIL_SIDE))
        if other is not None and other.shape[:2] == frame.shape[:2]
        else np.repeat((grey // 3)[..., None], 3, axis=-1)
    )
    gap = np.full((grey.shape[0], 4, 3), 255, np.uint8)
    return encode_png(np.ascontiguousarray(np.concatenate([left, gap, right], axis=1)))


def _thumbnail(
    cache: PageCache, store: BlobStore, item: review_service.ReviewItem, model_uid: str | None
) -> str | None:
    other = item.other.blob_key if item.other is not None else None
    if other is None and item.other_mask is not None:
        other = f"fresh:{model_uid}"  # a prediction made now by the serving model (deterministic)
    spec = _digest([THUMBNAIL_VERSION, item.image_key, item.label.blob_key, other])
    key = cache.thumbnail(spec)
    if key is None:
        try:
            frame = stats_service.read_mask_key(store, item.image_key)  # a stored frame is a grey PNG too
            label = stats_service.read_mask_key(store, item.label.blob_key)
            mask = item.other_mask
            if mask is None and item.other is not None:
                mask = stats_service.read_mask_key(store, item.other.blob_key)
            key = cache.put_thumbnail(spec, render_thumbnail(frame, label, mask))
        except (SonosegError, ValueError, OSError) as exc:
            log.warning("no thumbnail for image %s: %s", item.image_id, exc)
            return None
    return key.rsplit("/", 1)[-1].removesuffix(THUMBNAIL_SUFFIX)


def compute_review(
    factory: SessionFactory,
    store: BlobStore,
    cache: PageCache,
    project_id: int,
    loader: review_service.Loader | None = None,
    *,
    limit: int = REVIEW_LIMIT,
) -> ReviewQueue:
    """Workflow: plan in one short unit of work (:func:`backend.services.review.plan_review`), score
    outside it (:func:`~backend.services.review.build_review`), render the thumbnails not rendered
    before, cache the queue. ``loader`` runs the serving model on labelled images that have no stored
    prediction of it; the dashboard passes none (the queue then compares stored predictions only and
    its notes say how many images were not compared): bulk inference inside the web server would
    compete with ``/predict``, and ``sonoseg review`` does it from the command line."""
    with unit_of_work(factory) as session:
        digest = review_digest(session, project_id)
        plan = review_service.plan_review(session, _project_row(session, project_id))
    report = review_service.build_review(plan, store, loader, limit=limit)
    items = tuple(
        ReviewRow(
            item.rank,
            item.kind,
            item.image_id,
            float(item.score),
            item.reason,
            (item.captions[1], item.captions[2]),
            _thumbnail(cache, store, item, report.model_uid),
        )
        for item in report.items
    )
    notes = report.notes
    if loader is None and report.model_uid is not None:
        notes = (
            *(n for n in notes if "no loader given" not in n),
            "the dashboard compares labels with stored predictions only; `sonoseg review` also runs the model "
            "on labelled images that have none",
        )
    queue = ReviewQueue(
        digest,
        utcnow(),
        report.model_uid,
        items,
        report.counts,
        notes,
        report.size_rule,
    )
    cache.put(REVIEW_KIND, project_id, digest, queue.to_bytes())
    return queue
