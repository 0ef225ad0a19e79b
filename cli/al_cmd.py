"""``sonoseg al``: active learning. ``al simulate`` measures strategies on a fully labelled dataset.

The loop lives in :mod:`backend.active_learning.simulate`, the model work in
:class:`backend.model.simulation.PoolLearner`; this module parses options, wires the two together
and writes the results (docs/active-learning.md, "Strategies and simulation").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from backend.errors import SonosegError
from cli.context import CliContext, fail, pass_ctx

log = logging.getLogger(__name__)

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group("al")
def al() -> None:
    """Active learning: which frames to label next, and how much that saves."""


@al.command("simulate")
@click.option("--images", "images_dir", type=_DIR, required=True, help="Pool: folder of labelled frames.")
@click.option("--masks", "masks_dir", type=_DIR, required=True, help="Pool masks, same file names.")
@click.option("--test-images", "test_images_dir", type=_DIR, required=True, help="Evaluation frames (never acquired).")
@click.option("--test-masks", "test_masks_dir", type=_DIR, required=True, help="Evaluation masks.")
@click.option("--labels", required=True, help="Foreground class names in mask-value order, e.g. Nerve,Vessel.")
@click.option(
    "--strategies",
    default="random,fg_random,entropy,default",
    show_default=True,
    help="Comma-separated strategies to compare.",
)
@click.option("--start", type=int, default=10, show_default=True, help="Images labelled before round 1 (random).")
@click.option("--batch", type=int, default=10, show_default=True, help="Images acquired per round.")
@click.option("--rounds", type=int, default=5, show_default=True, help="Acquisition rounds after round 0.")
@click.option("--minutes-per-round", type=float, default=2.0, show_default=True, help="Training budget of each round.")
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds 0..N-1 (start set, training, sampling).")
@click.option(
    "--first-seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Run seeds K..K+N-1 instead: more seeds of an earlier comparison, in a second run.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="A new or empty folder: rounds.json, learning_curve.png, train_config.json.",
)
@click.option("--preset", default="cpu_small", show_default=True, help="Model preset (training config and network).")
@click.option(
    "--init", "init_path", type=_FILE, default=None, help="Start round 0 and the full-pool run from this checkpoint."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=int, default=None, help="Torch threads per job (default: torch's).")
@click.option("--jobs", type=int, default=1, show_default=True, help="Strategy runs in parallel processes.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs per round (default: the preset's).")
@click.option("--iterations", type=int, default=None, help="Iterations per epoch (default: the preset's).")
@click.option("--train-batch-size", type=int, default=None, help="Training batch size (default: the preset's).")
@click.option(
    "--val-fraction",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of each round's labelled images held out to pick the best epoch (0: the last, lowest-loss one).",
)
@click.option("--full-pool/--no-full-pool", default=True, show_default=True, help="Train the whole-pool reference.")
@click.option("--full-pool-minutes", type=float, default=None, help="Default: (rounds + 1) x minutes per round.")
@click.option(
    "--param",
    "params",
    multiple=True,
    help="A strategy parameter, STRATEGY.NAME=JSON (e.g. default.beta=2, default.weights=[1,0,1]); repeatable.",
)
@click.option(
    "--train-param",
    "train_params",
    multiple=True,
    help="A training-config field, NAME=JSON (e.g. finetune_warmup=0.2, learning_rate=1e-3); repeatable.",
)
@click.option("--keep-checkpoints", is_flag=True, help="Keep every round's checkpoint under OUT/checkpoints.")
def simulate_cmd(
    images_dir: Path,
    masks_dir: Path,
    test_images_dir: Path,
    test_masks_dir: Path,
    labels: str,
    strategies: str,
    start: int,
    batch: int,
    rounds: int,
    minutes_per_round: float,
    seeds: int,
    first_seed: int,
    out_dir: Path,
    preset: str,
    init_path: Path | None,
    device: str,
    threads: int | None,
    jobs: int,
    epochs: int | None,
    iterations: int | None,
    train_batch_size: int | None,
    val_fraction: float,
    full_pool: bool,
    full_pool_minutes: float | None,
    params: tuple[str, ...],
    train_params: tuple[str, ...],
    keep_checkpoints: bool,
) -> None:
    """Simulate active learning on IMAGES/MASKS and score every round on TEST-IMAGES/TEST-MASKS.

    Per seed, a random start set is trained (round 0); then per strategy and round the rest of the
    pool is scored by the current model, a batch acquired, the model fine-tuned from the previous
    round's within the budget and evaluated (foreground Dice). Writes OUT/rounds.json (every
    round, AUBC per strategy and seed, labels to reach 95% of the full-pool Dice) and
    OUT/learning_curve.png.
    """
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise click.UsageError(f"--out {out_dir} must be a new or empty folder")
    if seeds < 1:
        raise click.UsageError("--seeds must be >= 1")
    try:
        from backend.active_learning.simulate import SimulationConfig, plot_learning_curves, simulate
        from backend.model.data import load_pairs_from_dirs
        from backend.model.simulation import PoolLearner
        from backend.model.train_config import training_preset
        from cli.progress import progress_callback

        classes = [c.strip() for c in labels.split(",") if c.strip()]
        sim_config = SimulationConfig(
            strategies=tuple(s.strip() for s in strategies.split(",") if s.strip()),
            start=start,
            batch=batch,
            rounds=rounds,
            minutes_per_round=minutes_per_round,
            seeds=tuple(range(first_seed, first_seed + seeds)),
            full_pool=full_pool,
            full_pool_minutes=full_pool_minutes,
            jobs=jobs,
            strategy_params=_parse_params(params),
        )
        pool = load_pairs_from_dirs(images_dir, masks_dir, classes)
        test = load_pairs_from_dirs(test_images_dir, test_masks_dir, classes)
        overrides: dict[str, Any] = {"device": device, "val_fraction": val_fraction, "num_threads": threads}
        for key, value in (("epochs", epochs), ("iterations_per_epoch", iterations), ("batch_size", train_batch_size)):
            if value is not None:
                overrides[key] = value
        overrides.update(_parse_train_params(train_params))
        train_config = training_preset(preset).replace(**overrides)
        out_dir.mkdir(parents=True, exist_ok=True)
        learner = PoolLearner(
            pool.pairs,
            test.pairs,
            classes,
            train_config,
            out_dir / "checkpoints",
            initial=init_path,
            device=device,
            keep_checkpoints=keep_checkpoints,
        )
        n_fits = len(sim_config.seeds) * (1 + len(sim_config.strategies) * rounds) + int(full_pool)
        click.echo(
            f"pool {len(pool.pairs)} images, test {len(test.pairs)}; strategies {', '.join(sim_config.strategies)}; "
            f"{len(sim_config.seeds)} seeds x {rounds} rounds of {batch} from {start}; "
            f"{minutes_per_round:g} min per round ({n_fits} trainings, at most "
            f"{_planned_minutes(sim_config, n_fits):.0f} min of training)"
        )
        with progress_callback("simulating", total=n_fits, unit="model") as tick:

            def on_step(what: str) -> None:
                log.info("%s", what)
                tick()

            result = simulate(learner, sim_config, names=list(pool.names or ()), on_step=on_step)
        result.write_json(out_dir / "rounds.json")
        (out_dir / "train_config.json").write_text(train_config.to_json() + "\n")
        plot_learning_curves(result, out_dir / "learning_curve.png")
        if not keep_checkpoints:
            try:
                (out_dir / "checkpoints").rmdir()
            except OSError:
                pass
    except SonosegError as exc:
        raise click.ClickException(exc.message) from exc
    for line in summary_lines(result.to_dict()):
        click.echo(line)
    click.echo(f"wrote {out_dir / 'rounds.json'} and {out_dir / 'learning_curve.png'}")


def _planned_minutes(config: Any, n_fits: int) -> float:
    full = (config.full_pool_minutes or config.total_minutes) if config.full_pool else 0.0
    return float((n_fits - int(config.full_pool)) * config.minutes_per_round + full)


def _parse_train_params(params: tuple[str, ...]) -> dict[str, Any]:
    """``--train-param NAME=JSON`` items as TrainConfig overrides (names checked, values by the config)."""
    from dataclasses import fields

    from backend.model.train_config import TrainConfig

    known = {f.name for f in fields(TrainConfig)} - {"augment", "device", "num_threads", "seed", "max_minutes"}
    out: dict[str, Any] = {}
    for item in params:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise click.UsageError(f"--train-param {item!r}: expected NAME=VALUE")
        if name not in known:
            raise click.UsageError(f"--train-param {name!r}: not a training field; known: {', '.join(sorted(known))}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def _parse_params(params: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in params:
        key, sep, raw = item.partition("=")
        strategy, dot, name = key.partition(".")
        if not sep or not dot or not strategy or not name:
            raise click.UsageError(f"--param {item!r}: expected STRATEGY.NAME=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(strategy.strip(), {})[name.strip()] = value
    return out


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The table ``al simulate`` prints: AUBC and labels to target per strategy."""
    full = report["full_pool"]
    lines = []
    if full["dice"] is not None:
        lines.append(
            f"full pool: {full['labels']} labels, Dice {full['dice']:.4f}; "
            f"target {full['target_fraction']:.0%} = {full['target_dice']:.4f}"
        )
    lines.append(
        f"{'strategy':<12}{'AUBC mean':>10}{'std':>8}  {'AUBC per seed':<28}{'labels to target (per seed; mean curve)'}"
    )
    for name, s in report["summary"].items():
        per_seed = " ".join(f"{v:.3f}" for v in s["aubc_per_seed"].values())
        reach = " ".join("-" if v is None else str(v) for v in s["labels_to_target_per_seed"].values())
        mean_curve = "-" if s["labels_to_target_mean_curve"] is None else str(s["labels_to_target_mean_curve"])
        lines.append(f"{name:<12}{s['aubc_mean']:>10.4f}{s['aubc_std']:>8.4f}  {per_seed:<28}{reach}; {mean_curve}")
    return lines


