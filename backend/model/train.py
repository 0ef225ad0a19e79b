"""Training: :func:`train` wires small collaborators into nnU-Net's loop.

Collaborators: :class:`~backend.model.data.PatchSampler` (foreground oversampling),
:class:`~backend.model.augment.Augmenter`, :class:`~backend.model.losses.DeepSupervisionLoss`
(Dice + CE), :class:`~backend.model.stepper.OptimisationStep` (AMP, clipping, the optimiser),
:class:`~backend.model.schedule.PolySchedule`, :class:`~backend.model.validation.Validator` (on a
fixed sample of held-out frames, as often as :class:`~backend.model.validation.ValidationSchedule`
allows within its share of the budget) with :class:`~backend.model.schedule.BestKeeper` on the
smoothed score (the best weights are what a run returns, re-scored once on every held-out frame),
:class:`~backend.model.schedule.StopPolicy` (epochs, wall-clock budget, early stopping) and the
resume-state file (:mod:`backend.model.resume`). This module only sequences them.

The network plan (scale, stages, patch, batch) comes from :mod:`backend.model.planner` on the
training set's fingerprint, unless a spec is given or the run fine-tunes or resumes.

Runs are seeded: the network init, the split, the patch stream and the augmentations all derive
from ``config.seed`` (bit-exact repeats need the same device and thread count). A run that hits
its budget mid-epoch still validates that partial epoch, so it ends a few seconds past the budget.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from backend.errors import CheckpointError, InvalidInput
from backend.model.augment import Augmenter
from backend.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from backend.model.data import PatchSampler, TrainData, dataset_normalization, prepare_case, split_validation
from backend.model.device import keep_freed_memory_mapped, resolve_device
from backend.model.fingerprint import fingerprint
from backend.model.losses import DeepSupervisionLoss, DiceCELoss
from backend.model.networks import build_model
from backend.model.planner import plan_network
from backend.model.resume import ResumeState, load_resume_state, save_resume_state
from backend.model.schedule import BestKeeper, PolySchedule, StopPolicy, make_optimizer
from backend.model.spec import ModelSpec, Normalization, preset_spec
from backend.model.stepper import OptimisationStep
from backend.model.train_config import TrainConfig
from backend.model.validation import TrainDiceMeter, ValidationSchedule, Validator, validation_sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Reported after every epoch. Dice values are foreground means; ``val_dice`` is None without
    a validation set. ``fraction`` estimates how much of the run is done (epochs or budget)."""

    epoch: int
    step: int
    loss: float
    train_dice: float
    val_dice: float | None
    val_dice_per_class: dict[str, float]
    best_val_dice: float | None
    is_best: bool
    learning_rate: float
    elapsed_s: float
    fraction: float
    val_smoothed: float | None = None  # the moving average the best epoch is chosen on


@dataclass(frozen=True, eq=False)
class TrainResult:
    """The best weights of a run and how it went. ``save`` writes them as a checkpoint."""

    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_val_dice: float | None
    val_dice_per_class: dict[str, float]
    epochs: int
    steps: int
    elapsed_s: float
    stop_reason: str
    history: tuple[Progress, ...]
    config: TrainConfig
    n_train: int
    n_val: int
    init_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None  # backend.model.planner.Plan.to_dict() when the planner chose the spec
    val_seconds: float = 0.0  # wall clock spent validating, the final full re-score included
    train_seconds: float = 0.0  # wall clock spent in training steps

    @property
    def images_per_second(self) -> float:
        """Training throughput: frames through the network per second of training steps."""
        return self.steps * self.config.batch_size / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def val_fraction(self) -> float:
        return self.val_seconds / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def checkpoint(self) -> Checkpoint:
        summary = {
            "preset": self.config.preset,
            "config": asdict(self.config),
            "epochs": self.epochs,
            "steps": self.steps,
            "best_epoch": self.best_epoch,
            "elapsed_s": round(self.elapsed_s, 1),
            "stop_reason": self.stop_reason,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "init_sha256": self.init_sha256,
            "plan": self.plan,
            "images_per_second": round(self.images_per_second, 2),
            "val_seconds": round(self.val_seconds, 1),
            "val_fraction": round(self.val_fraction, 4),
            "history": [
                {
                    "epoch": p.epoch,
                    "loss": round(p.loss, 5),
                    "train_dice": round(p.train_dice, 4),
                    "val_dice": p.val_dice,
                }
                for p in self.history
            ],
        }
        metrics = {"val_fg_dice": self.best_val_dice, "val_dice_per_class": self.val_dice_per_class}
        return Checkpoint(spec=self.spec, state_dict=self.state_dict, summary=summary, metrics=metrics)

    def save(self, path: Path) -> str:
        """Write the best weights as a checkpoint; returns its sha256."""
        return save_checkpoint(path, self.checkpoint())


