"""Alembic environment: shared by ``sonoseg db upgrade``, the tests and the ``alembic`` CLI.

A caller may hand over an open connection in ``config.attributes["connection"]`` (Alembic
cookbook); otherwise the URL comes from ``sqlalchemy.url`` or, failing that, from sonoseg's
Settings (``SONOSEG_DATABASE_URL``). ``render_as_batch`` makes ALTERs work on SQLite.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from backend.db import models  # noqa: F401  (registers the tables on Base.metadata)
from backend.db.base import Base
from backend.db.session import make_engine

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from backend.settings import Settings

        url = Settings.from_env().database_url
    from backend.db.migrate import migration_connection

    engine = make_engine(url)
    with migration_connection(engine) as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
