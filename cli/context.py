"""What every CLI command needs: the process's :class:`~backend.runtime.Runtime`.

Built lazily, once per invocation, so `sonoseg --help` touches neither the database nor torch.
Each command opens its own unit of work (``with unit_of_work(c.factory) as session:``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import click
from sqlalchemy import Engine

from backend.db.session import SessionFactory
from backend.errors import SonosegError
from backend.runtime import Runtime
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore


@dataclass
class CliContext:
    settings: Settings = field(default_factory=Settings.from_env)

    @cached_property
    def runtime(self) -> Runtime:
        return Runtime.from_settings(self.settings)

    @property
    def engine(self) -> Engine:
        """The engine, on any revision (``sonoseg db`` commands)."""
        return self.runtime.engine

    @property
    def factory(self) -> SessionFactory:
        """Session factory on a database at the head revision (else a clear error)."""
        return self.runtime.factory

    @property
    def store(self) -> LocalBlobStore:
        return self.runtime.store


pass_ctx = click.make_pass_decorator(CliContext, ensure=True)


def fail(exc: SonosegError) -> click.ClickException:
    return click.ClickException(exc.message)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
