"""Executing a claimed run: snapshot, train, checkpoint, evaluate, register, gate.

Nothing is registered before the checkpoint is completely in the store, and the version, the
gate decision and the run's end are one transaction that first checks the claim still owns the
run, so a crash or a lost claim never leaves a half-written model version or an orphan blob.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import select

from backend.db.base import json_safe, utcnow
from backend.db.models import MaskVersion, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import CheckpointError, InvalidInput, SonosegError
from backend.services import gate, versions
from backend.services.training.plan import (
    TrainingPlan,
    describe_device,
    evaluate_checkpoint,
    load_pairs,
    plan_run,
    train_with_fallbacks,
)
from backend.services.training.queue import (
    ClaimedRun,
    Heartbeat,
    finish_run,
    owned_run,
)
from backend.settings import Settings
from backend.storage.blobs import BlobStore, sha256_file

if TYPE_CHECKING:
    from backend.model.train import Progress, TrainResult

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class RunContext:
    """What every step of one run's execution works with: one value instead of long parameter lists."""

    factory: SessionFactory
    store: BlobStore
    settings: Settings
    claimed: ClaimedRun
    staged: _Staged
    heartbeat: Heartbeat
    report: Callable[..., None]
    device: str | None = None


@dataclass(frozen=True)
class Evaluations:
    """The candidate's and the serving model's scores on the same validation labels (None: no labels)."""

    candidate: gate.Evaluation | None
    serving: gate.Evaluation | None


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
                    log.warning(
                        "run %s: reconciliation with Label Studio failed, training on what is recorded: %s",
                        claimed.run_id,
                        exc.message,
                    )
            with unit_of_work(factory) as session:
                plan = plan_run(session, claimed, settings)
            device = describe_device(settings.device)
            _record_start(factory, claimed, device)
            ctx = RunContext(factory, store, settings, claimed, staged, heartbeat, report, device)
            outcome = _train_and_register(ctx, plan)
        except RunLost as exc:
            log.warning("run %s: %s", claimed.run_id, exc.message)
            outcome = RunOutcome(
                claimed.run_id, "lost", error=exc.message, device=device, project_id=claimed.project_id
            )
        except Exception as exc:
            if isinstance(exc, SonosegError):
                message = exc.message
                log.warning("run %s failed: %s", claimed.run_id, message)
            else:
                message = f"{type(exc).__name__}: {exc}"
                log.exception("run %s failed", claimed.run_id)
            ctx = RunContext(factory, store, settings, claimed, staged, heartbeat, report, device)
            outcome = _fail(ctx, message)
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


def _fail(ctx: RunContext, message: str) -> RunOutcome:
    claimed, device = ctx.claimed, ctx.device
    with unit_of_work(ctx.factory) as session:
        run = owned_run(session, claimed)
        if run is None:
            return RunOutcome(claimed.run_id, "lost", error=message, device=device, project_id=claimed.project_id)
        run.progress = cast(dict[str, Any], json_safe(ctx.heartbeat.progress))
        follow_up = finish_run(session, run, "failed", error=message, settings=ctx.settings)
        return RunOutcome(
            claimed.run_id,
            "failed",
            error=message,
            device=device,
            follow_up_run_id=follow_up.id if follow_up else None,
            project_id=claimed.project_id,
        )


def _train_and_register(ctx: RunContext, plan: TrainingPlan) -> RunOutcome:
    """Load the snapshot, train within the budget, store the checkpoint, evaluate, register."""
    from backend.model.checkpoint import load_checkpoint
    from backend.model.data import TrainData

    store, settings, claimed, staged, heartbeat, report = (
        ctx.store,
        ctx.settings,
        ctx.claimed,
        ctx.staged,
        ctx.heartbeat,
        ctx.report,
    )
    if not plan.train:
        raise InvalidInput(f"project {plan.project_id} has no labelled training image yet: nothing to train on")
    started = utcnow()
    report(phase="loading", n_train=len(plan.train), n_val=len(plan.val), device=ctx.device)
    train_pairs = load_pairs(store, plan.train)
    val_pairs = load_pairs(store, plan.val)
    init_path: Path | None = None
    if not plan.from_scratch and plan.parent_checkpoint_key:
        init_path = store.local_path(plan.parent_checkpoint_key)
        if plan.parent_sha256 and sha256_file(init_path) != plan.parent_sha256:
            raise CheckpointError(f"the serving checkpoint of {plan.parent_uid} changed on disk (sha256 mismatch)")
    data = TrainData(pairs=train_pairs, classes=plan.classes, val_pairs=val_pairs or None)

    def on_epoch(p: Progress) -> None:
        report(
            phase="training",
            epoch=p.epoch,
            step=p.step,
            loss=round(p.loss, 5),
            val_dice=p.val_dice,
            best_val_dice=p.best_val_dice,
            fraction=round(p.fraction, 3),
            elapsed_s=round(p.elapsed_s, 1),
        )

    used_minutes = (utcnow() - started).total_seconds() / 60
    report(phase="training")
    result = train_with_fallbacks(
        plan,
        settings,
        data,
        init_path,
        budget_minutes=max(plan.max_minutes - used_minutes, 0.05),
        on_progress=on_epoch,
        should_stop=heartbeat.lost,
    )
    if heartbeat.lost():
        raise RunLost(f"attempt {claimed.attempt} lost the run during training")

    report(
        phase="saving",
        stop_reason=result.stop_reason,
        epochs=result.epochs,
        images_per_second=round(result.images_per_second, 2),
        val_fraction=round(result.val_fraction, 4),
    )
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
        candidate_eval = evaluate_checkpoint(
            candidate_ckpt, plan.val, val_pairs, plan.classes, uid="candidate", device=settings.device
        )
    if plan.parent_checkpoint_key and plan.val:
        serving_ckpt = load_checkpoint(store.local_path(plan.parent_checkpoint_key), expected_sha256=plan.parent_sha256)
        serving_eval = evaluate_checkpoint(
            serving_ckpt, plan.val, val_pairs, plan.classes, uid=plan.parent_uid or "serving", device=settings.device
        )
    if heartbeat.lost():
        raise RunLost(f"attempt {claimed.attempt} lost the run during evaluation")

    report(phase="registering")
    return _register(ctx, plan, result, StoredCheckpoint(blob.key, digest), Evaluations(candidate_eval, serving_eval))


