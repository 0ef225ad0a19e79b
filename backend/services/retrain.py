"""The retraining loop's core: when a run is due, and claiming, executing and finishing runs.

When (policy, per project; see ``docs/workers.md``):

- **annotations**: once ``retrain_after`` (default 20) labelled *training* images are new or
  changed since the snapshot of the project's last trained version, a run is queued with a
  debounce deadline (``not_before``); every further save while it waits pushes the deadline out
  (capped), so a burst of saves makes one run. Validation and test labels never count: they are
  held out. The baseline is the last trained version whatever its gate outcome, so a rejected
  candidate does not make every later save start another run.
- **start_training** / **manual**: queued at once; while a run is active, the request is kept
  as ``project.retrain_pending`` and one more run starts when the active one ends.
- **schedule**: the nightly beat queues a run only if anything changed.

A run row is the truth; Celery messages only wake workers (the outbox): the dispatcher sends
due queued runs, a worker claims one by compare-and-set (so a duplicate message is a no-op),
heartbeats while it trains, and registers the result in one final transaction that first checks
it still owns the run. A run whose worker died stops heartbeating; :func:`reap_stale_runs`
re-queues it (up to ``train_max_attempts``) or marks it failed. Nothing is registered before the
checkpoint is completely in the store, so a crash never leaves a half-written model version.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from backend.db.base import utcnow
from backend.db.models import Image, MaskVersion, ModelVersion, Project, TrainingRun, model_version_mask
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import CheckpointError, InvalidInput, NotFound, SonosegError
from backend.services import gate, runs, versions
from backend.settings import Settings
from backend.storage.blobs import BlobStore, sha256_file

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from backend.model.checkpoint import Checkpoint
    from backend.model.train import Progress, TrainResult

log = logging.getLogger(__name__)

MAX_DEBOUNCE_FACTOR = 5.0
"""A burst of saves may delay a queued run by at most this many debounce periods in total."""
TRAINED_STATUSES = ("candidate", "serving", "retired")
ERROR_TEXT_LIMIT = 4000


# -- policy: pure ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrainPolicy:
    """A project's effective policy: its overrides, else the settings."""

    retrain_after: int
    debounce_seconds: float
    max_minutes: float
    auto: bool


def policy_for(project: Project, settings: Settings) -> RetrainPolicy:
    return RetrainPolicy(
        retrain_after=project.retrain_after if project.retrain_after is not None else settings.retrain_after,
        debounce_seconds=settings.retrain_debounce_seconds,
        max_minutes=project.train_max_minutes if project.train_max_minutes is not None else settings.train_max_minutes,
        auto=bool(project.auto_retrain),
    )


def count_changes(current: Mapping[int, int], snapshot: Mapping[int, int]) -> int:
    """Images whose label differs between two ``{image_id: mask_version_id}`` maps (new, changed
    or removed)."""
    return sum(1 for image_id in set(current) | set(snapshot) if current.get(image_id) != snapshot.get(image_id))


def retrain_due(changed: int, policy: RetrainPolicy) -> bool:
    """Whether ``changed`` training labels warrant an automatic run (``retrain_after`` 0: never)."""
    return policy.auto and policy.retrain_after > 0 and changed >= policy.retrain_after


def debounce_until(now: dt.datetime, first_queued_at: dt.datetime, debounce_seconds: float) -> dt.datetime:
    """The new start deadline after a save: ``debounce`` from now, but never later than
    :data:`MAX_DEBOUNCE_FACTOR` periods after the run was queued (a steady stream of saves
    must not postpone training forever)."""
    period = dt.timedelta(seconds=max(0.0, debounce_seconds))
    return min(now + period, first_queued_at + MAX_DEBOUNCE_FACTOR * period)


# -- what changed: queries ---------------------------------------------------------------------
def current_labels(session: Session, project_id: int, split: str) -> dict[int, int]:
    """``{image_id: mask_version_id}`` of the current label masks of one split."""
    rows = session.execute(
        select(Image.id, MaskVersion.id)
        .join(MaskVersion, (MaskVersion.image_id == Image.id) & MaskVersion.is_current)
        .where(Image.project_id == project_id, Image.split == split)
    ).all()
    return {image_id: mv_id for image_id, mv_id in rows}


