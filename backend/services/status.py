"""One read-only snapshot of the installation, for `sonoseg status` (and, later, an admin page)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from backend.db.migrate import current_revision, head_revision
from backend.db.models import Image, LabelIssue, MaskVersion, ModelVersion, Project, TrainingRun, WebhookEvent
from backend.db.session import make_session_factory
from backend.services.label_issues import open_issues
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore


def collect_status(
    engine: Engine, store: LocalBlobStore, *, runs_per_project: int = 5, settings: Settings | None = None
) -> dict[str, Any]:
    revision = current_revision(engine)
    report: dict[str, Any] = {
        "database": engine.url.render_as_string(hide_password=True),
        "revision": revision or "empty",
        "required_revision": head_revision(),
        "projects": [],
        "store_temp_files": len(store.leftover_temp_files()),
    }
    if revision is None:
        return report
    with make_session_factory(engine)() as session:
        for project in session.scalars(select(Project).order_by(Project.id)):
            images = session.scalar(select(func.count(Image.id)).where(Image.project_id == project.id)) or 0
            labelled = (
                session.scalar(
                    select(func.count(MaskVersion.id))
                    .join(Image, Image.id == MaskVersion.image_id)
                    .where(Image.project_id == project.id, MaskVersion.is_current)
                )
                or 0
            )
            serving = session.scalars(
                select(ModelVersion.uid).where(ModelVersion.project_id == project.id, ModelVersion.status == "serving")
            ).first()
            runs = session.scalars(
                select(TrainingRun)
                .where(TrainingRun.project_id == project.id)
                .order_by(TrainingRun.id.desc())
                .limit(runs_per_project)
            )
            report["projects"].append(
                {
                    "id": project.id,
                    "name": project.name,
                    "ls_project_id": project.ls_project_id,
                    "classes": project.class_names,
                    "images": images,
                    "labelled": labelled,
                    "serving": serving,
                    "retrain_pending": project.retrain_pending,
                    "runs": [
                        {
                            "id": r.id,
                            "trigger": r.trigger,
                            "status": r.status,
                            "device": r.device,
                            "progress": r.progress,
                            "error": r.error,
                            "created_at": r.created_at.isoformat(),
                        }
                        for r in runs
                    ],
                }
            )
        _add_data_integrity(session, report)
    # Is a scheduler (beat) running? Queued runs move only then (backend/services/scheduler.py).
    from backend.services.scheduler import scheduler_health, stalled_runs

    if revision != report["required_revision"]:
        report["scheduler"] = {"ok": None, "message": "unknown: run `sonoseg db upgrade`", "stalled_runs": []}
        return report
    sched_settings = settings or Settings.from_env()
    with make_session_factory(engine)() as session:
        health = scheduler_health(session, sched_settings)
        stalled = stalled_runs(session, sched_settings)
    report["scheduler"] = {**health.to_json(), "stalled_runs": [r.to_json() for r in stalled]}
    return report


def _add_data_integrity(session: Session, report: dict[str, Any], *, limit: int = 20) -> None:
    """Labels held back for a person (label issues) and webhook events that failed, with reasons."""
    issues = open_issues(session, limit=limit)
    report["label_issues_open"] = (
        session.scalar(select(func.count(LabelIssue.id)).where(LabelIssue.status == "open")) or 0
    )
    report["label_issues"] = [
        {"id": i.id, "project": i.project_id, "kind": i.kind, "image": i.image_id, "detail": i.detail} for i in issues
    ]
    report["webhook_events_failed"] = (
        session.scalar(select(func.count(WebhookEvent.id)).where(WebhookEvent.status == "failed")) or 0
    )
    report["webhook_failures"] = [
        {"id": e.id, "action": e.action, "error": e.error, "received_at": e.received_at.isoformat()}
        for e in session.scalars(
            select(WebhookEvent).where(WebhookEvent.status == "failed").order_by(WebhookEvent.id.desc()).limit(limit)
        )
    ]
