"""The ``sonoseg`` command line. Each command parses options, calls the core, prints the result.

Command groups that belong to one subsystem live in their own module (``model_cmd``: the
offline U-Mamba engine; ``serve_cmd``: the Label Studio backend; ``worker_cmd``: the Celery workers and
the retraining loop) and are registered here.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from backend import __version__
from backend.errors import SonosegError
from backend.settings import Settings
from cli.context import CliContext, fail, pass_ctx, setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sonoseg")
@click.option("--log-level", default=None, help="Override SONOSEG_LOG_LEVEL (DEBUG, INFO, WARNING...).")
@click.pass_context
def cli(ctx: click.Context, log_level: str | None) -> None:
    """sonoseg: U-Mamba pre-annotations for Label Studio, retrained on sonographers' corrections.

    Configuration comes from SONOSEG_* environment variables (see README.md).
    """
    try:
        settings = Settings.from_env()
    except SonosegError as exc:
        raise fail(exc) from exc
    ctx.obj = CliContext(settings)
    setup_logging(log_level or settings.log_level)


# -- db ------------------------------------------------------------------------------------------
@cli.group()
def db() -> None:
    """Database schema: migrate, inspect."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target Alembic revision.")
@pass_ctx
def db_upgrade(c: CliContext, revision: str) -> None:
    """Create or migrate the database to the latest schema (safe to run repeatedly)."""
    from backend.db.migrate import current_revision, upgrade
    from backend.services.pseudonyms import load_or_create_key

    before = current_revision(c.engine)
    upgrade(c.engine, revision, pseudonym_key=load_or_create_key(c.settings.data_dir))
    after = current_revision(c.engine)
    url = c.engine.url.render_as_string(hide_password=True)
    click.echo(f"database {url}: {before or 'empty'} -> {after}")


@db.command("current")
@pass_ctx
def db_current(c: CliContext) -> None:
    """Print the database's schema revision and the one this sonoseg needs."""
    from backend.db.migrate import current_revision, head_revision

    click.echo(f"current: {current_revision(c.engine) or 'empty'}\nrequired: {head_revision()}")


# -- dataset -------------------------------------------------------------------------------------
@cli.group()
def masks() -> None:
    """Labels held back for a person to decide: list them, choose a version."""


@masks.command("issues")
@click.option("--project", "project_name", default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_ctx
def masks_issues(c: CliContext, project_name: str | None, as_json: bool) -> None:
    """Open label issues: refused annotations (unknown labels) and conflicting duplicates."""
    import dataclasses

    from backend.db.session import unit_of_work
    from backend.services.label_issues import open_issues
    from backend.services.projects import get_project

    try:
        with unit_of_work(c.factory) as session:
            pid = get_project(session, project_name).id if project_name else None
            issues = open_issues(session, pid, limit=10_000)
    except SonosegError as exc:
        raise fail(exc) from exc
    if not issues and not as_json:
        click.echo("no open label issues")
    for issue in issues:
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(issue)))
        else:
            click.echo(
                f"issue {issue.id} project={issue.project_id} {issue.kind} image={issue.image_id} "
                f"versions={list(issue.mask_version_ids)}: {issue.detail}"
            )


@masks.command("choose")
@click.option("--image", "image_id", required=True, type=int, help="Image id (from `sonoseg masks issues`).")
@click.option("--version", "version", required=True, type=int, help="The mask version to use as its label.")
@pass_ctx
def masks_choose(c: CliContext, image_id: int, version: int) -> None:
    """Make VERSION the image's label (resolves its conflicting-duplicate issue)."""
    from backend.db.session import unit_of_work
    from backend.services.label_issues import choose_version

    try:
        with unit_of_work(c.factory) as session:
            chosen = choose_version(session, image_id, version)
            summary = f"image {image_id}: version {chosen.version} ({chosen.source}) is its label"
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(summary)


@cli.group()
def sources() -> None:
    """Where images came from (stored as keyed pseudonyms, never as paths)."""