def last_trained_version(session: Session, project_id: int) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.project_id == project_id, ModelVersion.status.in_(TRAINED_STATUSES))
        .order_by(ModelVersion.id.desc())
    ).first()


def training_snapshot(version: ModelVersion) -> dict[int, int]:
    return {mv.image_id: mv.id for mv in version.training_masks}


def changed_since_last_version(session: Session, project: Project) -> int:
    """Training labels new, changed or removed since the last trained version's snapshot.

    :func:`count_changes` in SQL (this runs on every dispatcher tick): current training masks
    outside the snapshot, plus snapshot masks whose image has no current label any more (an
    image whose label was replaced is already counted once by the first term).
    """
    last = last_trained_version(session, project.id)
    current = (
        select(MaskVersion.id)
        .join(Image, Image.id == MaskVersion.image_id)
        .where(Image.project_id == project.id, Image.split == "train", MaskVersion.is_current)
    )
    if last is None:
        return session.scalar(select(func.count()).select_from(current.subquery())) or 0
    snapshot_ids = select(model_version_mask.c.mask_version_id).where(model_version_mask.c.model_version_id == last.id)
    added = session.scalar(
        select(func.count()).select_from(current.where(MaskVersion.id.not_in(snapshot_ids)).subquery())
    ) or 0
    still_current = select(MaskVersion.image_id).where(MaskVersion.is_current)
    removed = session.scalar(
        select(func.count())
        .select_from(MaskVersion)
        .where(MaskVersion.id.in_(snapshot_ids), MaskVersion.image_id.not_in(still_current))
    ) or 0
    return int(added) + int(removed)


# -- requesting runs ---------------------------------------------------------------------------
def maybe_request_retrain(
    session: Session, project: Project, settings: Settings, *, now: dt.datetime | None = None
) -> TrainingRun | None:
    """Queue an 'annotations' run if enough training labels changed; call after recording labels.

    Idempotent and cheap (two indexed queries). A queued run that is still waiting has its
    debounce deadline pushed out; a running one is left alone (when it ends, the count is taken
    again against its snapshot). Returns the newly queued run, if any. The caller commits.
    """
    now = now or utcnow()
    policy = policy_for(project, settings)
    if not policy.auto:
        return None
    active = runs.active_run(session, project)
    if active is not None:
        if active.status == "queued" and active.trigger == "annotations" and active.not_before is not None:
            active.not_before = debounce_until(now, active.created_at, policy.debounce_seconds)
            active.dispatched_at = None  # the dispatcher sends it again once the new deadline passes
            session.flush()
        return None
    changed = changed_since_last_version(session, project)
    if not retrain_due(changed, policy):
        return None
    run = runs.request_run(session, project, "annotations")
    if run is not None:
        run.not_before = now + dt.timedelta(seconds=policy.debounce_seconds)
        run.progress = {"phase": "queued", "changed_labels": changed}
        session.flush()
        log.info("project %s: %d training labels changed (>= %d): run %s queued", project.id, changed,
                 policy.retrain_after, run.id)
    return run


def request_training(
    session: Session, project: Project, trigger: str, *, from_scratch: bool = False, now: dt.datetime | None = None
) -> TrainingRun | None:
    """Queue a run now (``manual``, ``start_training``); None: one is active and another is now
    pending (``from_scratch`` then applies only if a new request is made afterwards)."""
    run = runs.request_run(session, project, trigger)
    if run is not None:
        run.from_scratch = from_scratch
        run.not_before = now or utcnow()
        run.progress = {"phase": "queued"}
        session.flush()
    return run


def request_scheduled(session: Session, project: Project, settings: Settings) -> TrainingRun | None:
    """The nightly run: only for automatic projects, only if anything changed, never on top of
    an active run (that run already covers the changes)."""
    if not project.auto_retrain or runs.active_run(session, project) is not None:
        return None
    if changed_since_last_version(session, project) == 0:
        return None
    return request_training(session, project, "schedule")


