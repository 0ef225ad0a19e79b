"""Shared fixtures: real databases (SQLite always; PostgreSQL when SONOSEG_TEST_POSTGRES_URL is set),
a temporary data directory, settings, the blob store, and generated or shared ultrasound data.

No database or broker is mocked. PostgreSQL tests get a fresh database per test session (and per
xdist worker), migrated to head; each test starts from empty tables.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from backend.db.base import Base
from backend.db.migrate import upgrade
from backend.db.session import SessionFactory, make_engine, make_session_factory
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "usgra-seg"
POSTGRES_URL = os.environ.get("SONOSEG_TEST_POSTGRES_URL", "")
REDIS_URL = os.environ.get("SONOSEG_TEST_REDIS_URL", "")


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"sonoseg: PostgreSQL tests {'ON (' + make_url(POSTGRES_URL).render_as_string(hide_password=True) + ')' if POSTGRES_URL else 'OFF (set SONOSEG_TEST_POSTGRES_URL)'}",
        f"sonoseg: Redis tests {'ON' if REDIS_URL else 'OFF (set SONOSEG_TEST_REDIS_URL)'}",
        f"sonoseg: shared ultrasound data {'present' if SHARED_DATA.is_dir() else 'absent: generated data is used'}",
    ]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many database tests ran on PostgreSQL, so CI output proves it."""
    counts: dict[str, int] = {}
    for key in ("passed", "failed", "skipped"):
        for rep in terminalreporter.stats.get(key, []):
            if getattr(rep, "when", "call") != "call" and key != "skipped":
                continue
            if "[postgres" in rep.nodeid or "-postgres" in rep.nodeid:
                counts[key] = counts.get(key, 0) + 1
    terminalreporter.write_line(
        "sonoseg: PostgreSQL database tests: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        if counts
        else "sonoseg: PostgreSQL database tests: none ran"
    )


# -- PostgreSQL: one scratch database per session / worker ----------------------------------------
def _create_pg_database(admin_url: str, name: str) -> str:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def _drop_pg_database(admin_url: str, name: str) -> None:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_scratch() -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty PostgreSQL databases, all dropped at the end of the session."""
    if not POSTGRES_URL:
        pytest.skip("SONOSEG_TEST_POSTGRES_URL is not set")
    made: list[str] = []

    def make() -> str:
        name = f"sonoseg_test_{uuid.uuid4().hex[:12]}"
        url = _create_pg_database(POSTGRES_URL, name)
        made.append(name)
        return url

    yield make
    for name in made:
        _drop_pg_database(POSTGRES_URL, name)


@pytest.fixture(scope="session")
def postgres_migrated_url(pg_scratch) -> str:  # type: ignore[no-untyped-def]
    url = pg_scratch()
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


# -- the engine fixture, over both backends ---------------------------------------------------------
@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'sonoseg.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def postgres_url(postgres_migrated_url: str) -> Iterator[str]:
    yield postgres_migrated_url
    engine = make_engine(postgres_migrated_url)
    with engine.begin() as conn:
        tables = ", ".join(f'"{t.name}"' for t in reversed(Base.metadata.sorted_tables))
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite_url", marks=pytest.mark.sqlite, id="sqlite"),
        pytest.param("postgres_url", marks=pytest.mark.postgres, id="postgres"),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """A migrated, empty database URL: SQLite, and PostgreSQL when configured."""
    return str(request.getfixturevalue(request.param))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> SessionFactory:
    return make_session_factory(engine)


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url)


@pytest.fixture
def store(settings: Settings) -> LocalBlobStore:
    return LocalBlobStore(settings.store_dir)


# -- data -------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def shared_data() -> Path | None:
    return SHARED_DATA if SHARED_DATA.is_dir() else None
