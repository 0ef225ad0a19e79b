"""Models for tests: the one tiny network spec, tiny checkpoints, model versions, a stand-in model.

- :func:`tiny_spec`: the tiny spec every test builds networks from. Its defaults are a 3-stage
  U-Mamba with 4-16 channels and 16 x 16 patches (seconds on a CPU); callers change what they need
  by keyword. :data:`WORKER_TINY` and :data:`FRAME_512_TINY` are the two named sets of changes that
  several tests share (the workers' preset; a network for 512 x 512 frames).
- :func:`save_tiny_checkpoint`, :func:`train_tiny_model`: checkpoints of a tiny network.
- :func:`record_version`, :func:`register_model`: model versions made the way sonoseg makes them,
  with ``backend.services.versions.register_version`` (and ``promote`` to serve), never by hand.
- :class:`ThresholdModel`, :func:`fake_loader`: a deterministic stand-in for the network, served by
  the real ModelHolder.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from backend.db.models import MaskVersion, ModelVersion, Project
    from backend.db.session import SessionFactory
    from backend.model.spec import ModelSpec
    from backend.services.serving import ServedModel, ServingRow
    from backend.storage.blobs import BlobStore

CLASSES = ("Nerve", "Vessel")

# The fields of tiny_spec() besides ``classes``: 3 stages, 4-16 channels, 16 x 16 patches.
TINY: dict[str, Any] = {
    "arch": "umamba_bot_2d",
    "features": (4, 8, 16),
    "encoder_blocks": (1, 1, 1),
    "decoder_blocks": (1, 1),
    "patch_size": (16, 16),
}
# The workers' preset (tests/support/processes.py, tests/test_retrain_run.py, tests/test_workers_e2e.py):
# a residual U-Net on frames scaled by 1/4; a training step takes milliseconds.
WORKER_TINY: dict[str, Any] = {
    "arch": "resunet_2d",
    "patch_size": (32, 32),
    "input_scale": 0.25,
    "full_resolution_skip": True,
}
# A ~120k-parameter residual U-Net on frames scaled to 1/8 (512 -> 64), for the 512 x 512 frames of
# tests.support.frames.dataset_pairs: trains to overlap its labels within seconds on a CPU.
FRAME_512_TINY: dict[str, Any] = {
    "arch": "resunet_2d",
    "features": (8, 16, 32, 64),
    "encoder_blocks": (1, 1, 1, 1),
    "decoder_blocks": (1, 1, 1),
    "patch_size": (64, 64),
    "input_scale": 0.125,
    "full_resolution_skip": True,
}


def tiny_spec(classes: Sequence[str] = CLASSES, *, arch: str = TINY["arch"], **changes: Any) -> ModelSpec:
    """The tiny spec (:data:`TINY`) for ``classes``, with ``arch`` and any other ModelSpec field changed.

    ``tiny_spec(**WORKER_TINY)`` is the workers' preset, ``tiny_spec(**FRAME_512_TINY)`` the network
    for 512 x 512 frames.
    """
    from backend.model.spec import ModelSpec

    fields: dict[str, Any] = {**TINY, "arch": arch, **changes}
    return ModelSpec(classes=tuple(classes), **fields)


# -- checkpoints -------------------------------------------------------------------------------------
def save_tiny_checkpoint(
    path: Path, classes: Sequence[str] = CLASSES, seed: int = 0, *, spec: ModelSpec | None = None
) -> str:
    """An untrained network's checkpoint (``spec``, by default ``tiny_spec(classes, **FRAME_512_TINY)``,
    weights drawn with torch seed ``seed``); returns its sha256."""
    import torch

    from backend.model.checkpoint import Checkpoint, save_checkpoint
    from backend.model.networks import build_model

    torch.manual_seed(seed)
    spec = spec or tiny_spec(classes, **FRAME_512_TINY)
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
    result = train(config, TrainData(pairs=pairs, classes=CLASSES), init_checkpoint=init)
    return result.save(path)


# -- model versions -----------------------------------------------------------------------------------
class RegisteredVersion(NamedTuple):
    """A registered model version: its row id and the uid Label Studio sees as ``model_version``."""

    id: int
    uid: str


def record_version(
    session: Session,
    project: Project,
    *,
    serve: bool = True,
    arch: str = "resunet_2d",
    checkpoint_key: str | None = None,
    checkpoint_sha256: str | None = None,
    training_masks: Sequence[MaskVersion] = (),
) -> ModelVersion:
    """A version of ``project`` made by ``versions.register_version`` and, when ``serve``, made to
    serve by ``versions.promote`` (retiring the previous one, in the serving audit log).

    Without ``checkpoint_key`` the version names a checkpoint that is not in the store: enough for
    a stand-in loader (:func:`fake_loader`), which never reads it.
    """
    from backend.services import versions

    version = versions.register_version(
        session,
        project,
        arch=arch,
        checkpoint_key=checkpoint_key or f"checkpoints/absent-{secrets.token_hex(6)}.safetensors",
        checkpoint_sha256=checkpoint_sha256 or "0" * 64,
        training_masks=training_masks,
    )
    if serve:
        versions.promote(session, version, reason="test")
    return version


def register_model(
    factory: SessionFactory, store: BlobStore, project_id: int, checkpoint: Path, *, serve: bool = True
) -> RegisteredVersion:
    """Put ``checkpoint`` in the store and register a version of it (serving, unless ``serve`` is false)."""
    from backend.db.models import Project
    from backend.db.session import unit_of_work
    from backend.model.checkpoint import load_checkpoint

    arch = load_checkpoint(checkpoint).spec.arch
    blob = store.put_file("checkpoints", checkpoint, ".safetensors")
    with unit_of_work(factory) as session:
        version = record_version(
            session,
            session.get_one(Project, project_id),
            serve=serve,
            arch=arch,
            checkpoint_key=blob.key,
            checkpoint_sha256=blob.sha256,
        )
        return RegisteredVersion(int(version.id), version.uid)


# -- a stand-in model -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """What the stand-in model predicts for one image: the fields of ``backend.model.predict.PredictionResult``
    that serving reads."""

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
    """A ModelHolder loader serving ``model`` for any version; uids in ``fail`` raise, as a corrupt checkpoint.

    ``loads`` records the uid of every load. ``fail`` is read at load time, so a test may add the
    uid of a version it registers afterwards.
    """
    from backend.errors import CheckpointError
    from backend.services.serving import ServedModel

    def load(row: ServingRow) -> ServedModel:
        if row.uid in fail:
            raise CheckpointError(f"checkpoint of {row.uid} is corrupt")
        loads.append(row.uid)
        return ServedModel(row.uid, row.model_version_id, row.project_id, CLASSES, model)

    return load
