"""The planner and budgeted validation: decisions for several fingerprints, train/inference input
consistency, subject-aware splits, bounded validation time, the plan in the checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from numpy.typing import NDArray

from backend.model.checkpoint import load_checkpoint
from backend.model.data import (
    PatchSampler,
    TrainData,
    prepare_case,
    prepare_image,
    split_validation,
    subjects_from_names,
)
from backend.model.fingerprint import ClassObjects, DatasetFingerprint, fingerprint
from backend.model.inference import pad_to_multiple
from backend.model.planner import MIN_OBJECT_DIAMETER, plan_network
from backend.model.spec import ModelSpec
from backend.model.synthetic import make_blob_pairs
from backend.model.train import train
from backend.model.validation import ValidationSchedule, Validator
from tests.support.training import cpu_config, two_stage_resunet, use_tiny_preset

torch.set_num_threads(1)
CLASSES = ("Nerve", "Vessel")


def fp(h: int, w: int, *, p10_area: float = 3000.0, n: int = 50) -> DatasetFingerprint:
    objects = (ClassObjects("Nerve", n, n, p10_area * 2, p10_area, 40), ClassObjects("Vessel", n, n, 8000, 5000, 60))
    return DatasetFingerprint(n, (h, w), (h, w), (h, w), 1, w / h, None, 40.0, 20.0, 0.0, 250.0, 10.0, objects)


@pytest.mark.parametrize(
    ("h", "w", "scale", "patch"),
    [
        (512, 512, 0.5, (256, 256)),  # the preset's own geometry
        (256, 256, 1.0, (256, 256)),  # small frames: never resampled down, never padded 4x
        (1024, 1024, 0.25, (256, 256)),  # large frames: the same grid as native
        (420, 580, 0.5187, (224, 320)),  # anisotropic scanner frame: the aspect is kept
        (128, 160, 1.0, (128, 160)),  # tiny frames: never upsampled
    ],
)
def test_plan_for_several_frame_sizes(h: int, w: int, scale: float, patch: tuple[int, int]) -> None:
    plan = plan_network(fp(h, w, p10_area=3000 * (h * w) / 262144), "cpu_small", CLASSES, 4)
    assert plan.spec.input_scale == pytest.approx(scale, abs=1e-3)
    assert plan.spec.patch_size == patch
    assert plan.whole_frame_patches
    grid = plan.grid_size
    assert all(p % plan.spec.divisor == 0 for p in plan.spec.patch_size)
    assert all(p - g < plan.spec.divisor for p, g in zip(plan.spec.patch_size, grid, strict=True))
    assert 2 <= plan.batch_size <= 16
    assert len(plan.decisions) >= 6 and any("input scale" in d for d in plan.decisions)


def test_tiny_objects_raise_the_scale() -> None:
    plan = plan_network(fp(1024, 1024, p10_area=150.0), "cpu_small", CLASSES, 4)  # ~14 px across natively
    assert plan.spec.input_scale > 0.25
    assert any("raised" in d for d in plan.decisions)
    diameter = 2 * np.sqrt(150.0 / np.pi) * plan.spec.input_scale
    assert diameter >= MIN_OBJECT_DIAMETER - 1e-6 or plan.spec.input_scale == 1.0


def test_very_large_frames_train_on_crops() -> None:
    plan = plan_network(fp(2000, 3000, p10_area=5.0), "cpu_small", CLASSES, 4)  # objects force full resolution
    assert plan.spec.input_scale == 1.0 and not plan.whole_frame_patches
    assert plan.spec.patch_size[0] * plan.spec.patch_size[1] <= 256 * 256
    assert any("crops inside" in d for d in plan.decisions)


@hsettings(max_examples=60, deadline=None)
@given(h=st.integers(16, 4000), w=st.integers(16, 4000), area=st.floats(1, 1e5))
def test_any_fingerprint_gives_a_valid_spec(h: int, w: int, area: float) -> None:
    plan = plan_network(fp(h, w, p10_area=area), "cpu_small", CLASSES, 4)
    ModelSpec.from_json(plan.spec.to_json())  # valid, serialisable
    assert 0 < plan.spec.input_scale <= 1.0
    assert plan.spec.n_stages >= 3 and min(plan.spec.patch_size) >= plan.spec.divisor


def test_fingerprint_measures_sizes_intensity_and_objects() -> None:
    pairs = make_blob_pairs(6, (96, 128), 2, seed=3)
    f = fingerprint(pairs, CLASSES)
    assert f.median_size == (96, 128) and f.distinct_sizes == 1 and f.median_aspect == pytest.approx(128 / 96)
    assert 0 < f.intensity_mean < 255 and f.intensity_std > 0
    assert {c.name for c in f.classes} == set(CLASSES)
    assert all(c.p10_area > 0 for c in f.classes if c.images_with_class)


# -- training sees what inference sees ------------------------------------------------------------------------
def test_training_patches_match_the_inference_input_of_whole_frames() -> None:
    """A frame smaller than the planned patch: the sampler's patch equals the padded tensor the
    network gets at inference (same scale, same normalisation, same symmetric zero padding)."""
    pairs = make_blob_pairs(4, (218, 301), 2, seed=5)
    plan = plan_network(fingerprint(pairs, CLASSES), "cpu_small", CLASSES, 4)
    case = prepare_case(pairs[0], plan.spec)
    sampler = PatchSampler([case], plan.spec.patch_size, 1, 0.0, np.random.default_rng(0))
    train_patch, _ = sampler.sample()
    infer = prepare_image(pairs[0][0], plan.spec)
    padded, _ = pad_to_multiple(torch.from_numpy(infer)[None, None], plan.spec.divisor)
    assert train_patch.shape[-2:] == tuple(padded.shape[-2:])
    np.testing.assert_array_equal(train_patch[0, 0], padded[0, 0].numpy())


# -- subject-aware validation -----------------------------------------------------------------------------------
@hsettings(max_examples=80, deadline=None)
@given(
    subjects=st.lists(st.integers(0, 12), min_size=2, max_size=80),
    fraction=st.floats(0.05, 0.5),
    seed=st.integers(0, 100),
)
def test_subject_split_never_shares_a_subject(subjects: list[int], fraction: float, seed: int) -> None:
    names = [f"s{s}" for s in subjects]
    train_idx, val_idx = split_validation(len(names), fraction, seed, names)
    assert sorted(train_idx + val_idx) == list(range(len(names))) and train_idx
    assert not {names[i] for i in train_idx} & {names[i] for i in val_idx}


def test_subject_regex_reads_the_subject_from_the_file_name() -> None:
    assert subjects_from_names(["12_34", "12_35", "7_1"], r"^(\d+)_") == ["12", "12", "7"]
    from backend.errors import InvalidInput

    with pytest.raises(InvalidInput, match="does not match"):
        subjects_from_names(["x"], r"^(\d+)_")


# -- validation within budget ------------------------------------------------------------------------------------
class SlowValidator:
    """A validator that costs ``seconds`` per call (a fake slow validation set)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    def __call__(self, model: torch.nn.Module) -> NDArray[np.float64]:
        self.calls += 1
        time.sleep(self.seconds)
        return np.array([0.5, 0.5])


