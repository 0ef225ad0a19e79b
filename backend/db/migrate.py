"""Run Alembic migrations programmatically (``sonoseg db upgrade``, tests, ``make run``).

The migration scripts live in the top-level ``migrations`` package; the same ``env.py`` serves the
``alembic`` command line and this module (a connection is handed over via ``config.attributes``).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

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


def upgrade(engine: Engine, revision: str = "head", *, pseudonym_key: bytes | None = None) -> None:
    """Migrate to ``revision``. ``pseudonym_key``: the installation's key, which lets a data
    migration pseudonymise values that earlier versions stored in clear (else they are dropped)."""
    with engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        if pseudonym_key is not None:
            cfg.attributes["pseudonym_key"] = pseudonym_key
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    with engine.begin() as conn:
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
