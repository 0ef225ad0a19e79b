"""Learning-rate schedule, best-model keeping, stopping rules and device choice."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

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


@given(
    warmup=st.floats(0.01, 0.9),
    total=st.integers(2, 10_000),
    exponent=st.floats(0.5, 2.0),
    progress=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=20),
)
def test_warmup_rises_to_the_poly_curve_and_then_follows_it(
    warmup: float, total: int, exponent: float, progress: list[float]
) -> None:
    warm = PolySchedule(1.0, total, 100.0, exponent, warmup=warmup)
    plain = PolySchedule(1.0, total, 100.0, exponent)
    for p in progress:
        lr, poly = warm.lr(0, 100.0 * p), plain.lr(0, 100.0 * p)
        assert 0.0 <= lr <= poly + 1e-12
        if p >= warmup:
            assert lr == pytest.approx(poly)
    assert warm.lr(0, 0.0) > 0.0  # the first step moves
    # Rising while the ramp outpaces the decay: strictly below the poly curve before the end of warm-up.
    if warmup > 2.0 / total:
        assert warm.lr(0, 100.0 * warmup / 2) < plain.lr(0, 100.0 * warmup / 2)


def test_warmup_outside_zero_to_one_is_refused() -> None:
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(ValueError, match="warm-up"):
            PolySchedule(1.0, 10, None, warmup=bad)
    for field, bad in (("finetune_warmup", 1.0), ("finetune_warmup", -0.5), ("finetune_lr_scale", 0.0)):
        with pytest.raises(InvalidInput, match=field):
            TrainConfig(**{field: bad})


def test_only_a_fine_tune_takes_the_fine_tune_schedule() -> None:
    from backend.model.train import _schedule

    config = TrainConfig(learning_rate=2e-3, finetune_lr_scale=0.5, finetune_warmup=0.2)
    scratch = _schedule(config, 100, 60.0, fine_tune=False)
    tune = _schedule(config, 100, 60.0, fine_tune=True)
    assert (scratch.base_lr, scratch.warmup) == (2e-3, 0.0)
    assert (tune.base_lr, tune.warmup) == (pytest.approx(1e-3), 0.2)


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