def test_validation_schedule_keeps_validation_within_its_share() -> None:
    cadence = ValidationSchedule(0.1, 0.3)
    elapsed, spent_training = 0.0, 0.0
    for _epoch in range(200):
        spent_training += 1.0  # one second of training per epoch
        elapsed = spent_training + cadence.spent
        if cadence.due(elapsed):
            cadence.record(0.5, 0.8)  # an evaluation costs 0.8 s
    assert cadence.evaluations > 5
    assert cadence.spent <= 0.1 * (spent_training + cadence.spent) + 0.8  # within budget, one evaluation slack


def test_validation_schedule_reserves_the_final_re_score() -> None:
    """The final evaluations (last epoch, full re-score) are reserved: the whole run stays within."""
    cadence = ValidationSchedule(0.1, 0.3, final_evaluations=3.0)
    training = 0.0
    for _epoch in range(300):
        training += 1.0
        if cadence.due(training + cadence.spent):
            cadence.record(0.5, 0.8)
    total_val = cadence.spent + 3.0 * 0.8
    assert total_val <= 0.1 * (training + total_val) + 0.8


def test_validation_schedule_smooths_a_lucky_evaluation() -> None:
    cadence = ValidationSchedule(1.0, 0.3)
    scores = [cadence.record(s, 0.0) for s in (0.30, 0.31, 0.90, 0.32, 0.33)]
    assert max(scores) < 0.55  # the 0.90 spike moves the average by 0.3 x 0.59 only