@al.command("publish")
@click.option("--project", "project_name", required=True, help="Project name or id (linked to Label Studio).")
@click.option(
    "--annotator",
    "annotators",
    multiple=True,
    help="A sonographer's Label Studio e-mail; repeat it: each gets a tab of their own share of the ranking.",
)
@click.option("--strategy", default=None, help="Override the project's strategy for this ranking.")
@click.option("--seed", type=int, default=None, help="Seed of the strategy's random choices (default: fresh).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
@pass_ctx
def publish(
    c: CliContext, project_name: str, annotators: tuple[str, ...], strategy: str | None, seed: int | None, as_json: bool
) -> None:
    """Make Label Studio's label stream follow sonoseg's ranking of the project's unlabelled frames.

    Ranks the pool with the serving model's cached scores (docs/active-learning.md), writes each
    task's place into its data (``sonoseg_rank``) and keeps the tab "sonoseg: next to label" (and
    one tab per --annotator) ordered by it, with Sequential sampling (docs/labelstudio.md).
    """
    import numpy as np

    from backend.db.session import unit_of_work
    from backend.services.ls_ranking import publish_ranking, ranks_in_order
    from backend.services.projects import get_project
    from backend.services.worklist import rank_pool

    try:
        with unit_of_work(c.factory) as session:  # the ranking; Label Studio is written after the commit
            ranked = rank_pool(
                session,
                get_project(session, project_name),
                strategy=strategy,
                rng=np.random.default_rng(seed),
            )
        if ranked.ls_project_id is None:
            raise click.ClickException(
                f"project {project_name!r} is not linked to Label Studio: `sonoseg project link` or `create-ls` first"
            )
        client = c.runtime.fetcher.client
        if client is None:
            raise click.ClickException("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to talk to Label Studio")
        result = publish_ranking(
            client, ranked.ls_project_id, ranks_in_order(ranked.ranked_task_ids()), annotators=annotators
        )
    except SonosegError as exc:
        raise fail(exc) from exc
    if as_json:
        body = {"strategy": ranked.strategy, "model_version": ranked.model_version, **result.to_json()}
        click.echo(json.dumps(body, indent=2, default=str))
        return
    click.echo(
        f"Label Studio project {result.ls_project_id}: {result.tasks_ranked} task(s) ranked by {ranked.strategy!r} "
        f"(model {ranked.model_version or 'none yet: random order'}), {result.tasks_updated} updated, "
        f'{result.tasks_unchanged} unchanged; tab {result.view_id} "sonoseg: next to label"'
    )
    for annotator, view_id in result.annotator_views.items():
        click.echo(f"  {annotator}: tab {view_id}")
    if result.missing:
        click.echo(f"  {len(result.missing)} ranked task(s) no longer in Label Studio: run `sonoseg sync`", err=True)
