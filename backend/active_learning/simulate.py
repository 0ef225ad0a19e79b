"""Active-learning simulation on a fully labelled dataset: which strategy saves labels, measured.

A research group runs this on its own labelled data before deploying a strategy
(``sonoseg al simulate``). The loop is pure; the model work (fine-tune, score, evaluate) comes from a
:class:`Learner`, so this module needs neither torch nor the model package
(:class:`backend.model.simulation.PoolLearner` is the real one, tests pass a stand-in).

Per seed ``s``:

- **round 0**: ``start`` pool images drawn uniformly (the same for every strategy of that seed,
  so strategies are compared on paired runs), a model trained from the initial weights within
  ``minutes_per_round``, scored on the test set;
- **rounds 1..R**, per strategy: the unlabelled rest of the pool is scored by the previous round's
  model (strategies in :data:`~backend.active_learning.strategies.SCORE_FREE` skip this), the
  strategy acquires ``batch`` images, the model is **fine-tuned from the previous round's weights**
  within ``minutes_per_round`` (as the workers retrain from the serving model) and scored on the test set.

Once per simulation, a model is trained **on the whole pool** from the initial weights within the
total budget of one strategy run, ``(R + 1) * minutes_per_round``: the reference the "labels to
95%" are counted against.

Metrics:

- **AUBC** (area under the budget curve, Zhan et al. 2021): the trapezoidal area under test Dice
  versus number of labelled images, from round 0 to the last round, divided by the width of that
  label range: the mean Dice over the budget, in [0, 1].
- **labels to target**: the smallest number of labelled images at which the test Dice reaches
  ``target_fraction`` (0.95) of the full-pool Dice; per seed, and on the strategy's mean curve
  over seeds. ``None``: not reached within the rounds run.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from backend.active_learning.candidates import Candidate, uses_labelled
from backend.active_learning.strategies import SCORE_FREE, STRATEGY_NAMES, strategy_named
from backend.errors import InvalidInput


class FrameScores(Protocol):
    """What a learner's ``score`` returns per image (:class:`backend.model.scores.ImageScores`)."""

    @property
    def entropy(self) -> float: ...
    @property
    def tta_disagreement(self) -> float: ...
    @property
    def boundary_uncertainty(self) -> float: ...
    @property
    def foreground_fraction(self) -> float: ...
    @property
    def embedding(self) -> NDArray[np.float32]: ...


class Learner(Protocol):
    """The model side of a simulation. Pool images are indices ``0..pool_size - 1``; a model is a
    checkpoint file. Must be picklable when the simulation runs jobs in parallel."""

    @property
    def pool_size(self) -> int: ...

    def fit(self, labelled: Sequence[int], init: Path | None, *, seed: int, minutes: float, tag: str) -> Path:
        """Train on the pool images ``labelled`` (from ``init``'s weights, else the initial ones)."""
        ...

    def score(self, model: Path, images: Sequence[int]) -> Sequence[FrameScores]:
        """The acquisition scores of pool images ``images``, in order."""
        ...

    def evaluate(self, model: Path) -> float:
        """Foreground Dice on the test set."""
        ...

    def release(self, model: Path) -> None:
        """The model is no longer needed (its file may be deleted)."""
        ...


@dataclass(frozen=True)
class SimulationConfig:
    strategies: tuple[str, ...] = STRATEGY_NAMES
    start: int = 10
    batch: int = 10
    rounds: int = 5
    minutes_per_round: float = 2.0
    seeds: tuple[int, ...] = (0, 1, 2)
    target_fraction: float = 0.95
    full_pool: bool = True  # train the whole-pool reference (labels to target need it)
    full_pool_minutes: float | None = None  # default: (rounds + 1) * minutes_per_round
    jobs: int = 1  # strategy runs in parallel processes (one torch thread each is the caller's job)
    strategy_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.strategies or len(set(self.strategies)) != len(self.strategies):
            raise InvalidInput("give at least one strategy, each once")
        unknown = [s for s in self.strategies if s not in STRATEGY_NAMES]
        if unknown:
            raise InvalidInput(f"unknown strategies {unknown}; known: {', '.join(STRATEGY_NAMES)}")
        if self.start < 1 or self.batch < 1 or self.rounds < 0 or not self.seeds:
            raise InvalidInput("start and batch must be >= 1, rounds >= 0, and at least one seed given")
        if not self.minutes_per_round > 0 or not 0 < self.target_fraction <= 1 or self.jobs < 1:
            raise InvalidInput("minutes per round must be > 0, target fraction in (0, 1], jobs >= 1")

    @property
    def total_minutes(self) -> float:
        """The training budget of one strategy run (round 0 included)."""
        return (self.rounds + 1) * self.minutes_per_round


