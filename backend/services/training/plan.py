"""What a run trains on and how: its snapshot (the plan), loading the labelled pairs, training
with fallbacks and scoring checkpoints. Torch loads only inside these functions."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.base import utcnow
from backend.db.models import Image, MaskVersion, Project
from backend.errors import CheckpointError, NotFound
from backend.services import gate, versions
from backend.services.training.policy import policy_for
from backend.services.training.queue import ClaimedRun
from backend.settings import Settings
from backend.storage.blobs import BlobStore

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from backend.model.checkpoint import Checkpoint
    from backend.model.train import Progress, TrainResult

log = logging.getLogger(__name__)


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
            return train(
                config.replace(max_minutes=remaining),
                data,
                on_progress=on_progress,
                init_checkpoint=init_checkpoint,
                should_stop=should_stop,
            )
        except CheckpointError as exc:
            if init_checkpoint is None:
                raise
            log.warning(
                "run %s: cannot fine-tune from %s (%s); training from scratch",
                plan.run_id,
                plan.parent_uid,
                exc.message,
            )
            init_checkpoint = None
        except RuntimeError as exc:
            if not is_out_of_memory(exc) or config.batch_size <= 1:
                raise
            smaller = max(1, config.batch_size // 2)
            log.warning(
                "run %s: out of memory with batch %d; retrying with batch %d", plan.run_id, config.batch_size, smaller
            )
            config = config.replace(batch_size=smaller)


def evaluate_checkpoint(
    checkpoint: Checkpoint,
    items: Sequence[LabelledImage],
    pairs: Sequence[tuple[NDArray[Any], NDArray[Any]]],
    class_names: Sequence[str],
    *,
    uid: str,
    device: str,
) -> gate.Evaluation:
    """Score one model on the labelled images at natural size (the engine's metrics)."""
    from backend.model.metrics import evaluate_masks
    from backend.model.predict import Predictor

    predictor = Predictor(checkpoint, device=device)
    preds = [r.mask for r in predictor.predict([image for image, _ in pairs])]
    report = evaluate_masks(preds, [mask for _, mask in pairs], ("background", *class_names))
    metrics = gate.gate_metrics(report.mDice, report.mIoU, report.per_image_dice)
    return gate.Evaluation(uid, tuple(item.mask_version_id for item in items), metrics, report=report.to_dict())
