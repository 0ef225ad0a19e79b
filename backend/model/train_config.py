"""Training hyper-parameters (:class:`TrainConfig`) and the recommended config per model preset.

GPU presets follow nnU-Net: SGD lr 0.01, Nesterov momentum 0.99, weight decay 3e-5, poly decay
(exponent 0.9), gradient clipping at 12, batch 12, 250 iterations x 1000 epochs, 33% foreground
oversampling, deep supervision, AMP. The CPU preset keeps the loss, deep supervision, clipping,
oversampling and augmentation, but trains whole 256x256 frames (after the 0.5 input scale) in small
batches for a wall-clock budget, with AdamW and CPU bfloat16 autocast where native.

Why AdamW on the CPU: with the same data (usgra-seg training images, 20% held out), seed, batch 4
and 120 steps (3 epochs of 40), the validation foreground Dice after epochs 1/2/3 was
0.256/0.366/0.416 with AdamW lr 2e-3 (weight decay 1e-4) and 0.082/0.158/0.188 with nnU-Net's SGD
(lr 0.01, Nesterov momentum 0.99, weight decay 3e-5), both with poly decay over the run. nnU-Net's
SGD is tuned for 250,000 iterations; a 25-minute CPU budget affords about 2,000.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from backend.errors import InvalidInput
from backend.model.augment import AugmentConfig
from backend.model.spec import PRESETS

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run except the data and the network spec.

    ``max_minutes`` is a wall-clock budget for the whole run (time before an interruption counts
    when resuming); the poly learning-rate decay follows whichever of steps or time runs out first,
    so a budgeted run still ends at a small learning rate. ``patience`` stops after that many
    epochs without a better validation foreground Dice (None: never). ``amp`` is mixed precision:
    float16 with a gradient scaler on CUDA, bfloat16 on CPUs with native support, float32 otherwise
    (see :func:`backend.model.device.mixed_precision_dtype`); Mamba layers always run in float32.
    """

    preset: str = "cpu_small"
    epochs: int = 1000
    iterations_per_epoch: int = 250
    batch_size: int = 12
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_exponent: float = 0.9
    grad_clip: float = 12.0
    oversample_foreground: float = 0.33
    deep_supervision: bool = True
    val_fraction: float = 0.2
    max_minutes: float | None = None
    patience: int | None = None
    min_improvement: float = 1e-4
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    normalization: str = "zscore_image"
    num_threads: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # The preset is a starting point: derive scale, stages, patch and batch from the data
    # (backend.model.planner). False trains the preset's geometry verbatim.
    plan: bool = True
    # Validation within budget (backend.model.validation.ValidationSchedule): at most this share
    # of the wall clock, on at most val_sample held-out frames, best epoch by an EMA of the score.
    val_budget_fraction: float = 0.1
    val_sample: int = 64
    val_ema: float = 0.3
    # A fine-tune (``train(init_checkpoint=...)``: a worker's retrain, an active-learning round)
    # runs its schedule at finetune_lr_scale x learning_rate, and warms up over finetune_warmup of
    # the run (backend.model.schedule.PolySchedule). A run from scratch ignores both.
    finetune_lr_scale: float = 1.0
    finetune_warmup: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise InvalidInput(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if self.epochs < 1 or self.iterations_per_epoch < 1 or self.batch_size < 1:
            raise InvalidInput("epochs, iterations_per_epoch and batch_size must be >= 1")
        if not 0 <= self.oversample_foreground <= 1:
            raise InvalidInput(f"oversample_foreground must be in [0, 1], got {self.oversample_foreground}")
        if not 0 <= self.val_fraction < 1:
            raise InvalidInput(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise InvalidInput(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.learning_rate <= 0:
            raise InvalidInput(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 < self.finetune_lr_scale <= 1 or not 0 <= self.finetune_warmup < 1:
            raise InvalidInput("finetune_lr_scale must be in (0, 1] and finetune_warmup in [0, 1)")
        if not 0 < self.val_budget_fraction <= 1 or self.val_sample < 1 or not 0 < self.val_ema <= 1:
            raise InvalidInput("val_budget_fraction and val_ema must be in (0, 1], val_sample >= 1")

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def training_preset(name: str) -> TrainConfig:
    """The recommended :class:`TrainConfig` for model preset ``name``."""
    if name not in PRESETS:
        raise InvalidInput(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    if name.startswith("cpu_small"):
        return TrainConfig(
            preset=name,
            epochs=200,
            iterations_per_epoch=50,
            batch_size=4,
            optimizer="adamw",
            learning_rate=2e-3,
            weight_decay=1e-4,
            max_minutes=25.0,
        )
    return TrainConfig(preset=name)
