"""Migrations are tests: one head; empty -> head -> base -> head; models match the migrations.
Runs on SQLite and, when configured, PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from backend.db.base import Base
from backend.db.migrate import alembic_config, current_revision, downgrade, head_revision, require_up_to_date, upgrade
from backend.db.session import make_engine
from backend.errors import NotReady

EXPECTED_TABLES = {
    "project", "image", "image_source", "mask_version", "model_version", "model_version_mask",
    "serving_change", "prediction", "training_run", "webhook_event",
}


@pytest.fixture(params=[pytest.param("sqlite", marks=pytest.mark.sqlite),
                        pytest.param("postgres", marks=pytest.mark.postgres)])
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
        assert EXPECTED_TABLES <= set(inspect(engine).get_table_names())
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