@dataclass(frozen=True)
class RoundRecord:
    round: int
    labels: int
    dice: float
    acquired: tuple[int, ...]  # pool indices acquired for this round (round 0: the start set)
    train_seconds: float
    score_seconds: float


@dataclass(frozen=True)
class RunRecord:
    """One strategy, one seed: every round, its AUBC and the labels it needed to reach the target."""

    strategy: str
    seed: int
    rounds: tuple[RoundRecord, ...]
    aubc: float
    labels_to_target: int | None

    @property
    def labelled(self) -> list[int]:
        return [i for r in self.rounds for i in r.acquired]


@dataclass(frozen=True)
class StrategySummary:
    strategy: str
    aubc_mean: float
    aubc_std: float
    aubc_per_seed: dict[int, float]
    labels_to_target_per_seed: dict[int, int | None]
    labels_to_target_mean_curve: int | None  # on the mean Dice curve over seeds
    labels: tuple[int, ...]  # the x of the mean curve
    dice_mean: tuple[float, ...]
    dice_min: tuple[float, ...]
    dice_max: tuple[float, ...]


@dataclass(frozen=True)
class SimulationResult:
    config: SimulationConfig
    pool_size: int
    full_pool_dice: float | None
    full_pool_seconds: float
    target_dice: float | None
    runs: tuple[RunRecord, ...]
    summaries: tuple[StrategySummary, ...]
    names: tuple[str, ...] = ()  # pool index -> file stem, for the JSON

    def to_dict(self) -> dict[str, Any]:
        def name(i: int) -> str | int:
            return self.names[i] if i < len(self.names) else i

        config = asdict(self.config)
        config["strategy_params"] = {k: dict(v) for k, v in self.config.strategy_params.items()}
        return {
            "config": config,
            "pool_size": self.pool_size,
            "total_minutes_per_run": self.config.total_minutes,
            "full_pool": {
                "labels": self.pool_size,
                "dice": self.full_pool_dice,
                "seconds": round(self.full_pool_seconds, 1),
                "target_fraction": self.config.target_fraction,
                "target_dice": self.target_dice,
            },
            "runs": [
                {
                    "strategy": run.strategy,
                    "seed": run.seed,
                    "aubc": run.aubc,
                    "labels_to_target": run.labels_to_target,
                    "rounds": [
                        {
                            "round": r.round,
                            "labels": r.labels,
                            "dice": r.dice,
                            "acquired": [name(i) for i in r.acquired],
                            "train_seconds": round(r.train_seconds, 1),
                            "score_seconds": round(r.score_seconds, 1),
                        }
                        for r in run.rounds
                    ],
                }
                for run in self.runs
            ],
            "summary": {
                s.strategy: {
                    "aubc_mean": s.aubc_mean,
                    "aubc_std": s.aubc_std,
                    "aubc_per_seed": {str(k): v for k, v in s.aubc_per_seed.items()},
                    "labels_to_target_per_seed": {str(k): v for k, v in s.labels_to_target_per_seed.items()},
                    "labels_to_target_mean_curve": s.labels_to_target_mean_curve,
                    "labels": list(s.labels),
                    "dice_mean": list(s.dice_mean),
                    "dice_min": list(s.dice_min),
                    "dice_max": list(s.dice_max),
                }
                for s in self.summaries
            },
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")


def simulate(
    learner: Learner,
    config: SimulationConfig,
    *,
    names: Sequence[str] = (),
    on_step: Callable[[str], None] | None = None,
) -> SimulationResult:
    """Run every strategy for every seed (see the module docstring). ``on_step`` is called once per
    trained model, with a short description of what was just done."""
    n = learner.pool_size
    if config.start > n:
        raise InvalidInput(f"--start {config.start} is more than the {n} pool images")
    step = on_step or (lambda _what: None)
    starts: dict[int, tuple[list[int], Path, RoundRecord]] = {}
    for seed in config.seeds:
        start = sorted(int(i) for i in np.random.default_rng([seed, 0]).choice(n, config.start, replace=False))
        t0 = time.monotonic()
        model = learner.fit(start, None, seed=seed, minutes=config.minutes_per_round, tag=f"seed{seed}-round0")
        seconds = time.monotonic() - t0
        dice = learner.evaluate(model)
        starts[seed] = (start, model, RoundRecord(0, len(start), dice, tuple(start), seconds, 0.0))
        step(f"seed {seed} round 0: {len(start)} labels, Dice {dice:.3f}")

    chains = [(strategy, seed) for seed in config.seeds for strategy in config.strategies]
    runs: list[tuple[str, int, list[RoundRecord]]] = []
    if config.jobs > 1 and len(chains) > 1:
        # spawn, not fork: the parent has run torch (thread pools do not survive a fork)
        # The learner (pool images included) goes to each worker once, not with every chain.
        with ProcessPoolExecutor(
            max_workers=config.jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_adopt_learner,
            initargs=(learner,),
        ) as pool:
            futures = [
                pool.submit(_run_chain_in_worker, config, strategy, seed, starts[seed][0], starts[seed][1])
                for strategy, seed in chains
            ]
            for (strategy, seed), future in zip(chains, futures, strict=True):
                records = future.result()
                for r in records:
                    step(f"{strategy} seed {seed} round {r.round}: {r.labels} labels, Dice {r.dice:.3f}")
                runs.append((strategy, seed, [starts[seed][2], *records]))
    else:
        for strategy, seed in chains:
            records = _run_chain(learner, config, strategy, seed, starts[seed][0], starts[seed][1], step)
            runs.append((strategy, seed, [starts[seed][2], *records]))
    for _start, model, _record in starts.values():
        learner.release(model)

    full_dice: float | None = None
    full_seconds = 0.0
    if config.full_pool:
        t0 = time.monotonic()
        minutes = config.full_pool_minutes or config.total_minutes
        model = learner.fit(list(range(n)), None, seed=config.seeds[0], minutes=minutes, tag="full-pool")
        full_seconds = time.monotonic() - t0
        full_dice = learner.evaluate(model)
        learner.release(model)
        step(f"full pool: {n} labels, Dice {full_dice:.3f}")
    target = None if full_dice is None else config.target_fraction * full_dice
    run_records = tuple(
        RunRecord(strategy, seed, tuple(rounds), aubc(rounds), labels_to_reach(rounds, target))
        for strategy, seed, rounds in runs
    )
    summaries = tuple(
        summarise(name, [r for r in run_records if r.strategy == name], target) for name in config.strategies
    )
    return SimulationResult(config, n, full_dice, full_seconds, target, run_records, summaries, tuple(names))


_WORKER_LEARNER: list[Learner] = []


def _adopt_learner(learner: Learner) -> None:
    _WORKER_LEARNER[:] = [learner]


def _run_chain_in_worker(
    config: SimulationConfig, strategy_name: str, seed: int, start: Sequence[int], model: Path
) -> list[RoundRecord]:
    return _run_chain(_WORKER_LEARNER[0], config, strategy_name, seed, start, model, None)


def _run_chain(
    learner: Learner,
    config: SimulationConfig,
    strategy_name: str,
    seed: int,
    start: Sequence[int],
    model: Path,
    step: Callable[[str], None] | None,
) -> list[RoundRecord]:
    """Rounds 1..R of one strategy and seed, from the round-0 model (which this does not release)."""
    strategy = strategy_named(strategy_name, **dict(config.strategy_params.get(strategy_name, {})))
    # One stream per (seed, strategy), independent of which other strategies run.
    rng = np.random.default_rng([seed, zlib.crc32(strategy_name.encode()), 1])
    labelled = list(start)
    in_set = set(labelled)
    records: list[RoundRecord] = []
    current = model
    for r in range(1, config.rounds + 1):
        unlabelled = [i for i in range(learner.pool_size) if i not in in_set]
        if not unlabelled:
            break
        t0 = time.monotonic()
        known: list[Candidate] = []
        if strategy_name in SCORE_FREE:
            pool = [_blank(i) for i in unlabelled]
        else:
            context = labelled if uses_labelled(strategy) else []
            scores = learner.score(current, [*unlabelled, *context])
            scored = [_candidate(i, s) for i, s in zip([*unlabelled, *context], scores, strict=True)]
            pool, known = scored[: len(unlabelled)], scored[len(unlabelled) :]
        picked = strategy.select(pool, config.batch, rng, known)
        score_seconds = time.monotonic() - t0
        if len(set(picked)) != len(picked) or any(i in in_set for i in picked):
            raise RuntimeError(f"strategy {strategy_name} returned a repeat or a labelled image: {picked}")
        labelled.extend(picked)
        in_set.update(picked)
        t0 = time.monotonic()
        tag = f"seed{seed}-{strategy_name}-round{r}"
        fitted = learner.fit(labelled, current, seed=seed, minutes=config.minutes_per_round, tag=tag)
        train_seconds = time.monotonic() - t0
        if current != model:
            learner.release(current)
        current = fitted
        dice = learner.evaluate(current)
        records.append(RoundRecord(r, len(labelled), dice, tuple(picked), train_seconds, score_seconds))
        if step is not None:
            step(f"{strategy_name} seed {seed} round {r}: {len(labelled)} labels, Dice {dice:.3f}")
    if current != model:
        learner.release(current)
    return records


def _candidate(index: int, s: FrameScores) -> Candidate:
    return Candidate(
        image_id=index,
        entropy=float(s.entropy),
        tta_disagreement=float(s.tta_disagreement),
        boundary_uncertainty=float(s.boundary_uncertainty),
        foreground_fraction=float(s.foreground_fraction),
        embedding=np.asarray(s.embedding, np.float32),
    )


def _blank(index: int) -> Candidate:
    return Candidate(index, 0.0, 0.0, 0.0, 0.0, np.ones(1, np.float32))


# -- metrics --------------------------------------------------------------------------------------


def aubc(rounds: Sequence[RoundRecord]) -> float:
    """Normalised area under Dice vs labels (trapezoids); a single round is its own Dice."""
    xs = np.array([r.labels for r in rounds], np.float64)
    ys = np.array([r.dice for r in rounds], np.float64)
    return curve_area(xs, ys)


def curve_area(xs: NDArray[np.float64], ys: NDArray[np.float64]) -> float:
    if xs.size == 0:
        return math.nan
    if xs.size == 1 or xs[-1] == xs[0]:
        return float(ys.mean())
    widths = np.diff(xs)
    area = float((widths * (ys[1:] + ys[:-1]) / 2).sum())
    return area / float(xs[-1] - xs[0])


def labels_to_reach(rounds: Sequence[RoundRecord], target: float | None) -> int | None:
    if target is None:
        return None
    return first_at_or_above([r.labels for r in rounds], [r.dice for r in rounds], target)


def first_at_or_above(labels: Sequence[int], dice: Sequence[float], target: float) -> int | None:
    for x, y in zip(labels, dice, strict=True):
        if y >= target:
            return int(x)
    return None


def summarise(strategy: str, runs: Sequence[RunRecord], target: float | None) -> StrategySummary:
    """Mean and band over seeds (rounds aligned by index; a seed that stopped early is cut off)."""
    aubcs = {run.seed: run.aubc for run in runs}
    length = min(len(run.rounds) for run in runs)
    dice = np.array([[r.dice for r in run.rounds[:length]] for run in runs], np.float64)
    labels = tuple(int(r.labels) for r in runs[0].rounds[:length])
    mean = dice.mean(0)
    values = np.array(list(aubcs.values()), np.float64)
    return StrategySummary(
        strategy=strategy,
        aubc_mean=float(values.mean()),
        aubc_std=float(values.std(ddof=1)) if values.size > 1 else 0.0,
        aubc_per_seed=aubcs,
        labels_to_target_per_seed={run.seed: run.labels_to_target for run in runs},
        labels_to_target_mean_curve=None if target is None else first_at_or_above(labels, list(mean), target),
        labels=labels,
        dice_mean=tuple(float(v) for v in mean),
        dice_min=tuple(float(v) for v in dice.min(0)),
        dice_max=tuple(float(v) for v in dice.max(0)),
    )


def plot_learning_curves(result: SimulationResult, path: Path) -> None:
    """Foreground Dice vs labelled images: per strategy the mean over seeds and the min-max band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for s in result.summaries:
        (line,) = ax.plot(
            s.labels, s.dice_mean, marker="o", markersize=3, label=f"{s.strategy} (AUBC {s.aubc_mean:.3f})"
        )
        if len(result.config.seeds) > 1:
            ax.fill_between(s.labels, s.dice_min, s.dice_max, color=line.get_color(), alpha=0.15, linewidth=0)
    if result.full_pool_dice is not None and result.target_dice is not None:
        ax.axhline(
            result.full_pool_dice,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"full pool ({result.pool_size} labels)",
        )
        ax.axhline(
            result.target_dice,
            color="grey",
            linestyle=":",
            linewidth=1,
            label=f"{result.config.target_fraction:.0%} of full pool",
        )
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test foreground Dice")
    seeds = len(result.config.seeds)
    ax.set_title(
        f"active learning: mean over {seeds} seed{'s' if seeds > 1 else ''}" + (", band min-max" if seeds > 1 else "")
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
