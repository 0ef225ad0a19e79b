"""Active-learning simulation: the loop with a stand-in learner, the metrics, and
``sonoseg al simulate`` end to end on tiny generated folders with a tiny network."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from backend.active_learning.candidates import uses_labelled
from backend.active_learning.simulate import (
    RoundRecord,
    SimulationConfig,
    curve_area,
    first_at_or_above,
    plot_learning_curves,
    simulate,
)
from backend.active_learning.strategies import SCORE_FREE, STRATEGY_NAMES, strategy_named
from backend.errors import InvalidInput


@dataclass(frozen=True)
class Scores:
    entropy: float
    tta_disagreement: float
    boundary_uncertainty: float
    foreground_fraction: float
    embedding: np.ndarray


class FakeLearner:
    """Image i is worth i: a model's Dice is the mean worth of its labels, capped at 1; the
    scores say so (entropy = worth), so informed strategies beat random. A model is a file."""

    def __init__(self, n: int, workdir: Path) -> None:
        self.n = n
        self.workdir = workdir
        self.labels: dict[Path, list[int]] = {}
        self.fits: list[tuple[tuple[int, ...], Path | None, float, str]] = []
        self.scored: list[str] = []
        self.scored_sizes: list[int] = []
        self.released: list[Path] = []

    @property
    def pool_size(self) -> int:
        return self.n

    def fit(self, labelled: Sequence[int], init: Path | None, *, seed: int, minutes: float, tag: str) -> Path:
        path = self.workdir / f"{tag}.model"
        path.write_text(json.dumps(list(labelled)))
        self.labels[path] = list(labelled)
        self.fits.append((tuple(labelled), init, minutes, tag))
        return path

    def score(self, model: Path, images: Sequence[int]) -> list[Scores]:
        self.scored.append(model.name)
        self.scored_sizes.append(len(images))
        return [Scores(i / self.n, 0.5, 0.5, 0.1, _basis(i)) for i in images]

    def evaluate(self, model: Path) -> float:
        labels = json.loads(model.read_text())
        return min(1.0, float(np.mean(labels)) / self.n + len(labels) / self.n)

    def release(self, model: Path) -> None:
        self.released.append(model)
        model.unlink()


def _basis(i: int) -> np.ndarray:
    v = np.zeros(64, np.float32)
    v[i % 64] = 1.0
    return v


def test_the_loop_grows_each_run_by_one_batch_without_repeats(tmp_path: Path) -> None:
    learner = FakeLearner(40, tmp_path)
    config = SimulationConfig(start=5, batch=3, rounds=4, minutes_per_round=0.5, seeds=(0, 1))
    result = simulate(learner, config, names=[f"im{i}" for i in range(40)])
    assert len(result.runs) == 2 * len(STRATEGY_NAMES)
    for run in result.runs:
        assert [r.round for r in run.rounds] == [0, 1, 2, 3, 4]
        assert [r.labels for r in run.rounds] == [5, 8, 11, 14, 17]
        assert len(run.labelled) == len(set(run.labelled)) == 17
        assert all(0 <= i < 40 for i in run.labelled)
        assert run.aubc == pytest.approx(
            curve_area(np.array([5, 8, 11, 14, 17.0]), np.array([r.dice for r in run.rounds]))
        )
    for seed in (0, 1):  # paired runs: one round-0 start set and model per seed
        starts = {run.rounds[0].acquired for run in result.runs if run.seed == seed}
        assert len(starts) == 1
    # Rounds fine-tune from the previous round's model; round 0 and the full pool start fresh.
    # A strategy that reads the labelled images (coverage, default) has them scored by the same model.
    # Chains run in order (one job): per seed, each scored strategy's four rounds.
    scored = [name for name in STRATEGY_NAMES if name not in SCORE_FREE]
    expected = {
        name: [40] * 4 if uses_labelled(strategy_named(name)) else [35 - 3 * r for r in range(4)] for name in scored
    }
    assert learner.scored_sizes == [n for _seed in (0, 1) for name in scored for n in expected[name]]
    fits = {tag: (labels, init, minutes) for labels, init, minutes, tag in learner.fits}
    assert fits["seed0-round0"][1] is None and fits["full-pool"][1] is None
    assert fits["seed1-entropy-round2"][1] == tmp_path / "seed1-entropy-round1.model"
    assert fits["seed0-default-round1"][1] == tmp_path / "seed0-round0.model"
    assert fits["full-pool"][2] == pytest.approx(5 * 0.5) and len(fits["full-pool"][0]) == 40
    # Random needs no scores; every model file is released once.
    assert len(learner.scored) == 2 * (len(STRATEGY_NAMES) - 1) * 4  # seeds x (strategies but random) x rounds
    assert sorted(learner.released) == sorted(set(learner.released)) and not list(tmp_path.glob("*.model"))
    # The informed strategy beats random here, by construction of the stand-in.
    summary = {s.strategy: s for s in result.summaries}
    assert summary["entropy"].aubc_mean > summary["random"].aubc_mean
    full = result.full_pool_dice
    assert full is not None and result.target_dice == pytest.approx(0.95 * full)
    data = result.to_dict()
    assert data["runs"][0]["rounds"][0]["acquired"][0].startswith("im")
    assert set(data["summary"]) == set(config.strategies)
    plot_learning_curves(result, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_labels_to_target_and_aubc() -> None:
    assert curve_area(np.array([10.0, 20.0, 30.0]), np.array([0.2, 0.4, 0.4])) == pytest.approx((3 + 4) / 20)
    assert curve_area(np.array([10.0]), np.array([0.3])) == pytest.approx(0.3)
    assert first_at_or_above([10, 20, 30], [0.5, 0.7, 0.9], 0.7) == 20
    assert first_at_or_above([10, 20], [0.5, 0.6], 0.7) is None
    from backend.active_learning.simulate import RunRecord, summarise

    runs = [
        RunRecord("x", s, tuple(RoundRecord(k, 10 * (k + 1), d, (), 0.0, 0.0) for k, d in enumerate(ds)), 0.0, None)
        for s, ds in ((0, [0.2, 0.6, 0.8]), (1, [0.4, 0.8, 0.8]))
    ]
    s = summarise("x", runs, target=0.7)
    assert s.dice_mean == pytest.approx((0.3, 0.7, 0.8)) and s.labels_to_target_mean_curve == 20
    assert s.dice_min == pytest.approx((0.2, 0.6, 0.8)) and s.dice_max == pytest.approx((0.4, 0.8, 0.8))


def test_the_pool_may_run_out_and_bad_configs_are_refused(tmp_path: Path) -> None:
    learner = FakeLearner(9, tmp_path)
    result = simulate(learner, SimulationConfig(strategies=("default",), start=4, batch=3, rounds=5, seeds=(0,)))
    (run,) = result.runs
    assert [r.labels for r in run.rounds] == [4, 7, 9]
    with pytest.raises(InvalidInput):
        simulate(learner, SimulationConfig(start=10, seeds=(0,)))
    with pytest.raises(InvalidInput):
        SimulationConfig(strategies=("badge",))
    with pytest.raises(InvalidInput):
        SimulationConfig(batch=0)


def test_parallel_jobs_give_the_same_runs(tmp_path: Path) -> None:
    config = SimulationConfig(strategies=("random", "default"), start=3, batch=2, rounds=2, seeds=(0,), full_pool=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    serial = simulate(FakeLearner(20, tmp_path / "a"), config)
    parallel = simulate(FakeLearner(20, tmp_path / "b"), SimulationConfig(**{**config.__dict__, "jobs": 2}))
    assert [r.labelled for r in serial.runs] == [r.labelled for r in parallel.runs]
    assert serial.full_pool_dice is None and serial.summaries[0].labels_to_target_mean_curve is None


# -- the command, end to end ------------------------------------------------------------------------
def write_folder(root: Path, pairs: list[tuple[np.ndarray, np.ndarray]], offset: int = 0) -> tuple[Path, Path]:
    from backend.model.image_files import write_png

    for i, (image, mask) in enumerate(pairs):
        write_png(root / "images" / f"f{offset + i:03d}.png", image)
        write_png(root / "masks" / f"f{offset + i:03d}.png", mask.astype(np.uint8))
    return root / "images", root / "masks"


def test_al_simulate_end_to_end_on_a_tiny_network(tmp_path: Path) -> None:
    import torch

    from cli.main import cli
    from tests.support.frames import blob_pairs
    from tests.support.models import save_tiny_checkpoint, tiny_spec

    torch.set_num_threads(1)
    pool_images, pool_masks = write_folder(tmp_path / "pool", blob_pairs(14, seed=1, size=(64, 64)))
    test_images, test_masks = write_folder(tmp_path / "test", blob_pairs(4, seed=2, size=(64, 64)), offset=100)
    init = tmp_path / "init.safetensors"
    spec = tiny_spec(arch="resunet_2d", patch_size=(32, 32), input_scale=0.5, full_resolution_skip=True)
    save_tiny_checkpoint(init, spec=spec)
    out = tmp_path / "out"
    args = [
        "al", "simulate",
        "--images", str(pool_images), "--masks", str(pool_masks),
        "--test-images", str(test_images), "--test-masks", str(test_masks),
        "--labels", "Nerve,Vessel", "--strategies", "random,fg_random,entropy,default",
        "--start", "4", "--batch", "3", "--rounds", "2", "--minutes-per-round", "1", "--seeds", "2", "--first-seed", "5",
        "--out", str(out), "--init", str(init), "--device", "cpu", "--threads", "1",
        "--epochs", "1", "--iterations", "2", "--train-batch-size", "2",
        "--param", "power.beta=2", "--param", "default.informative=0.5",
        "--train-param", "finetune_warmup=0.25", "--train-param", "finetune_lr_scale=0.5",
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "full pool: 14 labels" in result.output and "AUBC" in result.output
    report = json.loads((out / "rounds.json").read_text())
    assert (out / "learning_curve.png").stat().st_size > 1000
    assert not (out / "checkpoints").exists()  # released as the runs went
    assert report["pool_size"] == 14 and report["config"]["strategy_params"] == {
        "power": {"beta": 2},
        "default": {"informative": 0.5},
    }
    assert len(report["runs"]) == 8
    for run in report["runs"]:
        assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
        assert [r["labels"] for r in run["rounds"]] == [4, 7, 10]
        acquired = [name for r in run["rounds"] for name in r["acquired"]]
        assert len(acquired) == len(set(acquired)) == 10
        assert all(name.startswith("f0") for name in acquired)
        assert 0.0 <= run["aubc"] <= 1.0 and all(0.0 <= r["dice"] <= 1.0 for r in run["rounds"])
    for name, s in report["summary"].items():
        assert set(s["aubc_per_seed"]) == {"5", "6"} and s["labels"] == [4, 7, 10], name
    assert report["full_pool"]["dice"] is not None
    trained_with = json.loads((out / "train_config.json").read_text())
    assert (trained_with["finetune_warmup"], trained_with["finetune_lr_scale"]) == (0.25, 0.5)
    # A non-empty --out is refused.
    again = CliRunner().invoke(cli, args)
    assert again.exit_code != 0 and "new or empty" in again.output


def test_al_simulate_refuses_an_unknown_or_invalid_training_field(tmp_path: Path) -> None:
    from cli.main import cli
    from tests.support.frames import blob_pairs

    images, masks = write_folder(tmp_path / "pool", blob_pairs(3, seed=1, size=(32, 32)))
    base = [
        "al", "simulate", "--images", str(images), "--masks", str(masks),
        "--test-images", str(images), "--test-masks", str(masks), "--labels", "Nerve,Vessel",
    ]  # fmt: skip
    unknown = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "a"), "--train-param", "warp=9"])
    assert unknown.exit_code == 2 and "not a training field" in unknown.output
    malformed = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "b"), "--train-param", "finetune_warmup"])
    assert malformed.exit_code == 2 and "NAME=VALUE" in malformed.output
    invalid = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "c"), "--train-param", "finetune_warmup=1.5"])
    assert invalid.exit_code == 1 and "finetune_warmup" in invalid.output
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abc")
