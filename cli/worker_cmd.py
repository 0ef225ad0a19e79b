"""``sonoseg worker | beat | train | evaluate | predict | retrain-policy``: the retraining loop.

``worker`` and ``beat`` build the Celery app from Settings (workers/celery_app.py) and hand over
to Celery; extra arguments after ``--`` go to Celery unchanged. ``train`` and ``predict`` queue
work for the workers, or run it in this process with ``--inline`` (no broker needed).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any

import click

from backend.errors import SonosegError
from cli.context import CliContext, fail, pass_ctx

QUEUE_CHOICES = ("train", "predict", "housekeeping")
# After Celery's own shutdown, how long the worker waits for the processes it started (pool
# children, the embedded beat) before it kills them; see docs/workers.md.
SHUTDOWN_TIMEOUT_SECONDS = 10.0


def _celery_app(c: CliContext) -> Any:
    from workers.celery_app import make_celery

    return make_celery(c.settings)


def _require_database(c: CliContext) -> None:
    try:
        _ = c.factory  # refuses an un-migrated database, saying what to run
    except SonosegError as exc:
        raise fail(exc) from exc


@click.command("worker", context_settings={"ignore_unknown_options": True})
@click.option(
    "-Q",
    "--queues",
    default=",".join(QUEUE_CHOICES),
    show_default=True,
    help="Comma-separated queues to consume. GPU machines: train (and predict).",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes. Keep 1 per GPU for the train queue.",
)
@click.option("-P", "--pool", type=click.Choice(["prefork", "solo", "threads"]), default="prefork", show_default=True)
@click.option(
    "-B",
    "--beat/--no-beat",
    "with_beat",
    default=False,
    help="Also run the beat scheduler in this worker (single-machine setups; exactly one per deployment).",
)
@click.option("-n", "--hostname", default=None, help="Node name (default sonoseg-<queues>@<host>).")
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=SHUTDOWN_TIMEOUT_SECONDS,
    show_default=True,
    help="Seconds to wait, once Celery has shut down, for the processes this worker started "
    "(pool, embedded beat) before killing them.",
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def worker(
    c: CliContext,
    queues: str,
    concurrency: int,
    pool: str,
    with_beat: bool,
    hostname: str | None,
    shutdown_timeout: float,
    celery_args: tuple[str, ...],
) -> None:
    """Run a Celery worker for training, batch prediction and housekeeping.

    Broker and result backend come from SONOSEG_BROKER_URL / SONOSEG_RESULT_BACKEND (default: SQLite
    files in the data directory, no service needed). Arguments after `--` go to `celery worker`.

    SIGTERM: warm shutdown (the running task finishes); SIGINT: cold. Either way, no process this
    worker started outlives it: what is left when Celery returns gets SIGTERM, then SIGKILL after
    --shutdown-timeout; the embedded beat is also killed by the kernel if the worker dies.
    """
    from workers.celery_app import is_embedded_broker

    names = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(names) - set(QUEUE_CHOICES))
    if not names or unknown:
        raise click.BadParameter(
            f"unknown queue(s) {unknown}; choose from {', '.join(QUEUE_CHOICES)}", param_hint="--queues"
        )
    _require_database(c)
    app = _celery_app(c)
    argv = [
        "worker",
        f"--queues={','.join(names)}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--loglevel={c.settings.log_level.upper()}",
        f"--hostname={hostname or 'sonoseg-' + '-'.join(names) + '@%h'}",
    ]
    if is_embedded_broker(c.settings.broker_url):
        argv += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    if with_beat:
        argv += ["--beat", f"--schedule={c.settings.data_dir / 'celerybeat-schedule'}"]
    try:
        app.worker_main([*argv, *celery_args])
    finally:
        _end_children(shutdown_timeout)


def _end_children(timeout: float) -> None:
    """The worker's last step: no child (pool process, embedded beat, anything a task started)
    outlives it. Celery stops the embedded beat with one SIGTERM and never waits for it."""
    import logging

    from backend.processes import end_descendants

    killed = end_descendants(timeout)
    if killed:
        logging.getLogger(__name__).warning(
            "killed %d process(es) still running %.0f s after shutdown: %s",
            len(killed),
            timeout,
            ", ".join(f"{p.pid} ({p.command})" for p in killed),
        )


@click.command("beat", context_settings={"ignore_unknown_options": True})
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def beat(c: CliContext, celery_args: tuple[str, ...]) -> None:
    """Run the beat scheduler: dispatch due runs, reap dead ones, drain webhooks, nightly retrain.

    Run exactly one per deployment (or use `sonoseg worker --beat` on a single machine).
    """
    _require_database(c)
    app = _celery_app(c)
    app.start(
        [
            "beat",
            f"--schedule={c.settings.data_dir / 'celerybeat-schedule'}",
            f"--loglevel={c.settings.log_level.upper()}",
            *celery_args,
        ]
    )


@click.command("train")
@click.option("--project", "project_name", required=True, help="Project name or id.")
@click.option("--from-scratch", is_flag=True, help="Do not fine-tune from the serving model.")
@click.option("--inline", is_flag=True, help="Train in this process now instead of on a worker (no broker needed).")
@pass_ctx
def train(c: CliContext, project_name: str, from_scratch: bool, inline: bool) -> None:
    """Queue a training run for a project (single-flight: at most one active run per project).

    The run trains within the project's budget (SONOSEG_TRAIN_MAX_MINUTES or the project's own),
    registers a candidate version and promotes it if it passes the gate. Offline experiments on
    files: `sonoseg model train`.
    """
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project
    from backend.services.training.requests import request_training

    try:
        with unit_of_work(c.factory) as session:
            project = get_project(session, project_name)
            run = request_training(session, project, "manual", from_scratch=from_scratch)
            run_id, pid = (run.id if run else None), project.id
    except SonosegError as exc:
        raise fail(exc) from exc
    if run_id is None:
        click.echo(f"project {pid} already has an active run; another run will start when it ends")
        return
    if inline:
        _train_inline(c, run_id)
        return
    try:
        from workers.tasks.training import send_run

        send_run(_celery_app(c), run_id)
        click.echo(f"run {run_id} queued for project {pid}; follow it with `sonoseg status`")
    except Exception as exc:
        click.echo(
            f"run {run_id} queued for project {pid}; the broker did not take the message "
            f"({type(exc).__name__}), the beat dispatcher will send it",
            err=True,
        )


def _train_inline(c: CliContext, run_id: int) -> None:
    from backend.db.session import unit_of_work
    from backend.services.training.execute import execute_run
    from backend.services.training.queue import claim_run

    with unit_of_work(c.factory) as session:
        claimed = claim_run(session, run_id, worker=f"cli {socket.gethostname()} pid {os.getpid()}", task_id=None)
    if claimed is None:
        raise click.ClickException(f"run {run_id} could not be claimed (taken by a worker?)")

    def show(progress: dict[str, Any]) -> None:
        if progress.get("phase") == "training" and "epoch" in progress:
            click.echo(f"  epoch {progress['epoch']} loss {progress.get('loss')} val_dice {progress.get('val_dice')}")

    outcome = execute_run(c.factory, c.store, c.settings, claimed, on_progress=show)
    if outcome.status != "succeeded":
        raise click.ClickException(f"run {run_id} {outcome.status}: {outcome.error}")
    state = "serving" if outcome.promoted else "candidate"
    click.echo(
        f"run {run_id} succeeded on {outcome.device}: {outcome.model_version_uid} is {state} ({outcome.gate_reason})"
    )


@click.command("evaluate")
@click.option("--project", "project_name", required=True)
@click.option("--version", "version", default=None, help="Model version uid or id (default: the serving one).")
@click.option(
    "--split",
    type=click.Choice(["val", "test"]),
    default="val",
    show_default=True,
    help="Held-out split to score on (test: report only, never for choosing models).",
)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def evaluate(c: CliContext, project_name: str, version: str | None, split: str, as_json: bool) -> None:
    """Score a registered model version on a project's held-out labels (foreground Dice, IoU)."""
    from backend.db.session import unit_of_work
    from backend.model.checkpoint import load_checkpoint
    from backend.services.projects import get_project
    from backend.services.training.plan import (
        evaluate_checkpoint,
        labelled_images,
        load_pairs,
    )
    from backend.services.versions import get_version, serving_version

    try:
        with unit_of_work(c.factory) as session:
            project = get_project(session, project_name)
            mv = get_version(session, version) if version else serving_version(session, project.id)
            if mv is None:
                raise click.ClickException(f"project {project.name!r} has no serving model; pass --version")
            if mv.project_id != project.id or not mv.checkpoint_key:
                raise click.ClickException(
                    f"version {mv.uid} does not belong to project {project.name!r} or has no checkpoint"
                )
            uid, key, sha, classes = mv.uid, mv.checkpoint_key, mv.checkpoint_sha256, tuple(project.class_names)
            items = labelled_images(session, project.id, split)
        if not items:
            raise click.ClickException(f"no labelled {split} image in project {project_name!r}")
        checkpoint = load_checkpoint(c.store.local_path(key), expected_sha256=sha)
        result = evaluate_checkpoint(
            checkpoint, items, load_pairs(c.store, items), classes, uid=uid, device=c.settings.device
        )
    except SonosegError as exc:
        raise fail(exc) from exc
    summary = {"version": uid, "split": split, "n_images": result.n_images, **result.metrics}
    if as_json:
        click.echo(json.dumps({**summary, "report": result.report}, default=str))
        return
    click.echo(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


@click.command("predict")
@click.option("--project", "project_name", required=True)
@click.option("--inline", is_flag=True, help="Predict in this process now instead of on a worker.")
@pass_ctx
def predict(c: CliContext, project_name: str, inline: bool) -> None:
    """Re-predict a Label Studio project's unlabelled tasks with the serving model (writes predictions
    to Label Studio). Offline prediction of files: `sonoseg model predict`."""
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project

    try:
        with unit_of_work(c.factory) as session:
            pid = get_project(session, project_name).id
    except SonosegError as exc:
        raise fail(exc) from exc
    if inline:
        from backend.services.repredict import repredict_unlabelled

        try:
            report = repredict_unlabelled(c.runtime.mirror, c.settings, pid, None)
        except SonosegError as exc:
            raise fail(exc) from exc
        click.echo(json.dumps(report.to_json()))
        if report.failed:
            sys.exit(1)
        return
    from workers.names import TASK_PREDICT_PROJECT

    _celery_app(c).send_task(TASK_PREDICT_PROJECT, args=[pid, None])
    click.echo(f"re-prediction of project {pid} queued on the predict queue")


@click.command("retrain-policy")
@click.option("--project", "project_name", required=True)
@click.option(
    "--after",
    "retrain_after",
    type=click.IntRange(min=0),
    default=None,
    help="Retrain after this many new/changed training labels (0: never automatically).",
)
@click.option(
    "--max-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Wall-clock budget of one run for this project.",
)
@click.option("--auto/--no-auto", "auto", default=None, help="Automatic runs (count and nightly) on or off.")
@click.option("--reset", is_flag=True, help="Drop the project's overrides: use the settings' values.")
@pass_ctx
def retrain_policy(
    c: CliContext,
    project_name: str,
    retrain_after: int | None,
    max_minutes: float | None,
    auto: bool | None,
    reset: bool,
) -> None:
    """Show or change a project's retraining policy (overrides of SONOSEG_RETRAIN_AFTER and
    SONOSEG_TRAIN_MAX_MINUTES, and whether it retrains automatically)."""
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project
    from backend.services.training.policy import policy_for
    from backend.services.training.requests import changed_since_last_version

    try:
        with unit_of_work(c.factory) as session:
            project = get_project(session, project_name)
            if reset:
                project.retrain_after = None
                project.train_max_minutes = None
                project.auto_retrain = True
            if retrain_after is not None:
                project.retrain_after = retrain_after
            if max_minutes is not None:
                project.train_max_minutes = max_minutes
            if auto is not None:
                project.auto_retrain = auto
            session.flush()
            policy = policy_for(project, c.settings)
            changed = changed_since_last_version(session, project)
            name = project.name
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(
        f"project {name!r}: auto={policy.auto} retrain_after={policy.retrain_after} "
        f"debounce={policy.debounce_seconds:g}s max_minutes={policy.max_minutes:g} "
        f"changed_training_labels={changed}"
    )


COMMANDS = (worker, beat, train, evaluate, predict, retrain_policy)
