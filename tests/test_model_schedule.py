"""Learning-rate schedule, best-model keeping, stopping rules and device choice."""

from __future__ import annotations

import pytest
import torch

from backend.errors import InvalidInput, NotReady
from backend.model.device import mixed_precision_dtype, resolve_device
from backend.model.schedule import BestKeeper, PolySchedule, StopPolicy
from backend.model.train_config import TrainConfig, training_preset


def test_poly_schedule_follows_steps_or_time_whichever_runs_out_first() -> None:
    s = PolySchedule(base_lr=0.01, total_steps=100, max_seconds=60.0, exponent=0.9)
    assert s.lr(0, 0.0) == pytest.approx(0.01)
    assert s.lr(50, 0.0) == pytest.approx(0.01 * 0.5**0.9)
    assert s.lr(10, 30.0) == pytest.approx(0.01 * 0.5**0.9)  # time is further along
    assert s.lr(100, 0.0) == 0.0 and s.lr(0, 120.0) == 0.0
    assert PolySchedule(0.01, 100, None).lr(50, 1e9) == pytest.approx(0.01 * 0.5**0.9)


def test_best_keeper_copies_weights_and_counts_epochs_since() -> None:
    model = torch.nn.Linear(2, 1)
    keeper = BestKeeper(min_improvement=0.01)
    assert keeper.offer(0.5, 1, model)
    kept = keeper.state["weight"].clone()  # type: ignore[index]
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not keeper.offer(0.505, 2, model)  # within min_improvement: not better
    assert keeper.since == 1 and keeper.epoch == 1
    torch.testing.assert_close(keeper.state["weight"], kept)  # type: ignore[index]
    assert keeper.offer(0.6, 3, model) and keeper.since == 0 and keeper.epoch == 3


def test_stop_policy_reasons() -> None:
    policy = StopPolicy(max_epochs=10, max_seconds=100.0, patience=3)
    assert policy.after_epoch(5, 50.0, 2) is None
    assert policy.after_epoch(10, 50.0, 0) == "epochs"
    assert policy.after_epoch(5, 100.0, 0) == "time_budget"
    assert policy.after_epoch(5, 50.0, 3) == "early_stopping"
    assert StopPolicy(10, None, None).after_epoch(5, 1e9, 100) is None


def test_presets_and_config_validation() -> None:
    cpu = training_preset("cpu_small")
    assert cpu.optimizer == "adamw" and cpu.max_minutes == 25.0
    gpu = training_preset("nnunet_bot")
    assert (gpu.optimizer, gpu.learning_rate, gpu.momentum, gpu.grad_clip) == ("sgd", 0.01, 0.99, 12.0)
    assert (gpu.batch_size, gpu.iterations_per_epoch, gpu.epochs, gpu.oversample_foreground) == (12, 250, 1000, 0.33)
    with pytest.raises(InvalidInput, match="optimizer"):
        TrainConfig(optimizer="lion")
    with pytest.raises(InvalidInput, match="unknown model preset"):
        training_preset("nope")


def test_device_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InvalidInput):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(NotReady, match="cuda"):
            resolve_device("cuda")
    assert mixed_precision_dtype(torch.device("cpu")) in (torch.bfloat16, None)