def _metrics_of(result: TrainResult, evaluation: gate.Evaluation | None, plan: TrainingPlan) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "n_train": len(plan.train),
        "n_val": len(plan.val),
        "val_mask_versions": [item.mask_version_id for item in plan.val],
        "train_val_fg_dice": result.best_val_dice,
        "epochs": result.epochs,
        "steps": result.steps,
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
        "train_seconds": round(result.elapsed_s, 1),
        "batch_size": result.config.batch_size,
        "fine_tuned_from": plan.parent_uid if result.init_sha256 else None,
        "images_per_second": round(result.images_per_second, 2),
        "val_seconds": round(result.val_seconds, 1),
        "val_fraction": round(result.val_fraction, 4),
        "plan": result.plan,
    }
    if evaluation is not None:
        metrics.update(evaluation.metrics)
        metrics["val_report"] = evaluation.report
    return cast(dict[str, Any], json_safe(metrics))


@dataclass(frozen=True)
class StoredCheckpoint:
    key: str
    sha256: str


def _register(
    ctx: RunContext, plan: TrainingPlan, result: TrainResult, checkpoint: StoredCheckpoint, evals: Evaluations
) -> RunOutcome:
    """One transaction: the immutable version with its snapshot, the gate, the run's end."""
    settings, claimed, candidate_eval, serving_eval = ctx.settings, ctx.claimed, evals.candidate, evals.serving
    progress = ctx.heartbeat.progress
    with unit_of_work(ctx.factory) as session:
        run = owned_run(session, claimed)
        if run is None:
            raise RunLost(f"attempt {claimed.attempt} lost the run before registering its model")
        run.progress = cast(dict[str, Any], json_safe(progress))
        project = session.get_one(Project, plan.project_id)
        train_ids = [item.mask_version_id for item in plan.train]
        snapshot = list(session.scalars(select(MaskVersion).where(MaskVersion.id.in_(train_ids))))
        version = versions.register_version(
            session,
            project,
            arch=result.spec.arch,
            checkpoint_key=checkpoint.key,
            checkpoint_sha256=checkpoint.sha256,
            metrics=_metrics_of(result, candidate_eval, plan),
            parent_id=plan.parent_id if result.init_sha256 else None,  # the model it was fine-tuned from
            training_masks=snapshot,
        )
        uid = version.uid
        candidate = dataclasses.replace(candidate_eval, model_uid=uid) if candidate_eval else None
        try:
            evidence = gate.TrainingEvidence(
                frames_seen=result.steps * result.config.batch_size, n_train=len(plan.train)
            )
            decision = gate.decide(
                candidate,
                serving_eval,
                metric=settings.gate_metric,
                margin=settings.gate_margin,
                evidence=evidence,
                min_first_score=settings.gate_min_dice,
            )
        except InvalidInput as exc:
            decision = gate.GateDecision(
                False, f"gate could not compare: {exc.message}", settings.gate_metric, None, None
            )
        current = versions.serving_version(session, project.id)
        if decision.promote and current is not None and current.id != plan.parent_id:
            decision = gate.GateDecision(
                False,
                f"the serving model changed during training ({plan.parent_uid} -> {current.uid}): kept as a candidate",
                decision.metric,
                decision.candidate_score,
                decision.serving_score,
            )
        if decision.promote:
            versions.promote(session, version, reason=f"gate: {decision.reason}")
        else:
            version.gate_reason = decision.reason
        follow_up = finish_run(session, run, "succeeded", model_version_id=version.id, settings=settings)
        follow_up_id = follow_up.id if follow_up else None
    ctx.staged.blob_keys.clear()  # committed: the checkpoint belongs to the version now
    log.info(
        "run %s registered %s (%s): %s",
        claimed.run_id,
        uid,
        "serving" if decision.promote else "candidate",
        decision.reason,
    )
    return RunOutcome(
        run_id=claimed.run_id,
        status="succeeded",
        model_version_uid=uid,
        promoted=decision.promote,
        gate_reason=decision.reason,
        device=ctx.device,
        follow_up_run_id=follow_up_id,
        project_id=plan.project_id,
    )
