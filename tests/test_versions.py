"""Promotion and rollback of model versions (the registry half of the gate)."""

from __future__ import annotations

import pytest

from backend.db.models import ModelVersion, Project
from backend.db.session import SessionFactory, unit_of_work
from backend.errors import Conflict
from backend.services.versions import promote, rollback, serving_version
from tests.support.models import record_version


def _versions(factory: SessionFactory, n: int) -> tuple[int, list[int]]:
    """A project with ``n`` registered candidate versions (none serving); their ids, oldest first."""
    with unit_of_work(factory) as s:
        p = Project(name="p", class_names=["Nerve"])
        s.add(p)
        s.flush()
        vs = [record_version(s, p, serve=False, checkpoint_key=f"k{i}") for i in range(n)]
        return p.id, [v.id for v in vs]


def _serving_id(factory: SessionFactory, pid: int) -> int | None:
    with factory() as s:
        v = serving_version(s, pid)
        return v.id if v else None


def test_promote_retires_previous(factory: SessionFactory) -> None:
    _pid, ids = _versions(factory, 2)
    for vid in ids:
        with unit_of_work(factory) as s:
            promote(s, s.get_one(ModelVersion, vid))
    with factory() as s:
        assert [s.get_one(ModelVersion, i).status for i in ids] == ["retired", "serving"]


def test_rollback_walks_back_through_history(factory: SessionFactory) -> None:
    pid, ids = _versions(factory, 3)
    for vid in ids:
        with unit_of_work(factory) as s:
            promote(s, s.get_one(ModelVersion, vid))
    assert _serving_id(factory, pid) == ids[2]
    with unit_of_work(factory) as s:
        rollback(s, pid)
    assert _serving_id(factory, pid) == ids[1]
    with unit_of_work(factory) as s:
        rollback(s, pid)
    assert _serving_id(factory, pid) == ids[0]
    with pytest.raises(Conflict, match="no earlier served version"):
        with unit_of_work(factory) as s:
            rollback(s, pid)
    assert _serving_id(factory, pid) == ids[0]


def test_failed_version_cannot_serve(factory: SessionFactory) -> None:
    pid, ids = _versions(factory, 1)
    with unit_of_work(factory) as s:
        s.get_one(ModelVersion, ids[0]).status = "failed"
    with pytest.raises(Conflict):
        with unit_of_work(factory) as s:
            promote(s, s.get_one(ModelVersion, ids[0]))
    assert _serving_id(factory, pid) is None