@sources.command("find")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_ctx
def sources_find(c: CliContext, paths: tuple[Path, ...]) -> None:
    """The images imported from these files (found by the files' pseudonym or content hash)."""
    from backend.db.session import unit_of_work
    from backend.services.images import find_sources

    try:
        with unit_of_work(c.factory) as session:
            found = find_sources(session, c.settings.data_dir, list(paths))
    except SonosegError as exc:
        raise fail(exc) from exc
    for path, rows in found:
        if not rows:
            click.echo(f"{path}: not imported")
        for row in rows:
            click.echo(f"{path}: image {row.image_id} (project {row.project_id}), matched by {row.matched_by}")


# -- models --------------------------------------------------------------------------------------
@cli.group()
def models() -> None:
    """Model versions: list, promote, roll back."""


@models.command("list")
@click.option("--project", "project_name", default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_ctx
def models_list(c: CliContext, project_name: str | None, as_json: bool) -> None:
    """List model versions with status and headline metrics."""
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project
    from backend.services.versions import list_versions

    try:
        with unit_of_work(c.factory) as session:
            pid = get_project(session, project_name).id if project_name else None
            rows = [
                (v.uid, v.project_id, v.status, v.metrics, v.created_at, v.gate_reason)
                for v in list_versions(session, pid)
            ]
    except SonosegError as exc:
        raise fail(exc) from exc
    if not rows:
        click.echo("no model versions yet")
    for uid, pid_, status, metrics, created, reason in rows:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "uid": uid,
                        "project": pid_,
                        "status": status,
                        "metrics": metrics,
                        "created_at": created.isoformat(),
                        "reason": reason,
                    }
                )
            )
        else:
            dice = metrics.get("fg_mDice")
            click.echo(
                f"{uid:40s} project={pid_} {status:9s} fg_mDice={dice if dice is not None else '-'} "
                f"{created:%Y-%m-%d %H:%M}  {reason or ''}"
            )


@models.command("promote")
@click.argument("version")
@pass_ctx
def models_promote(c: CliContext, version: str) -> None:
    """Make VERSION (uid or id) the serving model of its project. Servers pick it up within seconds."""
    from backend.db.session import unit_of_work
    from backend.services.versions import get_version, promote

    try:
        with unit_of_work(c.factory) as session:
            mv = get_version(session, version)
            previous = promote(session, mv, reason="promoted by hand (sonoseg models promote)")
            uid = mv.uid
            prev_uid = previous.uid if previous else None
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(f"{uid} is serving" + (f" (was {prev_uid})" if prev_uid else ""))


