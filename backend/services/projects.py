"""Projects: a Label Studio project (or offline dataset) and its ordered class names."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.db.models import Project
from backend.errors import Conflict, InvalidInput, NotFound

DEFAULT_CLASSES = ("Nerve", "Vessel")


def get_or_create_project(
    session: Session,
    name: str,
    *,
    class_names: tuple[str, ...] | list[str] = DEFAULT_CLASSES,
    ls_project_id: int | None = None,
    label_config: str | None = None,
) -> Project:
    """Find a project by Label Studio id (when given) or by name; create it if missing.

    The class list of an existing project may only grow at the end: reordering or removing a
    class would silently change what the stored masks' indices mean.
    """
    names = list(class_names)
    if not names or len(set(names)) != len(names):
        raise InvalidInput(f"class names must be non-empty and unique, got {names}")
    stmt = select(Project).where(
        Project.ls_project_id == ls_project_id if ls_project_id is not None else Project.name == name
    )
    project = session.scalars(stmt).first()
    if project is None:
        project = Project(name=name, ls_project_id=ls_project_id, class_names=names, label_config=label_config)
        session.add(project)
        session.flush()
        return project
    if names != project.class_names:
        if names[: len(project.class_names)] != project.class_names:
            raise Conflict(
                f"project {project.name!r} has classes {project.class_names}; {names} would reorder or drop "
                "classes, which changes the meaning of stored masks. Only appending new classes is allowed."
            )
        project.class_names = names
    if label_config is not None:
        project.label_config = label_config
    session.flush()
    return project


def get_project(session: Session, name_or_id: str | int) -> Project:
    if isinstance(name_or_id, int) or str(name_or_id).isdigit():
        project = session.get(Project, int(name_or_id))
    else:
        project = session.scalars(select(Project).where(Project.name == name_or_id)).first()
    if project is None:
        raise NotFound(f"no project {name_or_id!r}; create one with `sonoseg import --project NAME ...`")
    return project