def test_a_run_spends_at_most_its_validation_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny net, fake slow validator (0.25 s a call): validation time stays near 10% of the run."""
    calls: list[SlowValidator] = []

    def slow(cases: object, spec: object, device: object, *, mixed_precision: bool) -> SlowValidator:
        v = SlowValidator(0.25)
        calls.append(v)
        return v

    monkeypatch.setattr("backend.model.train.Validator", slow)
    use_tiny_preset(monkeypatch, "tiny_plan", arch="resunet_2d")  # 3 stages, 4-16 channels
    data = TrainData(make_blob_pairs(12, (32, 32), 2, seed=1), CLASSES)
    config = cpu_config("tiny_plan", epochs=10_000, iterations_per_epoch=2, batch_size=2, max_minutes=0.1)
    result = train(config, data)
    per_epoch = calls[0].calls  # the sampled validator (calls[1] is the final full re-score)
    assert result.epochs > 3 * per_epoch, (result.epochs, per_epoch)  # not every epoch
    final = 0.25
    assert result.val_seconds <= 0.1 * result.elapsed_s + 2 * 0.25 + final, (result.val_seconds, result.elapsed_s)
    assert result.images_per_second > 0 and result.train_seconds > 0


# -- the plan travels in the checkpoint ---------------------------------------------------------------------------
@pytest.fixture
def tiny_planned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4-stage tiny U-Mamba as preset ``tiny_plan``, for the planner to start from."""
    use_tiny_preset(
        monkeypatch, "tiny_plan", features=(4, 8, 16, 16), encoder_blocks=(1, 1, 1, 1), decoder_blocks=(1, 1, 1)
    )


def test_the_plan_is_stored_in_and_restored_from_the_checkpoint(tiny_planned: None, tmp_path: Path) -> None:
    data = TrainData(make_blob_pairs(8, (48, 80), 2, seed=2), CLASSES)
    config = cpu_config("tiny_plan", epochs=1, iterations_per_epoch=2, batch_size=2)
    result = train(config, data)
    assert result.plan is not None and result.plan["decisions"]
    assert tuple(result.plan["patch_size"]) == result.spec.patch_size
    result.save(tmp_path / "m.safetensors")
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.spec == result.spec  # inference rebuilds exactly the planned network
    assert ckpt.summary["plan"]["decisions"] == result.plan["decisions"]
    assert ckpt.summary["images_per_second"] > 0
    assert result.plan["input_scale"] == result.spec.input_scale and result.plan["stages"] == result.spec.n_stages
    # a fine-tune keeps its parent's plan
    again = train(config, data, init_checkpoint=tmp_path / "m.safetensors")
    assert again.spec == result.spec and again.plan is None


def test_validator_on_cases_is_deterministic() -> None:
    pairs = make_blob_pairs(3, (32, 32), 2, seed=9)
    spec = two_stage_resunet(CLASSES)
    from backend.model.networks import build_model

    model = build_model(spec)
    v = Validator([prepare_case(p, spec) for p in pairs], spec, torch.device("cpu"), mixed_precision=False)
    np.testing.assert_array_equal(v(model), v(model))


def test_model_plan_command_prints_its_decisions(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from backend.model.image_files import write_png
    from cli.main import cli

    for i, (img, mask) in enumerate(make_blob_pairs(4, (420, 580), 2, seed=4)):
        write_png(tmp_path / "images" / f"{i}_a.png", img)
        write_png(tmp_path / "masks" / f"{i}_a.png", mask.astype(np.uint8))
    args = [
        "model",
        "plan",
        "--images",
        str(tmp_path / "images"),
        "--masks",
        str(tmp_path / "masks"),
        "--labels",
        "Nerve,Vessel",
    ]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    assert "input scale" in out.output and "patch 320x224" in out.output and "=> scale" in out.output
    out = CliRunner().invoke(cli, [*args, "--json"])
    body = json.loads(out.output)
    assert body["plan"]["patch_size"] == [224, 320] and body["fingerprint"]["median_size"] == [420, 580]
