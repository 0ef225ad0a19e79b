"""Migrations are tests: one head; empty -> head -> base -> head; models match the migrations.
Runs on SQLite and, when configured, PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from backend.db.base import Base
from backend.db.migrate import alembic_config, current_revision, downgrade, head_revision, require_up_to_date, upgrade
from backend.db.session import make_engine
from backend.errors import NotReady

EXPECTED_TABLES = {
    "project",
    "image",
    "image_source",
    "mask_version",
    "model_version",
    "model_version_mask",
    "serving_change",
    "prediction",
    "training_run",
    "webhook_event",
    "label_issue",
    "scheduler_heartbeat",
    "split_change",
    "image_score",
    "label_lease",
}


@pytest.fixture(
    params=[pytest.param("sqlite", marks=pytest.mark.sqlite), pytest.param("postgres", marks=pytest.mark.postgres)]
)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    make: Callable[[], str] = request.getfixturevalue("pg_scratch")
    return make()


def test_exactly_one_head() -> None:
    assert len(ScriptDirectory.from_config(alembic_config()).get_heads()) == 1


def test_upgrade_downgrade_upgrade(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert set(inspect(engine).get_table_names()) >= EXPECTED_TABLES
        downgrade(engine, "base")
        assert current_revision(engine) is None
        assert not (EXPECTED_TABLES & set(inspect(engine).get_table_names()))
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_models_match_migrations(empty_url: str) -> None:
    """No pending autogenerate diff (the equivalent of `alembic check`)."""
    engine = make_engine(empty_url)
    try:
        upgrade(engine)
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True, "render_as_batch": True}
            )
            diff = compare_metadata(ctx, Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_unmigrated_database_is_refused_with_instructions(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        with pytest.raises(NotReady, match="sonoseg db upgrade"):
            require_up_to_date(engine)
        upgrade(engine)
        require_up_to_date(engine)
    finally:
        engine.dispose()


def _insert_project_and_image(conn: Connection, *, split: str) -> None:
    """Project 1 and its image 1 (in ``split``) as raw SQL rows, in columns every revision from 0002 on has."""
    conn.execute(
        text(
            "INSERT INTO project (id, name, class_names, retrain_pending, created_at, auto_retrain) "
            "VALUES (1, 'p', '[\"Nerve\"]', false, CURRENT_TIMESTAMP, true)"
        )
    )
    conn.execute(
        text(
            "INSERT INTO image (id, project_id, sha256, blob_key, width, height, subject, split, "
            "source_format, frame_index, acquisition, created_at) VALUES (1, 1, 'x', 'k', 2, 2, "
            "'subj-1', :split, 'png', 0, '{}', CURRENT_TIMESTAMP)"
        ),
        {"split": split},
    )


@pytest.mark.parametrize("with_key", [True, False])
def test_0003_removes_clear_paths_and_personal_webhook_fields(empty_url: str, with_key: bool) -> None:
    """Data written by 0002-era code: clear source paths and verbatim webhook bodies."""
    import json

    from backend.services.pseudonyms import source_ref

    engine = make_engine(empty_url)
    key = bytes(range(32))
    clear = "/hospital/PID-123456/Doe_John_19600101.dcm"
    try:
        upgrade(engine, "0002")
        payload = {
            "action": "ANNOTATION_CREATED",
            "project": {"id": 3, "created_by": {"email": "a@h.example"}},
            "annotation": {"id": 1, "task": 2, "result": [], "completed_by": {"id": 4, "email": "b@h.example"}},
            "task": {"id": 2, "data": {"image": "/data/upload/3/Doe_John.png"}},
        }
        with engine.begin() as conn:
            _insert_project_and_image(conn, split="train")
            conn.execute(
                text(
                    "INSERT INTO image_source (id, project_id, image_id, kind, uri, active, created_at) "
                    "VALUES (1, 1, 1, 'import', :uri, true, CURRENT_TIMESTAMP)"
                ),
                {"uri": clear},
            )
            conn.execute(
                text(
                    "INSERT INTO webhook_event (id, event_key, action, payload, status, received_at) "
                    "VALUES (1, 'k1', 'ANNOTATION_CREATED', :p, 'processed', CURRENT_TIMESTAMP)"
                ),
                {"p": json.dumps(payload)},
            )
        upgrade(engine, pseudonym_key=key if with_key else None)
        with engine.connect() as conn:
            ref = conn.execute(text("SELECT source_ref FROM image_source")).scalar()
            stored = conn.execute(text("SELECT payload FROM webhook_event")).scalar()
        assert ref == (source_ref(clear, key) if with_key else None)
        stored_text = stored if isinstance(stored, str) else json.dumps(stored)
        assert "h.example" not in stored_text and "Doe_John" not in stored_text
        assert '"completed_by": 4' in stored_text.replace('":4', '": 4')
    finally:
        engine.dispose()


def test_0004_keeps_every_row_both_ways(empty_url: str) -> None:
    """0004 adds a column to ``project``: on SQLite a batch (table recreating) ALTER would drop the
    table with foreign keys on and cascade-delete every image; the rows must survive both ways."""
    engine = make_engine(empty_url)
    try:
        upgrade(engine, "0003")
        with engine.begin() as conn:
            _insert_project_and_image(conn, split="test")
        upgrade(engine, "0004")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM image")).scalar() == 1
            assert conn.execute(text("SELECT test_frozen FROM project")).scalar() in (False, 0)
        downgrade(engine, "0003")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM image")).scalar() == 1
            assert "test_frozen" not in {c["name"] for c in inspect(conn).get_columns("project")}
    finally:
        engine.dispose()


def test_0005_adds_active_learning_and_keeps_every_row_both_ways(empty_url: str) -> None:
    """0005 adds ``project.al_strategy`` and ``mask_version.lead_time_seconds`` in place and two tables;
    existing rows survive both ways, existing projects get the 'default' strategy, and a lease or a
    score stored at 0005 goes with the downgrade."""
    engine = make_engine(empty_url)
    try:
        upgrade(engine, "0004")
        with engine.begin() as conn:
            _insert_project_and_image(conn, split="train")
            conn.execute(
                text(
                    "INSERT INTO mask_version (id, image_id, version, source, blob_key, sha256, foreground_pixels, "
                    "is_current, active, created_at) VALUES (1, 1, 1, 'annotation', 'm', 'y', 0, true, true, "
                    "CURRENT_TIMESTAMP)"
                )
            )
        upgrade(engine, "0005")
        with engine.begin() as conn:
            assert conn.execute(text("SELECT al_strategy FROM project")).scalar() == "default"
            assert conn.execute(text("SELECT lead_time_seconds FROM mask_version")).scalar() is None
            assert conn.execute(text("SELECT count(*) FROM image")).scalar() == 1
            conn.execute(
                text(
                    "INSERT INTO label_lease (image_id, project_id, annotator, leased_at, expires_at) "
                    "VALUES (1, 1, 'a', '2026-01-01 10:00:00', '2026-01-01 11:00:00')"
                )
            )
        downgrade(engine, "0004")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM image")).scalar() == 1
            assert conn.execute(text("SELECT count(*) FROM mask_version")).scalar() == 1
            assert "al_strategy" not in {c["name"] for c in inspect(conn).get_columns("project")}
            assert "lead_time_seconds" not in {c["name"] for c in inspect(conn).get_columns("mask_version")}
            assert not {"image_score", "label_lease"} & set(inspect(conn).get_table_names())
        upgrade(engine, "0005")
    finally:
        engine.dispose()


def test_upgrading_a_database_with_images_from_0001_keeps_every_row(empty_url: str) -> None:
    """0002 adds columns to ``project`` in batch mode (SQLite recreates the table): with foreign keys
    on, dropping the old ``project`` cascaded to every image. Migrations run with them off."""
    engine = make_engine(empty_url)
    try:
        upgrade(engine, "0001")
        with engine.begin() as conn:
            project_cols = {c["name"] for c in inspect(conn).get_columns("project")}
            image_cols = {c["name"]: c for c in inspect(conn).get_columns("image")}
            values = {"id": 1, "name": "'p'", "class_names": "'[\"Nerve\"]'", "created_at": "CURRENT_TIMESTAMP"}
            values |= {"retrain_pending": "false"} if "retrain_pending" in project_cols else {}
            conn.execute(
                text(f"INSERT INTO project ({', '.join(values)}) VALUES ({', '.join(map(str, values.values()))})")
            )
            row = {
                "id": 1,
                "project_id": 1,
                "sha256": "'x'",
                "blob_key": "'k'",
                "width": 2,
                "height": 2,
                "subject": "'subj-1'",
                "split": "'train'",
                "source_format": "'png'",
                "frame_index": 0,
                "acquisition": "'{}'",
                "created_at": "CURRENT_TIMESTAMP",
            }
            row = {k: v for k, v in row.items() if k in image_cols}
            conn.execute(text(f"INSERT INTO image ({', '.join(row)}) VALUES ({', '.join(map(str, row.values()))})"))
        upgrade(engine, "head")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM image")).scalar() == 1
            assert conn.execute(text("SELECT count(*) FROM project")).scalar() == 1
    finally:
        engine.dispose()
