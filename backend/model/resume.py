"""The resume-state file: everything needed to continue an interrupted run where it stopped.

Written atomically at the end of every epoch (so a crash leaves the previous epoch's state, never a
torn file) and read with ``torch.load(weights_only=True)``, which refuses pickled code. It holds the
network, optimiser and grad-scaler states, the best weights so far, counters, history, the data
split and every random generator's state, so a resumed run continues the same sample stream.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backend.errors import CheckpointError
from backend.storage.atomic import write_atomic

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class ResumeState:
    spec_json: str
    config_json: str
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    best_state: dict[str, torch.Tensor] | None
    best_score: float
    best_epoch: int
    epochs_since_best: int
    epoch: int
    step: int
    elapsed: float
    history: list[dict[str, Any]]
    train_indices: list[int]
    val_indices: list[int]
    numpy_rng: dict[str, Any]
    torch_generator: torch.Tensor
    torch_rng: torch.Tensor
    fine_tune: bool = False  # the run started from a checkpoint (its schedule is the fine-tune one)


def save_resume_state(path: Path, state: ResumeState) -> None:
    payload = {"version": STATE_VERSION, **state.__dict__}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())
    log.debug("resume state written: %s (epoch %d)", path, state.epoch)


def load_resume_state(path: Path) -> ResumeState:
    """Raises :class:`CheckpointError` when the file is unreadable or from another version."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"resume state {path} does not exist") from exc
    except Exception as exc:  # torch raises many types for a damaged file; all mean "unusable"
        raise CheckpointError(f"resume state {path} is unreadable: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("version") != STATE_VERSION:
        raise CheckpointError(f"resume state {path} is not a version-{STATE_VERSION} sonoseg resume file")
    payload.pop("version")
    try:
        return ResumeState(**payload)
    except TypeError as exc:
        raise CheckpointError(f"resume state {path} is incomplete: {exc}") from exc