# -- outbox: dispatch and reap -----------------------------------------------------------------
def runs_to_dispatch(session: Session, *, now: dt.datetime, redispatch_after_seconds: float) -> list[int]:
    """Queued runs that are due and were never sent, or were sent long enough ago that the
    message may be lost (a claimed run is no longer 'queued', so this cannot start it twice)."""
    resend_before = now - dt.timedelta(seconds=redispatch_after_seconds)
    rows = session.scalars(
        select(TrainingRun.id)
        .where(
            TrainingRun.status == "queued",
            (TrainingRun.not_before.is_(None)) | (TrainingRun.not_before <= now),
            (TrainingRun.dispatched_at.is_(None)) | (TrainingRun.dispatched_at <= resend_before),
        )
        .order_by(TrainingRun.id)
    )
    return list(rows)


def mark_dispatched(session: Session, run_id: int, *, now: dt.datetime) -> None:
    session.execute(
        update(TrainingRun).where(TrainingRun.id == run_id, TrainingRun.status == "queued").values(dispatched_at=now)
    )


@dataclass(frozen=True)
class Reaped:
    run_id: int
    project_id: int
    requeued: bool
    message: str


def reap_stale_runs(
    session: Session, *, now: dt.datetime, stale_after_seconds: float, max_attempts: int
) -> list[Reaped]:
    """Runs marked running whose heartbeat stopped: re-queue (attempts left) or fail them.

    A worker killed mid-run (kill -9, OOM killer, power loss) can neither finish its run nor
    tell anyone; its heartbeat is the only witness. The serving model is untouched either way.
    """
    cutoff = now - dt.timedelta(seconds=stale_after_seconds)
    stale = session.scalars(
        select(TrainingRun)
        .where(TrainingRun.status == "running")
        .where(((TrainingRun.heartbeat_at.is_not(None)) & (TrainingRun.heartbeat_at < cutoff))
               | ((TrainingRun.heartbeat_at.is_(None)) & (TrainingRun.started_at < cutoff)))
        .with_for_update()
    ).all()
    reaped: list[Reaped] = []
    for run in stale:
        last = run.heartbeat_at or run.started_at
        lost = (f"attempt {run.attempts} lost its worker {run.worker or '?'}: no heartbeat since "
                f"{last.isoformat(timespec='seconds') if last else 'start'}")
        if run.attempts < max_attempts:
            run.status = "queued"
            run.not_before = now
            run.dispatched_at = None
            run.celery_task_id = None
            run.error = f"{lost}; retrying"
            run.progress = {"phase": "queued", "retry_of_attempt": run.attempts}
            reaped.append(Reaped(run.id, run.project_id, True, run.error))
            log.warning("run %s: %s; re-queued", run.id, lost)
        else:
            finish_run(session, run, "failed", error=f"{lost}; giving up after {run.attempts} attempt(s)", now=now)
            reaped.append(Reaped(run.id, run.project_id, False, run.error or lost))
    session.flush()
    return reaped


# -- claiming and finishing ----------------------------------------------------------------------
@dataclass(frozen=True)
class ClaimedRun:
    """The identity of a run this worker owns: ``attempt`` is the claim token checked on every
    heartbeat and before registering, so a run re-queued behind a slow worker's back is never
    finished twice."""

    run_id: int
    project_id: int
    attempt: int
    trigger: str
    from_scratch: bool


def claim_run(
    session: Session, run_id: int, *, worker: str, task_id: str | None, now: dt.datetime | None = None
) -> ClaimedRun | None:
    """queued -> running, once. None when the run is gone, not queued (a duplicate or redelivered
    message: another worker has it or it is over) or not due yet (debounce extended)."""
    now = now or utcnow()
    run = session.get(TrainingRun, run_id, with_for_update=True)
    if run is None or run.status != "queued":
        return None
    if run.not_before is not None and run.not_before > now:
        return None
    run.status = "running"
    run.attempts = (run.attempts or 0) + 1
    run.started_at = now
    run.heartbeat_at = now
    run.worker = worker[:200]
    run.celery_task_id = task_id
    run.progress = {"phase": "starting", "attempt": run.attempts}
    session.flush()
    log.info("run %s (project %s, %s) claimed by %s, attempt %d", run.id, run.project_id, run.trigger, worker,
             run.attempts)
    return ClaimedRun(run.id, run.project_id, run.attempts, run.trigger, bool(run.from_scratch))


