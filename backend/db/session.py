"""Engines and sessions: one engine and one sessionmaker per process.

The session's lifecycle stays outside the core (SQLAlchemy's FAQ): a request, task or CLI
command opens ``with unit_of_work(factory) as session:``; core functions take ``session`` and
never commit.

SQLite (the embedded default): WAL journal, foreign keys on, a 30 s busy timeout, and every
transaction opened with ``BEGIN IMMEDIATE`` (pysqlite's own transaction handling is switched off,
as SQLAlchemy's docs recommend, so SAVEPOINT works). IMMEDIATE takes the write lock up front, so
two processes (server and worker) never deadlock upgrading a read lock; our transactions are
short by design (no transaction is held across inference or training). PostgreSQL is the
multi-user production database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from backend.storage.private import private_sqlite_file

SessionFactory = sessionmaker[Session]


def _install_sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if engine.url.database not in (None, "", ":memory:"):
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str, *, poolclass: Any = None, echo: bool = False) -> Engine:
    """Create an engine for ``url`` with sonoseg's per-backend settings."""
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if poolclass is not None:
        kwargs["poolclass"] = poolclass
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {})["check_same_thread"] = False
        if poolclass is None:
            kwargs["poolclass"] = NullPool  # a connection per unit of work; cheap for SQLite files
    else:
        kwargs["pool_pre_ping"] = True
    if url.startswith("sqlite"):
        private_sqlite_file(url)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        _install_sqlite_pragmas(engine)
    return engine


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: SessionFactory) -> Iterator[Session]:
    """One transaction: commits on success, rolls back on any exception."""
    with factory() as session, session.begin():
        yield session


def dispose_after_fork(engine: Engine) -> None:
    """Call in a forked child (Celery prefork) so it never reuses the parent's connections."""
    engine.dispose(close=False)