def train(
    config: TrainConfig,
    data: TrainData,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    init_checkpoint: Path | None = None,
    resume_from: Path | None = None,
    state_path: Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    spec: ModelSpec | None = None,
) -> TrainResult:
    """Train a segmentation network on ``data``.

    ``init_checkpoint`` fine-tunes from existing weights (its spec, class map included, must fit
    ``data``); ``resume_from`` continues an interrupted run from its resume-state file;
    ``state_path`` is where this run writes that file after every epoch; ``should_stop`` is polled
    every step (a cancellation hook for workers); ``spec`` trains that network instead of
    ``config.preset``'s (ablations; its classes must be ``data``'s).
    """
    started = time.monotonic()
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory_mapped()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    resume = load_resume_state(resume_from) if resume_from is not None else None
    setup = _setup(config, data, resume, init_checkpoint, spec)
    spec = setup.spec
    if setup.batch_size is not None:
        config = config.replace(batch_size=setup.batch_size)

    torch.manual_seed(config.seed)
    model = build_model(spec)
    if setup.init_state is not None:
        model.load_state_dict(setup.init_state)
    model.to(device).train()

    train_cases = [prepare_case(_pair(data, i), spec) for i in setup.train_idx]
    val_cases = [prepare_case(_pair(data, i), spec) for i in setup.val_idx]
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    sampler = PatchSampler(train_cases, spec.patch_size, config.batch_size, config.oversample_foreground, rng)
    augmenter = Augmenter(config.augment, gen)
    base_loss = DiceCELoss()
    loss_fn = DeepSupervisionLoss(base_loss, spec.n_stages - 1) if config.deep_supervision else base_loss
    stepper = OptimisationStep(
        model,
        loss_fn,
        make_optimizer(config, model.parameters()),
        device=device,
        amp=config.amp,
        grad_clip=config.grad_clip,
        deep_supervision=config.deep_supervision,
    )
    max_seconds = config.max_minutes * 60 if config.max_minutes else None
    total_steps = config.epochs * config.iterations_per_epoch
    schedule = _schedule(config, total_steps, max_seconds, fine_tune=setup.fine_tune)
    stopper = StopPolicy(config.epochs, max_seconds, config.patience)
    sample = validation_sample(len(val_cases), config.val_sample, config.seed)
    validator = Validator([val_cases[i] for i in sample], spec, device, mixed_precision=config.amp)
    # Reserved: the last epoch's evaluation and the final re-score on every held-out frame.
    final_evaluations = 1.0 + len(val_cases) / max(len(sample), 1) if val_cases else 0.0
    cadence = ValidationSchedule(config.val_budget_fraction, config.val_ema, final_evaluations=final_evaluations)
    train_seconds = 0.0
    steps_before = 0
    run = _Run(best=BestKeeper(config.min_improvement))
    if resume is not None:
        _restore(run, resume, model, stepper, rng, gen)
        steps_before = run.step
        log.info("resuming from %s at epoch %d (%.0f s done)", resume_from, run.epoch, run.elapsed_before)
    log.info(
        "training %s on %d images (%d validation, %d per evaluation) on %s, batch %d, patch %s, scale %.3f",
        spec.arch,
        len(train_cases),
        len(val_cases),
        len(sample),
        device,
        config.batch_size,
        spec.patch_size,
        spec.input_scale,
    )

    def elapsed() -> float:
        return run.elapsed_before + time.monotonic() - started

    stop_reason: str | None = None
    while stop_reason is None:
        meter = TrainDiceMeter(spec.num_classes)
        losses: list[float] = []
        lr = schedule.lr(run.step, elapsed())
        epoch_started = time.monotonic()
        for _ in range(config.iterations_per_epoch):
            if should_stop is not None and should_stop():
                stop_reason = "cancelled"
                break
            if stopper.out_of_time(elapsed()):
                stop_reason = "time_budget"
                break
            lr = schedule.lr(run.step, elapsed())
            images, masks = sampler.sample()
            x, y = augmenter(torch.from_numpy(images), torch.from_numpy(masks))
            loss, top = stepper(x, y, lr)
            meter.update(top, y.to(top.device))
            losses.append(loss)
            run.step += 1
        train_seconds += time.monotonic() - epoch_started
        if not losses:  # stopped before the first step of this epoch
            break
        run.epoch += 1
        val_dice: float | None = None
        val: NDArray[Any] = np.zeros(0)
        if not val_cases:
            is_best = run.best.offer(-float(np.mean(losses)), run.epoch, model)
        elif cadence.due(elapsed()) or stop_reason is not None:
            started_val = time.monotonic()
            val = validator(model)
            val_dice = float(val.mean()) if val.size else None
            smoothed = cadence.record(val_dice or 0.0, time.monotonic() - started_val)
            is_best = run.best.offer(smoothed, run.epoch, model)
        else:
            is_best = False
        progress = Progress(
            epoch=run.epoch,
            step=run.step,
            loss=float(np.mean(losses)),
            train_dice=float(meter.dice().mean()),
            val_dice=val_dice,
            val_dice_per_class={n: float(v) for n, v in zip(spec.classes, val, strict=False)},
            best_val_dice=run.best.score if val_cases and run.best.state is not None else None,
            is_best=is_best,
            learning_rate=lr,
            elapsed_s=elapsed(),
            fraction=max(run.epoch / config.epochs, schedule.progress(run.step, elapsed())),
            val_smoothed=cadence.smoothed if val_dice is not None else None,
        )
        run.history.append(progress)
        log.info(
            "epoch %d step %d loss %.4f train_dice %.3f val_dice %s lr %.2e %.0fs",
            run.epoch,
            run.step,
            progress.loss,
            progress.train_dice,
            "n/a" if val_dice is None else f"{val_dice:.3f}",
            lr,
            progress.elapsed_s,
        )
        if on_progress is not None:
            on_progress(progress)
        if stop_reason is None:
            stop_reason = stopper.after_epoch(run.epoch, elapsed(), run.best.since)
        if state_path is not None:
            save_resume_state(state_path, _snapshot(run, setup, config, model, stepper, rng, gen, elapsed()))

    log.info("training stopped (%s) after %d epochs, best epoch %d", stop_reason, run.epoch, run.best.epoch)
    final_state = run.best.state or {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    best_dice: float | None = None
    best_per_class: dict[str, float] = {}
    if val_cases and run.best.state is not None:
        # The pick was made on a sample and a moving average: score it once on every held-out frame.
        started_val = time.monotonic()
        model.load_state_dict(run.best.state)
        full = Validator(val_cases, spec, device, mixed_precision=config.amp)(model)
        cadence.spent += time.monotonic() - started_val
        best_dice = float(full.mean()) if full.size else None
        best_per_class = {n: float(v) for n, v in zip(spec.classes, full, strict=False)}
    steps_now = run.step - steps_before
    log.info(
        "throughput %.2f images/s (%d steps of %d in %.0f s of training); validation %.0f s = %.1f%% of %.0f s",
        steps_now * config.batch_size / train_seconds if train_seconds else 0.0,
        steps_now,
        config.batch_size,
        train_seconds,
        cadence.spent,
        100 * cadence.spent / max(elapsed(), 1e-9),
        elapsed(),
    )
    return TrainResult(
        spec=spec,
        state_dict=final_state,
        best_epoch=run.best.epoch,
        best_val_dice=best_dice,
        val_dice_per_class=best_per_class,
        epochs=run.epoch,
        steps=run.step,
        elapsed_s=elapsed(),
        stop_reason=stop_reason or "cancelled",
        history=tuple(run.history),
        config=config,
        n_train=len(setup.train_idx),
        n_val=len(setup.val_idx),
        init_sha256=setup.init_sha,
        plan=setup.plan,
        val_seconds=cadence.spent,
        train_seconds=train_seconds,
    )


def _schedule(config: TrainConfig, total_steps: int, max_seconds: float | None, *, fine_tune: bool) -> PolySchedule:
    """The run's learning-rate schedule: a fine-tune takes the config's fine-tune scale and warm-up."""
    if not fine_tune:
        return PolySchedule(config.learning_rate, total_steps, max_seconds, config.poly_exponent)
    return PolySchedule(
        config.learning_rate * config.finetune_lr_scale,
        total_steps,
        max_seconds,
        config.poly_exponent,
        warmup=config.finetune_warmup,
    )


@dataclass
class _Run:
    """The loop's counters and history (what a resume restores besides weights and generators)."""

    best: BestKeeper
    epoch: int = 0
    step: int = 0
    elapsed_before: float = 0.0
    history: list[Progress] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class _Setup:
    spec: ModelSpec
    train_idx: list[int]
    val_idx: list[int]
    init_state: dict[str, torch.Tensor] | None = None
    init_sha: str | None = None
    batch_size: int | None = None  # the plan's (None: the config's)
    plan: dict[str, Any] | None = None
    resumed_fine_tune: bool = False  # a resume of a run that started from a checkpoint

    @property
    def fine_tune(self) -> bool:
        return self.init_state is not None or self.resumed_fine_tune


def _setup(
    config: TrainConfig, data: TrainData, resume: ResumeState | None, init: Path | None, custom: ModelSpec | None
) -> _Setup:
    """The spec and data split: from the resume state, else the init checkpoint (a fine-tune keeps
    its parent's plan), else ``custom``, else the planner on the preset (``config.plan``), else the
    preset verbatim."""
    if resume is not None:
        spec = ModelSpec.from_json(resume.spec_json)
        _check_classes(spec, data)
        if max([*resume.train_indices, *resume.val_indices, -1]) >= _n_pairs(data):
            raise CheckpointError("the resume state was made with more training images than given")
        batch = int(json.loads(resume.config_json).get("batch_size", config.batch_size))
        return _Setup(
            spec,
            list(resume.train_indices),
            list(resume.val_indices),
            batch_size=batch,
            resumed_fine_tune=resume.fine_tune,
        )
    train_idx, val_idx = _split(config, data)
    if init is not None:
        ckpt = load_checkpoint(init)
        _check_classes(ckpt.spec, data)
        return _Setup(ckpt.spec, train_idx, val_idx, ckpt.state_dict, ckpt.sha256)
    if custom is not None and tuple(custom.classes) != tuple(data.classes):
        raise InvalidInput(f"the spec's classes {list(custom.classes)} differ from the data's {list(data.classes)}")
    plan = None
    if custom is not None:
        spec = custom
    elif config.plan:
        plan = plan_network(
            fingerprint([_pair(data, i) for i in train_idx], data.classes),
            config.preset,
            tuple(data.classes),
            config.batch_size,
        )
        spec = plan.spec
        for line in plan.decisions:
            log.info("plan: %s", line)
    else:
        spec = preset_spec(config.preset, data.classes)
    if config.normalization == "zscore_dataset":
        spec = spec.with_normalization(dataset_normalization([_pair(data, i)[0] for i in train_idx]))
    elif config.normalization != "zscore_image":
        spec = spec.with_normalization(Normalization(config.normalization))  # raises on unknown
    if plan is None:
        return _Setup(spec, train_idx, val_idx)
    return _Setup(spec, train_idx, val_idx, batch_size=plan.batch_size, plan=plan.to_dict())


def _snapshot(
    run: _Run,
    setup: _Setup,
    config: TrainConfig,
    model: torch.nn.Module,
    stepper: OptimisationStep,
    rng: np.random.Generator,
    gen: torch.Generator,
    elapsed: float,
) -> ResumeState:
    opt = stepper.state_dict()
    return ResumeState(
        spec_json=setup.spec.to_json(),
        config_json=config.to_json(),
        model={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer=opt["optimizer"],
        scaler=opt["scaler"],
        best_state=run.best.state,
        best_score=run.best.score,
        best_epoch=run.best.epoch,
        epochs_since_best=run.best.since,
        epoch=run.epoch,
        step=run.step,
        elapsed=elapsed,
        history=[asdict(p) for p in run.history],
        train_indices=list(setup.train_idx),
        val_indices=list(setup.val_idx),
        numpy_rng=dict(rng.bit_generator.state),
        torch_generator=gen.get_state(),
        torch_rng=torch.get_rng_state(),
        fine_tune=setup.fine_tune,
    )


def _restore(
    run: _Run,
    state: ResumeState,
    model: torch.nn.Module,
    stepper: OptimisationStep,
    rng: np.random.Generator,
    gen: torch.Generator,
) -> None:
    model.load_state_dict(state.model)
    stepper.load_state_dict({"optimizer": state.optimizer, "scaler": state.scaler})
    stepper.count = state.step
    run.best.state, run.best.score, run.best.epoch = state.best_state, state.best_score, state.best_epoch
    run.best.since = state.epochs_since_best
    run.epoch, run.step, run.elapsed_before = state.epoch, state.step, state.elapsed
    run.history = [Progress(**h) for h in state.history]
    rng.bit_generator.state = state.numpy_rng
    gen.set_state(state.torch_generator)
    torch.set_rng_state(state.torch_rng)


def _n_pairs(data: TrainData) -> int:
    return len(data.pairs) + len(data.val_pairs or ())


def _pair(data: TrainData, index: int) -> tuple[NDArray[Any], NDArray[Any]]:
    """Index into ``pairs`` followed by ``val_pairs``."""
    n = len(data.pairs)
    return data.pairs[index] if index < n else (data.val_pairs or ())[index - n]


def _split(config: TrainConfig, data: TrainData) -> tuple[list[int], list[int]]:
    if data.val_pairs is not None:
        n = len(data.pairs)
        return list(range(n)), list(range(n, n + len(data.val_pairs)))
    return split_validation(len(data.pairs), config.val_fraction, config.seed, data.subjects)


def _check_classes(spec: ModelSpec, data: TrainData) -> None:
    if tuple(spec.classes) != tuple(data.classes):
        raise CheckpointError(
            f"the checkpoint's classes {list(spec.classes)} differ from the data's {list(data.classes)}; "
            "fine-tune only with the same class map"
        )