def owned_run(session: Session, claimed: ClaimedRun) -> TrainingRun | None:
    """The run row, locked, if this claim still owns it (running, same attempt)."""
    run = session.get(TrainingRun, claimed.run_id, with_for_update=True)
    if run is None or run.status != "running" or run.attempts != claimed.attempt:
        return None
    return run


def finish_run(
    session: Session,
    run: TrainingRun,
    status: str,
    *,
    error: str | None = None,
    model_version_id: int | None = None,
    settings: Settings | None = None,
    now: dt.datetime | None = None,
) -> TrainingRun | None:
    """End ``run`` (succeeded/failed/cancelled) and start what is due next; returns that run.

    A pending request (``project.retrain_pending``) becomes a 'manual' run at once; otherwise,
    given ``settings``, the annotation count is taken again against the newest snapshot.
    """
    now = now or utcnow()
    run.status = status
    run.finished_at = now
    run.error = error[:ERROR_TEXT_LIMIT] if error else None
    if model_version_id is not None:
        run.model_version_id = model_version_id
    run.progress = {**(run.progress or {}), "phase": status}
    session.flush()  # frees the project's single active-run slot
    log.info("run %s %s%s", run.id, status, f": {error}" if error else "")
    project = session.get(Project, run.project_id)
    if project is None:
        return None
    if project.retrain_pending:
        project.retrain_pending = False
        session.flush()
        follow_up = request_training(session, project, "manual", now=now)
        if follow_up is not None:
            follow_up.progress = {"phase": "queued", "follow_up_of": run.id}
        return follow_up
    if settings is not None and status == "succeeded":
        return maybe_request_retrain(session, project, settings, now=now)
    return None


# -- executing a run -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelledImage:
    image_id: int
    mask_version_id: int
    image_key: str
    mask_key: str


@dataclass(frozen=True)
class TrainingPlan:
    """Everything a run reads from the database, fixed at its start (the snapshot)."""

    run_id: int
    project_id: int
    classes: tuple[str, ...]
    train: tuple[LabelledImage, ...]
    val: tuple[LabelledImage, ...]
    max_minutes: float
    parent_id: int | None
    parent_uid: str | None
    parent_checkpoint_key: str | None
    parent_sha256: str | None
    from_scratch: bool


@dataclass(frozen=True)
class RunOutcome:
    run_id: int
    status: str  # succeeded | failed | lost (another attempt owns the run now)
    model_version_uid: str | None = None
    promoted: bool = False
    gate_reason: str | None = None
    error: str | None = None
    device: str | None = None
    follow_up_run_id: int | None = None
    project_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class RunLost(SonosegError):
    """This worker no longer owns the run (it was reaped and re-queued, or cancelled)."""


def labelled_images(session: Session, project_id: int, split: str) -> tuple[LabelledImage, ...]:
    rows = session.execute(
        select(Image.id, MaskVersion.id, Image.blob_key, MaskVersion.blob_key)
        .join(MaskVersion, (MaskVersion.image_id == Image.id) & MaskVersion.is_current)
        .where(Image.project_id == project_id, Image.split == split)
        .order_by(Image.id)
    ).all()
    return tuple(LabelledImage(*row) for row in rows)


def plan_run(session: Session, claimed: ClaimedRun, settings: Settings) -> TrainingPlan:
    """Snapshot the current training and validation labels and the model to start from."""
    project = session.get(Project, claimed.project_id)
    if project is None:
        raise NotFound(f"project {claimed.project_id} of run {claimed.run_id} is gone")
    serving = versions.serving_version(session, project.id)
    return TrainingPlan(
        run_id=claimed.run_id,
        project_id=project.id,
        classes=tuple(project.class_names),
        train=labelled_images(session, project.id, "train"),
        val=labelled_images(session, project.id, "val"),
        max_minutes=policy_for(project, settings).max_minutes,
        parent_id=serving.id if serving else None,
        parent_uid=serving.uid if serving else None,
        parent_checkpoint_key=serving.checkpoint_key if serving else None,
        parent_sha256=serving.checkpoint_sha256 if serving else None,
        from_scratch=claimed.from_scratch or serving is None,
    )


