"""The tiny U-Mamba spec the model tests share: 3 stages, 4-16 channels, 16x16 patches (seconds on CPU)."""

from __future__ import annotations

import dataclasses

from backend.model.spec import ModelSpec

TINY_SPEC = ModelSpec(
    arch="umamba_bot_2d",
    classes=("Nerve", "Vessel"),
    features=(4, 8, 16),
    encoder_blocks=(1, 1, 1),
    decoder_blocks=(1, 1),
    patch_size=(16, 16),
)


def tiny_spec(**changes: object) -> ModelSpec:
    """``TINY_SPEC`` with some fields changed."""
    return dataclasses.replace(TINY_SPEC, **changes)  # type: ignore[arg-type]
