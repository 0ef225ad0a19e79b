"""One :class:`Runtime` per process: the engine, session factory, blob store and Label Studio link.

The HTTP app (:func:`backend.api.app.create_app`), each Celery worker process
(:func:`workers.celery_app.make_celery`) and each CLI command build exactly one, from
:class:`~backend.settings.Settings`, instead of each wiring the same parts its own way.
Everything is built on first use: ``sonoseg --help`` touches neither the database nor torch, and
a Celery prefork parent never opens a connection its children would inherit
(:meth:`Runtime.after_fork` drops any that were).

What the runtime does not do: open units of work. The edge (a view, a task, a command) opens
``with unit_of_work(runtime.factory) as session:`` and hands the session to the services.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool

from backend.db.migrate import require_up_to_date
from backend.db.session import SessionFactory, dispose_after_fork, make_engine, make_session_factory
from backend.labelstudio.images import TaskImageFetcher
from backend.services.sync import ImageLimits, LabelStudioMirror
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from backend.storage.private import private_dir


@dataclass
class Runtime:
    """Per-process resources, built lazily from ``settings``.

    ``keep_connections``: a long-lived server keeps its SQLite connections in a pool (with
    NullPool every unit of work closes the last connection, and SQLite checkpoints the WAL, an
    fsync of ~10 ms, on that close). Workers and commands open a connection per unit of work.
    ``check_migrated``: refuse a database that is not at the head revision (every process but
    ``sonoseg db upgrade`` itself).
    """

    settings: Settings
    keep_connections: bool = False
    check_migrated: bool = True
    _engine: Engine | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @classmethod
    def from_settings(
        cls, settings: Settings | None = None, *, keep_connections: bool = False, check_migrated: bool = True
    ) -> Runtime:
        """A runtime on ``settings`` (default: the environment)."""
        return cls(settings or Settings.from_env(), keep_connections=keep_connections, check_migrated=check_migrated)

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                private_dir(self.settings.data_dir)
                pool = QueuePool if self.keep_connections and self.settings.is_sqlite else None
                self._engine = make_engine(self.settings.database_url, poolclass=pool)
            return self._engine

    @cached_property
    def factory(self) -> SessionFactory:
        """The session factory, on a database at the head revision (else a clear error)."""
        engine = self.engine
        if self.check_migrated:
            require_up_to_date(engine)
        return make_session_factory(engine)

    @cached_property
    def store(self) -> LocalBlobStore:
        return LocalBlobStore(self.settings.store_dir)

    @cached_property
    def fetcher(self) -> TaskImageFetcher:
        """Downloads task images under the URL policy; its ``client`` is None without Label Studio."""
        return TaskImageFetcher.from_settings(self.settings)

    @cached_property
    def mirror(self) -> LabelStudioMirror:
        """The process's one mirror of Label Studio projects and task images (with its caches)."""
        return LabelStudioMirror(
            self.factory,
            self.store,
            self.fetcher,
            limits=ImageLimits.from_settings(self.settings),
            key_dir=self.settings.data_dir,
        )

    def after_fork(self) -> None:
        """In a forked child: never reuse the parent's database connections."""
        if self._engine is not None:
            dispose_after_fork(self._engine)

    def close(self) -> None:
        """Release pooled database connections (tests, shutdown); a later unit of work reconnects."""
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()


class RuntimeParts:
    """Shortcuts to a process's runtime parts, for the objects the edges pass around.

    :class:`~backend.api.state.AppState` (per app) and ``cli.context.CliContext`` (per
    command) each hold a :class:`Runtime`, as a field or built on first use; this mixin gives
    both ``x.factory``, ``x.store``, ``x.mirror`` and ``x.engine`` with one definition.
    """

    if TYPE_CHECKING:  # a dataclass field in one subclass, a cached_property in the other

        @property
        def runtime(self) -> Runtime: ...

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

    @property
    def mirror(self) -> LabelStudioMirror:
        return self.runtime.mirror
