"""Training on generated blobs: learning, budgets, early stopping, fine-tuning and resuming."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.errors import CheckpointError, InvalidInput
from backend.model.checkpoint import load_checkpoint
from backend.model.data import TrainData
from backend.model.synthetic import make_blob_pairs
from backend.model.train import Progress, train
from backend.model.train_config import TrainConfig
from tests.support.training import cpu_config, two_stage_resunet, use_tiny_preset

torch.set_num_threads(1)
CLASSES = ("Nerve", "Vessel")


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preset ``tiny``: a 3-stage tiny U-Mamba with 8-32 channels."""
    use_tiny_preset(monkeypatch, "tiny", features=(8, 16, 32))


@pytest.fixture(scope="module")
def data() -> TrainData:
    return TrainData(make_blob_pairs(16, (32, 32), 2, seed=1), CLASSES)


def config(**kw: object) -> TrainConfig:
    base = cpu_config(
        "tiny",
        epochs=5,
        iterations_per_epoch=8,
        batch_size=4,
        # These tests check per-epoch semantics: validate every epoch, no smoothing (the budgeted
        # cadence and the moving average have their own tests in test_model_planning.py).
        val_budget_fraction=1.0,
        val_ema=1.0,
    )
    return base.replace(**kw)


def test_loss_falls_and_dice_rises(data: TrainData) -> None:
    seen: list[Progress] = []
    result = train(config(), data, on_progress=seen.append)
    assert [p.epoch for p in seen] == [1, 2, 3, 4, 5] and result.stop_reason == "epochs"
    assert seen[-1].loss < 0.7 * seen[0].loss
    assert seen[-1].train_dice > seen[0].train_dice + 0.2
    assert result.best_val_dice is not None and result.best_val_dice > 0.5
    assert result.best_val_dice == max(p.val_dice or 0 for p in seen)
    assert result.n_train == 12 and result.n_val == 4 and result.steps == 40
    assert set(result.val_dice_per_class) == set(CLASSES)


def test_best_checkpoint_is_kept_and_saved(data: TrainData, tmp_path: Path) -> None:
    result = train(config(epochs=2), data)
    sha = result.save(tmp_path / "best.safetensors")
    loaded = load_checkpoint(tmp_path / "best.safetensors", expected_sha256=sha)
    assert loaded.spec == result.spec and loaded.summary["best_epoch"] == result.best_epoch
    assert loaded.metrics["val_fg_dice"] == pytest.approx(result.best_val_dice)
    for k, v in result.state_dict.items():
        torch.testing.assert_close(loaded.state_dict[k], v)


def test_time_budget_cancellation_and_patience_stop_the_run(data: TrainData) -> None:
    result = train(config(epochs=1000, max_minutes=1e-4), data)
    assert result.stop_reason == "time_budget" and result.epochs <= 1
    calls = iter(range(1000))
    result = train(config(epochs=1000), data, should_stop=lambda: next(calls) >= 3)
    assert result.stop_reason == "cancelled" and result.steps == 3 and result.epochs == 1
    flat = config(epochs=50, iterations_per_epoch=1, learning_rate=1e-9, patience=2)
    result = train(flat, data)
    assert result.stop_reason == "early_stopping" and result.epochs == result.best_epoch + 2


def test_seeded_runs_repeat(data: TrainData) -> None:
    a = train(config(epochs=1, iterations_per_epoch=3), data)
    b = train(config(epochs=1, iterations_per_epoch=3), data)
    assert a.history[0].loss == b.history[0].loss
    c = train(config(epochs=1, iterations_per_epoch=3, seed=7), data)
    assert c.history[0].loss != a.history[0].loss


def test_resume_continues_where_the_run_stopped(data: TrainData, tmp_path: Path) -> None:
    state = tmp_path / "run.state"
    straight = train(config(epochs=3), data)
    first = train(config(epochs=3), data, state_path=state, should_stop=_stop_after_steps(16))  # 2 epochs
    assert first.epochs == 2 and state.exists()
    resumed = train(config(epochs=3), data, resume_from=state, state_path=state)
    assert [p.epoch for p in resumed.history] == [1, 2, 3]
    assert resumed.steps == straight.steps
    # Same sample stream and optimiser state: the resumed run ends where the straight one did.
    np.testing.assert_allclose(resumed.history[-1].loss, straight.history[-1].loss, rtol=1e-4)
    for k, v in straight.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[k], v, rtol=1e-4, atol=1e-5)


def test_fine_tuning_starts_from_the_checkpoint_and_needs_the_same_classes(data: TrainData, tmp_path: Path) -> None:
    base = train(config(epochs=3), data)
    base.save(tmp_path / "base.safetensors")
    tuned = train(config(epochs=1, learning_rate=1e-9), data, init_checkpoint=tmp_path / "base.safetensors")
    assert tuned.init_sha256 is not None
    assert tuned.history[0].val_dice == pytest.approx(base.best_val_dice, abs=0.02)
    other = TrainData(data.pairs, ("Nerve", "Artery"))
    with pytest.raises(CheckpointError, match="classes"):
        train(config(epochs=1), other, init_checkpoint=tmp_path / "base.safetensors")


def test_a_fine_tune_warms_up_at_its_scaled_rate_and_keeps_that_schedule_on_resume(
    data: TrainData, tmp_path: Path
) -> None:
    base = train(config(epochs=1), data)
    base.save(tmp_path / "base.safetensors")
    tune = config(epochs=4, learning_rate=1e-2, finetune_lr_scale=0.5, finetune_warmup=0.5)
    straight = train(tune, data, init_checkpoint=tmp_path / "base.safetensors")
    rates = [p.learning_rate for p in straight.history]  # each epoch's last rate
    assert rates[0] < rates[1] and max(rates) <= 0.5e-2
    scratch = train(tune, data)  # from scratch: the base rate, no warm-up
    assert scratch.history[0].learning_rate > rates[0]
    state = tmp_path / "tune.state"
    train(tune, data, init_checkpoint=tmp_path / "base.safetensors", state_path=state, should_stop=_stop_after_steps(8))
    resumed = train(tune, data, resume_from=state)
    assert [p.learning_rate for p in resumed.history] == pytest.approx(rates)


def _stop_after_steps(n: int):  # type: ignore[no-untyped-def]
    calls = iter(range(10**6))
    return lambda: next(calls) >= n


def test_an_explicit_spec_replaces_the_preset_and_must_match_the_classes(data: TrainData) -> None:
    custom = two_stage_resunet(CLASSES)
    result = train(config(epochs=1, iterations_per_epoch=2), data, spec=custom)
    assert result.spec == custom
    assert "mamba_layer.mamba.A_log" not in result.state_dict
    with pytest.raises(InvalidInput, match="spec's classes"):
        train(config(epochs=1), data, spec=dataclasses.replace(custom, classes=("Nerve",)))