class Heartbeat:
    """Keeps ``training_run.heartbeat_at`` fresh from a background thread while a run executes,
    writing the latest progress with it; notices when the claim was lost.

    A thread rather than a per-epoch write: one CPU epoch can take minutes, longer than the
    stale-run cutoff. Every write is conditional on the claim (status running, same attempt).
    """

    def __init__(self, factory: SessionFactory, claimed: ClaimedRun, interval_seconds: float) -> None:
        self._factory = factory
        self._claimed = claimed
        self._interval = max(0.2, interval_seconds)
        self._progress: dict[str, Any] = {"phase": "starting", "attempt": claimed.attempt}
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-run-{claimed.run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def report(self, **progress: Any) -> None:
        with self._lock:
            self._progress = {**self._progress, **progress}

    @property
    def progress(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._progress)

    def lost(self) -> bool:
        return self._lost.is_set()

    def beat(self) -> bool:
        """One conditional write; False (and :meth:`lost` from then on) when the claim is gone."""
        try:
            with unit_of_work(self._factory) as session:
                result = session.execute(
                    update(TrainingRun)
                    .where(TrainingRun.id == self._claimed.run_id, TrainingRun.status == "running",
                           TrainingRun.attempts == self._claimed.attempt)
                    .values(heartbeat_at=utcnow(), progress=_json_safe(self.progress))
                )
                owned = bool(result.rowcount == 1)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a database hiccup must not kill training; the next beat retries
            log.warning("run %s: heartbeat write failed", self._claimed.run_id, exc_info=True)
            return True
        if not owned:
            log.warning("run %s: attempt %d no longer owns the run; stopping", self._claimed.run_id,
                        self._claimed.attempt)
            self._lost.set()
        return owned

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            if not self.beat():
                return


def load_pairs(store: BlobStore, items: Sequence[LabelledImage]) -> list[tuple[NDArray[Any], NDArray[Any]]]:
    from backend.imaging.io import decode_png_bytes

    pairs = []
    for item in items:
        image = decode_png_bytes(store.get_bytes(item.image_key))
        mask = decode_png_bytes(store.get_bytes(item.mask_key))
        pairs.append((image, mask.astype("int64")))
    return pairs


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA (or MPS) out of memory: torch raises a RuntimeError subclass saying so."""
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def describe_device(device_setting: str) -> str:
    """What a run trains on, for ``training_run.device``: e.g. ``cuda (mamba-ssm kernels)``."""
    from backend.model.device import resolve_device
    from backend.model.scan import available_backends

    device = resolve_device(device_setting)
    if device.type == "cuda":
        kernels = "mamba-ssm kernels" if "cuda" in available_backends() else "torch scan"
        return f"{device} ({kernels})"
    return str(device)


def train_with_fallbacks(
    plan: TrainingPlan,
    settings: Settings,
    data: Any,
    init_checkpoint: Path | None,
    *,
    budget_minutes: float,
    on_progress: Callable[[Progress], None],
    should_stop: Callable[[], bool],
) -> TrainResult:
    """Train with the engine; on CUDA out-of-memory halve the batch and retry (down to 1), and
    fine-tune from scratch when the serving checkpoint no longer fits the project's classes."""
    from backend.model.train import train
    from backend.model.train_config import training_preset

    config = training_preset(settings.model_preset).replace(device=settings.device, max_minutes=budget_minutes)
    started = utcnow()
    while True:
        elapsed_min = (utcnow() - started).total_seconds() / 60
        remaining = max(budget_minutes - elapsed_min, 0.05)
        try:
            return train(config.replace(max_minutes=remaining), data, on_progress=on_progress,
                         init_checkpoint=init_checkpoint, should_stop=should_stop)
        except CheckpointError as exc:
            if init_checkpoint is None:
                raise
            log.warning("run %s: cannot fine-tune from %s (%s); training from scratch", plan.run_id,
                        plan.parent_uid, exc.message)
            init_checkpoint = None
        except RuntimeError as exc:
            if not is_out_of_memory(exc) or config.batch_size <= 1:
                raise
            smaller = max(1, config.batch_size // 2)
            log.warning("run %s: out of memory with batch %d; retrying with batch %d", plan.run_id,
                        config.batch_size, smaller)
            config = config.replace(batch_size=smaller)


def evaluate_checkpoint(
    checkpoint: Checkpoint, items: Sequence[LabelledImage], pairs: Sequence[tuple[NDArray[Any], NDArray[Any]]],
    class_names: Sequence[str], *, uid: str, device: str,
) -> gate.Evaluation:
    """Score one model on the labelled images at natural size (the engine's metrics)."""
    from backend.model.metrics import evaluate_masks
    from backend.model.predict import Predictor

    predictor = Predictor(checkpoint, device=device)
    preds = [r.mask for r in predictor.predict([image for image, _ in pairs])]
    report = evaluate_masks(preds, [mask for _, mask in pairs], ("background", *class_names))
    metrics = gate.gate_metrics(report.mDice, report.mIoU, report.per_image_dice)
    return gate.Evaluation(uid, tuple(item.mask_version_id for item in items), metrics, report=report.to_dict())


def run_dirs_root(settings: Settings) -> Path:
    """Scratch space of executing runs (checkpoints before they enter the store)."""
    return settings.data_dir / "tmp" / "runs"


def sweep_run_dirs(settings: Settings, running_run_ids: set[int]) -> list[Path]:
    """Delete scratch dirs of runs not running any more (left by a killed worker); returns them."""
    root = run_dirs_root(settings)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for path in root.glob("run-*-*"):
        try:
            run_id = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if run_id not in running_run_ids:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@dataclass
class _Staged:
    """Files this run created: removed again unless registered."""

    tmp_dir: Path
    blob_keys: list[str] = field(default_factory=list)


def execute_run(
    factory: SessionFactory,
    store: BlobStore,
    settings: Settings,
    claimed: ClaimedRun,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    reconcile: Callable[[int], None] | None = None,
) -> RunOutcome:
    """Run a claimed run to its end: snapshot, train, checkpoint, evaluate, register, gate.

    ``reconcile(project_id)`` pulls missed annotations from Label Studio first (a failure there
    is logged, not fatal). ``on_progress`` receives the progress dict (Celery task state). Every
    failure ends the run 'failed' with its error text; the serving model is never touched then.
    """
    runs_dir = run_dirs_root(settings)
    runs_dir.mkdir(parents=True, exist_ok=True)
    staged = _Staged(Path(tempfile.mkdtemp(prefix=f"run-{claimed.run_id}-", dir=runs_dir)))
    device: str | None = None
    with Heartbeat(factory, claimed, settings.train_heartbeat_seconds) as heartbeat:

        def report(**progress: Any) -> None:
            heartbeat.report(**progress)
            if on_progress is not None:
                on_progress(heartbeat.progress)

        try:
            if reconcile is not None:
                report(phase="reconciling")
                try:
                    reconcile(claimed.project_id)
                except SonosegError as exc:
                    log.warning("run %s: reconciliation with Label Studio failed, training on what is recorded: %s",
                                claimed.run_id, exc.message)
            with unit_of_work(factory) as session:
                plan = plan_run(session, claimed, settings)
            device = describe_device(settings.device)
            _record_start(factory, claimed, device)
            outcome = _train_and_register(factory, store, settings, claimed, plan, staged, heartbeat, report, device)
        except RunLost as exc:
            log.warning("run %s: %s", claimed.run_id, exc.message)
            outcome = RunOutcome(claimed.run_id, "lost", error=exc.message, device=device,
                                 project_id=claimed.project_id)
        except Exception as exc:  # noqa: BLE001 - any failure ends the run 'failed', with its text
            if isinstance(exc, SonosegError):
                message = exc.message
                log.warning("run %s failed: %s", claimed.run_id, message)
            else:
                message = f"{type(exc).__name__}: {exc}"
                log.exception("run %s failed", claimed.run_id)
            outcome = _fail(factory, settings, claimed, message, device, heartbeat.progress)
        finally:
            for key in staged.blob_keys:
                store.delete(key)
            shutil.rmtree(staged.tmp_dir, ignore_errors=True)
    return outcome


def _record_start(factory: SessionFactory, claimed: ClaimedRun, device: str) -> None:
    with unit_of_work(factory) as session:
        run = owned_run(session, claimed)
        if run is None:
            raise RunLost(f"attempt {claimed.attempt} lost the run before training")
        run.device = device[:64]


def _fail(
    factory: SessionFactory, settings: Settings, claimed: ClaimedRun, message: str, device: str | None,
    progress: dict[str, Any],
) -> RunOutcome:
    with unit_of_work(factory) as session:
        run = owned_run(session, claimed)
        if run is None:
            return RunOutcome(claimed.run_id, "lost", error=message, device=device, project_id=claimed.project_id)
        run.progress = cast(dict[str, Any], _json_safe(progress))
        follow_up = finish_run(session, run, "failed", error=message, settings=settings)
        return RunOutcome(claimed.run_id, "failed", error=message, device=device,
                          follow_up_run_id=follow_up.id if follow_up else None, project_id=claimed.project_id)


def _train_and_register(
    factory: SessionFactory,
    store: BlobStore,
    settings: Settings,
    claimed: ClaimedRun,
    plan: TrainingPlan,
    staged: _Staged,
    heartbeat: Heartbeat,
    report: Callable[..., None],
    device: str,
) -> RunOutcome:
    from backend.model.checkpoint import load_checkpoint
    from backend.model.data import TrainData

    if not plan.train:
        raise InvalidInput(f"project {plan.project_id} has no labelled training image yet: nothing to train on")
    started = utcnow()
    report(phase="loading", n_train=len(plan.train), n_val=len(plan.val), device=device)
    train_pairs = load_pairs(store, plan.train)
    val_pairs = load_pairs(store, plan.val)
    init_path: Path | None = None
    if not plan.from_scratch and plan.parent_checkpoint_key:
        init_path = store.local_path(plan.parent_checkpoint_key)
        if plan.parent_sha256 and sha256_file(init_path) != plan.parent_sha256:
            raise CheckpointError(f"the serving checkpoint of {plan.parent_uid} changed on disk (sha256 mismatch)")
    data = TrainData(pairs=train_pairs, classes=plan.classes, val_pairs=val_pairs or None)

    def on_epoch(p: Progress) -> None:
        report(phase="training", epoch=p.epoch, step=p.step, loss=round(p.loss, 5), val_dice=p.val_dice,
               best_val_dice=p.best_val_dice, fraction=round(p.fraction, 3), elapsed_s=round(p.elapsed_s, 1))

    used_minutes = (utcnow() - started).total_seconds() / 60
    report(phase="training")
    result = train_with_fallbacks(
        plan, settings, data, init_path, budget_minutes=max(plan.max_minutes - used_minutes, 0.05),
        on_progress=on_epoch, should_stop=heartbeat.lost,
    )
    if heartbeat.lost():
        raise RunLost(f"attempt {claimed.attempt} lost the run during training")

    report(phase="saving", stop_reason=result.stop_reason, epochs=result.epochs)
    tmp = staged.tmp_dir / "model.safetensors"
    digest = result.save(tmp)
    blob = store.put_file("checkpoints", tmp, ".safetensors")
    if blob.created:
        staged.blob_keys.append(blob.key)
    if blob.sha256 != digest:
        raise CheckpointError(f"checkpoint sha256 changed while storing it ({digest} -> {blob.sha256})")
    candidate_ckpt = load_checkpoint(store.local_path(blob.key), expected_sha256=digest)

    report(phase="evaluating")
    candidate_eval: gate.Evaluation | None = None
    serving_eval: gate.Evaluation | None = None
    if plan.val:
        candidate_eval = evaluate_checkpoint(candidate_ckpt, plan.val, val_pairs, plan.classes,
                                             uid="candidate", device=settings.device)
    if plan.parent_checkpoint_key and plan.val:
        serving_ckpt = load_checkpoint(store.local_path(plan.parent_checkpoint_key), expected_sha256=plan.parent_sha256)
        serving_eval = evaluate_checkpoint(serving_ckpt, plan.val, val_pairs, plan.classes,
                                           uid=plan.parent_uid or "serving", device=settings.device)
    if heartbeat.lost():
        raise RunLost(f"attempt {claimed.attempt} lost the run during evaluation")

    report(phase="registering")
    return _register(factory, settings, claimed, plan, result, blob.key, digest, candidate_eval, serving_eval,
                     staged, device, heartbeat.progress)


def _metrics_of(result: TrainResult, evaluation: gate.Evaluation | None, plan: TrainingPlan) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "n_train": len(plan.train),
        "n_val": len(plan.val),
        "val_mask_versions": [item.mask_version_id for item in plan.val],
        "train_val_fg_dice": result.best_val_dice,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
        "train_seconds": round(result.elapsed_s, 1),
        "batch_size": result.config.batch_size,
        "fine_tuned_from": plan.parent_uid if result.init_sha256 else None,
    }
    if evaluation is not None:
        metrics.update(evaluation.metrics)
        metrics["val_report"] = evaluation.report
    return cast(dict[str, Any], _json_safe(metrics))


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON (PostgreSQL's JSONB refuses them): store None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _register(
    factory: SessionFactory,
    settings: Settings,
    claimed: ClaimedRun,
    plan: TrainingPlan,
    result: TrainResult,
    checkpoint_key: str,
    digest: str,
    candidate_eval: gate.Evaluation | None,
    serving_eval: gate.Evaluation | None,
    staged: _Staged,
    device: str,
    progress: dict[str, Any],
) -> RunOutcome:
    """One transaction: the immutable version with its snapshot, the gate, the run's end."""
    with unit_of_work(factory) as session:
        run = owned_run(session, claimed)
        if run is None:
            raise RunLost(f"attempt {claimed.attempt} lost the run before registering its model")
        run.progress = cast(dict[str, Any], _json_safe(progress))
        project = session.get_one(Project, plan.project_id)
        uid = versions.new_uid(project)
        train_ids = [item.mask_version_id for item in plan.train]
        snapshot = list(session.scalars(select(MaskVersion).where(MaskVersion.id.in_(train_ids))))
        version = ModelVersion(
            project_id=project.id,
            uid=uid,
            parent_id=plan.parent_id if result.init_sha256 else None,  # the model it was fine-tuned from
            status="candidate",
            arch=result.spec.arch,
            metrics=_metrics_of(result, candidate_eval, plan),
            checkpoint_key=checkpoint_key,
            checkpoint_sha256=digest,
            training_masks=snapshot,
        )
        session.add(version)
        session.flush()
        candidate = dataclasses.replace(candidate_eval, model_uid=uid) if candidate_eval else None
        try:
            decision = gate.decide(candidate, serving_eval, metric=settings.gate_metric, margin=settings.gate_margin)
        except InvalidInput as exc:
            decision = gate.GateDecision(False, f"gate could not compare: {exc.message}", settings.gate_metric,
                                         None, None)
        current = versions.serving_version(session, project.id)
        if decision.promote and current is not None and current.id != plan.parent_id:
            decision = gate.GateDecision(
                False, f"the serving model changed during training ({plan.parent_uid} -> {current.uid}): "
                "kept as a candidate", decision.metric, decision.candidate_score, decision.serving_score)
        if decision.promote:
            versions.promote(session, version, reason=f"gate: {decision.reason}")
        else:
            version.gate_reason = decision.reason
        follow_up = finish_run(session, run, "succeeded", model_version_id=version.id, settings=settings)
        follow_up_id = follow_up.id if follow_up else None
    staged.blob_keys.clear()  # committed: the checkpoint belongs to the version now
    log.info("run %s registered %s (%s): %s", claimed.run_id, uid, "serving" if decision.promote else "candidate",
             decision.reason)
    return RunOutcome(
        run_id=claimed.run_id,
        status="succeeded",
        model_version_uid=uid,
        promoted=decision.promote,
        gate_reason=decision.reason,
        device=device,
        follow_up_run_id=follow_up_id,
        project_id=plan.project_id,
    )
