"""The rules the database itself enforces, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from backend.db.models import Image, MaskVersion, ModelVersion, Project, TrainingRun, WebhookEvent
from backend.db.session import SessionFactory, unit_of_work


def _project(factory: SessionFactory, name: str = "p") -> int:
    with unit_of_work(factory) as s:
        p = Project(name=name, class_names=["Nerve", "Vessel"])
        s.add(p)
        s.flush()
        return p.id


def _image_row(project_id: int, sha: str = "a" * 64, *, split: str = "train") -> Image:
    """An image row of project ``project_id``, not yet added: only its hash and split vary between tests."""
    return Image(
        project_id=project_id,
        sha256=sha,
        blob_key="images/aa/x.png",
        width=4,
        height=3,
        subject="subj-1",
        split=split,
        source_format="png",
    )


def _image(factory: SessionFactory, pid: int, sha: str = "a" * 64) -> int:
    with unit_of_work(factory) as s:
        img = _image_row(pid, sha)
        s.add(img)
        s.flush()
        return img.id


def test_image_unique_per_project_by_hash(factory: SessionFactory) -> None:
    pid = _project(factory)
    _image(factory, pid)
    with pytest.raises(IntegrityError):
        _image(factory, pid)
    other = _project(factory, "q")
    _image(factory, other)  # the same content in another project is another row


def test_one_serving_model_per_project(factory: SessionFactory) -> None:
    pid = _project(factory)
    with unit_of_work(factory) as s:
        s.add(ModelVersion(project_id=pid, uid="v1", status="serving", checkpoint_key="k"))
    with pytest.raises(IntegrityError):
        with unit_of_work(factory) as s:
            s.add(ModelVersion(project_id=pid, uid="v2", status="serving", checkpoint_key="k"))
    with unit_of_work(factory) as s:  # candidates are unlimited
        s.add_all([ModelVersion(project_id=pid, uid=f"c{i}", status="candidate") for i in range(3)])


def test_one_current_mask_per_image_and_predictions_never_current(factory: SessionFactory) -> None:
    pid = _project(factory)
    iid = _image(factory, pid)

    def mask(version: int, source: str, current: bool) -> MaskVersion:
        return MaskVersion(
            image_id=iid, version=version, source=source, blob_key="masks/aa/x.png", sha256="b" * 64, is_current=current
        )

    with unit_of_work(factory) as s:
        s.add(mask(1, "annotation", True))
    with pytest.raises(IntegrityError):
        with unit_of_work(factory) as s:
            s.add(mask(2, "annotation", True))
    with pytest.raises(IntegrityError):
        with unit_of_work(factory) as s:
            s.add(mask(2, "prediction", True))
    with pytest.raises(IntegrityError):  # version numbers are unique per image
        with unit_of_work(factory) as s:
            s.add(mask(1, "annotation", False))


def test_one_active_training_run_per_project(factory: SessionFactory) -> None:
    pid = _project(factory)
    with unit_of_work(factory) as s:
        s.add(TrainingRun(project_id=pid, trigger="manual", status="queued"))
    with pytest.raises(IntegrityError):
        with unit_of_work(factory) as s:
            s.add(TrainingRun(project_id=pid, trigger="schedule", status="running"))
    with unit_of_work(factory) as s:
        s.add(TrainingRun(project_id=pid, trigger="schedule", status="failed", error="boom"))
        run = s.scalars(select(TrainingRun).where(TrainingRun.status == "queued")).one()
        run.status = "succeeded"
    with unit_of_work(factory) as s:
        s.add(TrainingRun(project_id=pid, trigger="annotations", status="queued"))


def test_check_constraints_reject_unknown_values(factory: SessionFactory) -> None:
    pid = _project(factory)
    with pytest.raises(IntegrityError):
        with unit_of_work(factory) as s:
            s.add(ModelVersion(project_id=pid, uid="x", status="shiny"))
    with pytest.raises(IntegrityError):
        with unit_of_work(factory) as s:
            s.add(_image_row(pid, "c" * 64, split="holdout"))


def test_webhook_event_recorded_once(factory: SessionFactory) -> None:
    with unit_of_work(factory) as s:
        s.add(WebhookEvent(event_key="k" * 64, action="ANNOTATION_CREATED", payload={"a": 1}))
    with pytest.raises(IntegrityError):
        with unit_of_work(factory) as s:
            s.add(WebhookEvent(event_key="k" * 64, action="ANNOTATION_CREATED", payload={"a": 1}))


def test_foreign_keys_enforced(factory: SessionFactory) -> None:
    with pytest.raises(IntegrityError):
        with unit_of_work(factory) as s:
            s.add(_image_row(999, "d" * 64))  # no project 999


def test_datetimes_come_back_timezone_aware(factory: SessionFactory) -> None:
    pid = _project(factory)
    with factory() as s:
        created = s.get(Project, pid).created_at  # type: ignore[union-attr]
    assert created.tzinfo is not None
