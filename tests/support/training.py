"""Short CPU training runs for the model engine's tests: the run's config and the tiny presets it trains.

- :func:`cpu_config`: a ``TrainConfig`` for a few seconds on the CPU (AdamW at 3e-3, a quarter of the
  frames held out for validation); callers give the length of the run and any other change.
- :func:`use_tiny_preset`: registers a preset name, for one test, as :func:`tests.support.models.tiny_spec`
  with 32 x 32 patches and a full-resolution skip (and any other change).
- :func:`two_stage_resunet`: the explicit two-stage residual U-Net the validator and spec tests build.

Modules here import ``backend.model`` lazily (torch), as the rest of ``tests.support`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tests.support.models import tiny_spec

if TYPE_CHECKING:
    import pytest

    from backend.model.spec import ModelSpec
    from backend.model.train_config import TrainConfig


def cpu_config(preset: str, *, epochs: int, iterations_per_epoch: int, batch_size: int, **changes: Any) -> TrainConfig:
    """A run of ``preset`` on the CPU with AdamW at a learning rate of 3e-3 and ``val_fraction=0.25``;
    ``changes`` set any other ``TrainConfig`` field (or override these)."""
    from backend.model.train_config import TrainConfig

    fields: dict[str, Any] = {
        "optimizer": "adamw",
        "learning_rate": 3e-3,
        "device": "cpu",
        "val_fraction": 0.25,
        **changes,
    }
    return TrainConfig(
        preset=preset, epochs=epochs, iterations_per_epoch=iterations_per_epoch, batch_size=batch_size, **fields
    )


def use_tiny_preset(monkeypatch: pytest.MonkeyPatch, name: str, **changes: Any) -> None:
    """Make ``name`` a preset (until the test ends) building ``tiny_spec(classes, ...)`` with 32 x 32
    patches, ``full_resolution_skip=True`` and ``changes`` (``arch``, ``features``, blocks, ...)."""
    from backend.model import spec as spec_module

    fields: dict[str, Any] = {"patch_size": (32, 32), "full_resolution_skip": True, **changes}

    def preset(classes: tuple[str, ...]) -> ModelSpec:
        return tiny_spec(classes, **fields)

    monkeypatch.setitem(spec_module.PRESETS, name, preset)


def two_stage_resunet(classes: Sequence[str]) -> ModelSpec:
    """A two-stage residual U-Net (4 and 8 channels) on 32 x 32 patches, with no full-resolution skip."""
    return tiny_spec(
        classes, arch="resunet_2d", features=(4, 8), encoder_blocks=(1, 1), decoder_blocks=(1,), patch_size=(32, 32)
    )
