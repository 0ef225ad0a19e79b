"""``sonoseg report effort``: how much sonographers corrected each model version's suggestions.

The numbers come from :func:`backend.services.dashboard.correction_effort` (the dashboard's
effort page shows the same rows): per model version the predictions served, the corrections
received, the correction Dice (served mask vs saved label; mean and median), the share accepted
nearly unchanged (Dice >= 0.95) and Label Studio's ``lead_time`` seconds per corrected image.
"""

from __future__ import annotations

import json

import click

from backend.errors import SonosegError
from cli.context import CliContext, fail, pass_ctx


@click.group("report")
def report() -> None:
    """Reports on the labelling work."""


@report.command("effort")
@click.option("--project", "project_name", required=True, help="Project name or id.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_ctx
def effort(c: CliContext, project_name: str, as_json: bool) -> None:
    """Per model version: images corrected, correction Dice (mean, median), seconds per image
    (mean, median), share of suggestions accepted nearly unchanged."""
    from backend.db.session import unit_of_work
    from backend.services.dashboard import correction_effort, project_ref
    from backend.services.projects import get_project

    try:
        with unit_of_work(c.factory) as session:
            result = correction_effort(session, project_ref(session, get_project(session, project_name).id))
    except SonosegError as exc:
        raise fail(exc) from exc
    rows = [
        {
            "model_version": row.model_uid,
            "created_at": row.created_at.isoformat() if row.created_at else None,
            "predictions": row.predictions,
            "corrected": row.corrected,
            "mean_dice": row.mean_dice,
            "median_dice": row.median_dice,
            "accepted": row.accepted,
            "accepted_share": row.accepted_share,
            "timed": row.timed,
            "mean_seconds": row.mean_seconds,
            "median_seconds": row.median_seconds,
        }
        for row in result.rows
    ]
    if as_json:
        body = {"project": result.project.name, "accepted_dice": result.accepted_dice, "versions": rows}
        click.echo(json.dumps(body, indent=2))
        return
    click.echo(f"correction effort, project {result.project.name!r} (accepted: Dice >= {result.accepted_dice})")
    if not rows:
        click.echo("no prediction served yet")
        return
    header = f"{'model version':<28}{'served':>8}{'corrected':>10}{'Dice mean':>10}{'median':>8}"
    click.echo(header + f"{'accepted':>10}{'s/image mean':>14}{'median':>8}{'timed':>7}")
    for r in result.rows:
        share = f"{100 * r.accepted_share:.0f}%" if r.accepted_share is not None else "-"
        click.echo(
            f"{r.model_uid:<28}{r.predictions:>8}{r.corrected:>10}{_num(r.mean_dice, 3):>10}{_num(r.median_dice, 3):>8}"
            f"{share:>10}{_num(r.mean_seconds, 1):>14}{_num(r.median_seconds, 1):>8}{r.timed:>7}"
        )
    if not result.lead_time_recorded:
        click.echo("seconds per image: no correction so far carried Label Studio's lead_time")


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
