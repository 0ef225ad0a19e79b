"""What every CLI command needs: the process's :class:`~backend.runtime.Runtime`.

Built lazily, once per invocation, so `sonoseg --help` touches neither the database nor torch.
Each command opens its own unit of work (``with unit_of_work(c.factory) as session:``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import click

from backend.errors import SonosegError
from backend.runtime import Runtime, RuntimeParts
from backend.settings import Settings


@dataclass
class CliContext(RuntimeParts):
    """The settings of this invocation and its runtime; ``c.factory``, ``c.store``, ``c.engine``
    and ``c.mirror`` are the runtime's (:class:`~backend.runtime.RuntimeParts`)."""

    settings: Settings = field(default_factory=Settings.from_env)

    @cached_property
    def runtime(self) -> Runtime:
        return Runtime.from_settings(self.settings)


pass_ctx = click.make_pass_decorator(CliContext, ensure=True)


def fail(exc: SonosegError) -> click.ClickException:
    return click.ClickException(exc.message)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
