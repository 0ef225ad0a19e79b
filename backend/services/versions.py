"""Model versions: register immutable versions, promote one to serving, roll back.

The database enforces "at most one serving version per project" (partial unique index), so two
concurrent promotions cannot both win. Every server process polls the serving uid and swaps its
model when it changes (backend/services/serving.py).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.base import utcnow
from backend.db.models import MaskVersion, ModelVersion, Project, ServingChange
from backend.errors import Conflict, NotFound

log = logging.getLogger(__name__)


def new_uid(project: Project) -> str:
    """An immutable, human-readable version id, e.g. ``p3-20261125T171500-1a2b3c``."""
    return f"p{project.id}-{utcnow().strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"


def register_version(
    session: Session,
    project: Project,
    *,
    arch: str,
    checkpoint_key: str,
    checkpoint_sha256: str,
    metrics: dict[str, Any] | None = None,
    parent_id: int | None = None,
    training_masks: Sequence[MaskVersion] = (),
) -> ModelVersion:
    """Record a new, immutable candidate version whose checkpoint is already in the store.

    The one way a ModelVersion row is made (training runs, offline registration, tests): a
    version starts as a candidate; only :func:`promote` (the gate, a person, a rollback) makes it
    serve, so every serving change is in the audit log.
    """
    version = ModelVersion(
        project_id=project.id,
        uid=new_uid(project),
        parent_id=parent_id,
        status="candidate",
        arch=arch,
        metrics=metrics or {},
        checkpoint_key=checkpoint_key,
        checkpoint_sha256=checkpoint_sha256,
        training_masks=list(training_masks),
    )
    session.add(version)
    session.flush()
    log.info("model version %s registered for project %s", version.uid, project.id)
    return version


def serving_version(session: Session, project_id: int) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.project_id == project_id, ModelVersion.status == "serving")
    ).one_or_none()


def get_version(session: Session, uid_or_id: str | int) -> ModelVersion:
    if isinstance(uid_or_id, int) or str(uid_or_id).isdigit():
        mv = session.get(ModelVersion, int(uid_or_id))
    else:
        mv = session.scalars(select(ModelVersion).where(ModelVersion.uid == uid_or_id)).one_or_none()
    if mv is None:
        raise NotFound(f"no model version {uid_or_id!r}; `sonoseg models list` shows them")
    return mv


def list_versions(session: Session, project_id: int | None = None) -> list[ModelVersion]:
    stmt = select(ModelVersion).order_by(ModelVersion.id)
    if project_id is not None:
        stmt = stmt.where(ModelVersion.project_id == project_id)
    return list(session.scalars(stmt))


def promote(
    session: Session, version: ModelVersion, *, reason: str = "promoted by hand", kind: str = "promote"
) -> ModelVersion | None:
    """Make ``version`` serve; the previous serving version is retired. Returns the previous one."""
    if version.status not in ("candidate", "retired", "serving"):
        raise Conflict(
            f"model version {version.uid} is {version.status}: only a candidate or retired version can serve"
        )
    if not version.checkpoint_key:
        raise Conflict(f"model version {version.uid} has no checkpoint")
    current = serving_version(session, version.project_id)
    if current is not None and current.id == version.id:
        return None
    if current is not None:
        current.status = "retired"
        session.flush()  # free the unique "serving" slot before taking it
    version.status = "serving"
    version.promoted_at = utcnow()
    version.gate_reason = reason
    session.add(
        ServingChange(
            project_id=version.project_id,
            model_version_id=version.id,
            previous_id=current.id if current is not None else None,
            kind=kind,
            reason=reason,
        )
    )
    session.flush()
    log.info("model %s now serving project %s (was %s)", version.uid, version.project_id, current and current.uid)
    return current


def serving_stack(session: Session, project_id: int) -> list[int]:
    """Version ids in serving order, replaying the audit log: promote pushes, rollback pops."""
    stack: list[int] = []
    changes = session.scalars(
        select(ServingChange).where(ServingChange.project_id == project_id).order_by(ServingChange.id)
    )
    for change in changes:
        if change.kind == "rollback":
            if stack:
                stack.pop()
        elif not stack or stack[-1] != change.model_version_id:
            stack.append(change.model_version_id)
    return stack


def rollback(session: Session, project_id: int) -> ModelVersion:
    """Serve the version that served before the current one; the current one is retired."""
    current = serving_version(session, project_id)
    if current is None:
        raise Conflict(f"project {project_id} has no serving model to roll back from")
    stack = serving_stack(session, project_id)
    if len(stack) < 2 or stack[-1] != current.id:
        raise Conflict(f"project {project_id} has no earlier served version to roll back to")
    previous = session.get(ModelVersion, stack[-2])
    if previous is None or previous.status == "failed" or not previous.checkpoint_key:
        raise Conflict(f"the previous version of project {project_id} can no longer serve")
    promote(session, previous, reason=f"rollback from {current.uid}", kind="rollback")
    return previous
