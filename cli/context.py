"""What every CLI command needs: settings, an engine on a migrated database, the store.

Built lazily, once per invocation, so `sonoseg --help` touches neither the database nor torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import click
from sqlalchemy import Engine

from backend.db.migrate import require_up_to_date
from backend.db.session import SessionFactory, make_engine, make_session_factory
from backend.errors import SonosegError
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from backend.storage.private import private_dir


@dataclass
class CliContext:
    settings: Settings = field(default_factory=Settings.from_env)

    @cached_property
    def engine(self) -> Engine:
        private_dir(self.settings.data_dir)
        return make_engine(self.settings.database_url)

    @cached_property
    def factory(self) -> SessionFactory:
        """Session factory on a database at the head revision (else a clear error)."""
        require_up_to_date(self.engine)
        return make_session_factory(self.engine)

    @cached_property
    def store(self) -> LocalBlobStore:
        return LocalBlobStore(self.settings.store_dir)


pass_ctx = click.make_pass_decorator(CliContext, ensure=True)


def fail(exc: SonosegError) -> click.ClickException:
    return click.ClickException(exc.message)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