@models.command("register")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--project", "project_name", required=True)
@click.option("--promote-if-better", is_flag=True, help="Promote when the gate passes (as a training run's candidate).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def models_register(c: CliContext, checkpoint: Path, project_name: str, promote_if_better: bool, as_json: bool) -> None:
    """Register a checkpoint trained offline (`sonoseg model train`) as a candidate version of a project."""
    from backend.db.session import unit_of_work
    from backend.services.offline_models import register_checkpoint
    from backend.services.projects import get_project

    try:
        with unit_of_work(c.factory) as session:
            project_id = get_project(session, project_name).id
        done = register_checkpoint(
            c.factory, c.store, c.settings, project_id, checkpoint, promote_if_better=promote_if_better
        )
    except SonosegError as exc:
        raise fail(exc) from exc
    if as_json:
        click.echo(
            json.dumps(
                {
                    "uid": done.uid,
                    "id": done.version_id,
                    "arch": done.arch,
                    "n_val": done.n_val,
                    "promoted": done.promoted,
                    "gate_reason": done.decision.reason,
                    "candidate_score": done.decision.candidate_score,
                    "serving_score": done.decision.serving_score,
                }
            )
        )
    else:
        state = "serving" if done.promoted else "candidate"
        click.echo(
            f"{done.uid} registered ({state}, {done.arch}, {done.n_val} validation images): {done.decision.reason}"
        )


@models.command("rollback")
@click.option("--project", "project_name", required=True)
@pass_ctx
def models_rollback(c: CliContext, project_name: str) -> None:
    """Serve the version that served before the current one."""
    from backend.db.session import unit_of_work
    from backend.services.projects import get_project
    from backend.services.versions import rollback

    try:
        with unit_of_work(c.factory) as session:
            project = get_project(session, project_name)
            uid = rollback(session, project.id).uid
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(f"rolled back: {uid} is serving")


# -- status --------------------------------------------------------------------------------------
@cli.command("status")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def status_cmd(c: CliContext, as_json: bool) -> None:
    """Database revision, projects, images, labels, serving models, recent training runs."""
    from backend.services.status import collect_status

    try:
        report = collect_status(c.engine, c.store, settings=c.settings)
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(json.dumps(report, indent=2, default=str) if as_json else report_text(report))


def report_text(report: dict) -> str:  # type: ignore[type-arg]
    lines = [f"database: {report['database']} (revision {report['revision']}, required {report['required_revision']})"]
    for p in report["projects"]:
        lines.append(
            f"project {p['id']} {p['name']!r} (Label Studio {p['ls_project_id']}): {p['images']} images, "
            f"{p['labelled']} labelled, serving {p['serving'] or 'none'}, retrain pending: {p['retrain_pending']}"
        )
        for r in p["runs"]:
            err = f" error: {r['error']}" if r["error"] else ""
            lines.append(f"  run {r['id']} {r['trigger']} {r['status']} on {r['device'] or '-'} {r['created_at']}{err}")
    if not report["projects"]:
        lines.append("no projects yet: `sonoseg import --project NAME FILES...` or connect Label Studio")
    if report.get("label_issues_open"):
        lines.append(f"label issues: {report['label_issues_open']} open (`sonoseg masks issues` lists them all)")
        for issue in report["label_issues"]:
            lines.append(f"  issue {issue['id']} {issue['kind']} image {issue['image']}: {issue['detail']}")
    if report.get("webhook_events_failed"):
        lines.append(f"webhook events failed: {report['webhook_events_failed']}")
        for event in report["webhook_failures"]:
            lines.append(f"  event {event['id']} {event['action']} {event['received_at']}: {event['error']}")
    if report["store_temp_files"]:
        lines.append(f"warning: {report['store_temp_files']} leftover temp file(s) in the store")
    sched = report.get("scheduler")
    if sched:
        verdict = {True: "ok", False: "WARNING"}.get(sched["ok"], "unknown")
        lines.append(f"scheduler: {verdict}: {sched['message']}")
        for run in sched["stalled_runs"]:
            lines.append(
                f"  STALLED run {run['run_id']} (project {run['project_id']}) queued "
                f"{run['queued_for_seconds']:.0f} s: {run['reason']}"
            )
    return "\n".join(lines)


def _register_subsystems() -> None:
    """Command groups owned by their subsystems (imported here, not at the top: they import ours)."""
    from cli import (
        curate_cmd,
        export_cmd,
        import_cmd,
        model_cmd,
        next_cmd,
        project_cmd,
        report_cmd,
        serve_cmd,
        split_cmd,
        worker_cmd,
    )
    from cli.al_cmd import al  # active learning (issue 12)

    for command in (
        import_cmd.import_cmd,
        export_cmd.export_cmd,
        split_cmd.split,
        project_cmd.project,
        project_cmd.push,
        model_cmd.model,
        serve_cmd.serve,
        serve_cmd.sync,
        worker_cmd.worker,
        worker_cmd.beat,
        worker_cmd.train,
        worker_cmd.evaluate,
        worker_cmd.predict,
        worker_cmd.retrain_policy,
        curate_cmd.stats,
        curate_cmd.review,
        report_cmd.report,
        al,
        next_cmd.next_cmd,
    ):
        cli.add_command(command)


_register_subsystems()


def main() -> None:
    cli(prog_name="sonoseg")


if __name__ == "__main__":
    main()
