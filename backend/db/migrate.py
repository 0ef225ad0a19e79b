"""Run Alembic migrations programmatically (``sonoseg db upgrade``, tests, ``make run``).

The migration scripts live in the top-level ``migrations`` package; the same ``env.py`` serves the
``alembic`` command line and this module (a connection is handed over via ``config.attributes``).

On SQLite, foreign keys are switched off while migrations run (:func:`migration_connection`), as
Alembic's batch mode requires: a batch ALTER recreates the table (copy, drop, rename), and dropping
``project`` with foreign keys on cascades to every image. ``PRAGMA foreign_key_check`` then runs
before the commit, so a migration that breaks a reference is rolled back, not committed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

from backend.errors import NotReady


def migrations_dir() -> Path:
    import migrations

    return Path(migrations.__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """One transaction for a migration; on SQLite with foreign keys off, checked before commit."""
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        raw = conn.connection.driver_connection if sqlite else None
        if raw is not None:  # outside any transaction: the pragma is a no-op inside one
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                yield conn
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        tables = sorted({str(row[0]) for row in broken})
                        raise NotReady(
                            f"the migration would leave {len(broken)} row(s) pointing at missing rows "
                            f"(tables {', '.join(tables)}); nothing was changed"
                        )
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")


def upgrade(engine: Engine, revision: str = "head", *, pseudonym_key: bytes | None = None) -> None:
    """Migrate to ``revision``. ``pseudonym_key``: the installation's key, which lets a data
    migration pseudonymise values that earlier versions stored in clear (else they are dropped)."""
    with migration_connection(engine) as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        if pseudonym_key is not None:
            cfg.attributes["pseudonym_key"] = pseudonym_key
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    with migration_connection(engine) as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise NotReady(f"migrations have {len(heads)} heads, expected exactly one: {heads}")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def require_up_to_date(engine: Engine) -> None:
    """Refuse to run on a database that is not at the head revision, saying what to run."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        where = "an empty database" if current is None else f"revision {current}"
        raise NotReady(
            f"the database ({engine.url.render_as_string(hide_password=True)}) is at {where}, "
            f"but this sonoseg needs revision {head}: run `sonoseg db upgrade` first"
        )
