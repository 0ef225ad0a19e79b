"""``sonoseg serve`` (the Label Studio ML backend) and ``sonoseg sync`` (reconcile with Label Studio).

``serve`` runs werkzeug's threaded server for development (the default, ``--workers 0``) and
gunicorn for production (``--workers N``). Both refuse to start on a database that is not
migrated, with the message that says what to run. Request lines are logged without their
query string, so a webhook ``?token=`` never reaches a log.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from backend.errors import SonosegError
from backend.settings import Settings
from cli.context import CliContext, fail, pass_ctx

log = logging.getLogger(__name__)


@click.command("serve")
@click.option("--host", default=None, help="Interface to listen on (default SONOSEG_HOST, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default SONOSEG_PORT, 9090).")
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="gunicorn worker processes; 0 runs the development server (threaded werkzeug).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Threads per gunicorn worker (concurrent requests; the model itself runs one batch at a time).",
)
@click.option(
    "--timeout",
    type=click.IntRange(min=10),
    default=120,
    show_default=True,
    help="gunicorn worker timeout in seconds (Label Studio waits 100 s for /predict).",
)
@pass_ctx
def serve(c: CliContext, host: str | None, port: int | None, workers: int, threads: int, timeout: int) -> None:
    """Serve the Label Studio ML backend (/health /setup /predict /webhook /versions /metrics)."""
    try:
        settings = c.settings.replace(**{k: v for k, v in (("host", host), ("port", port)) if v is not None})
        _ = c.factory  # refuses an un-migrated database, with the command to run
    except SonosegError as exc:
        raise fail(exc) from exc
    if workers == 0:
        _serve_dev(settings)
    else:
        _serve_gunicorn(settings, workers, threads, timeout)


def _serve_dev(settings: Settings) -> None:
    from werkzeug.serving import WSGIRequestHandler, run_simple

    from backend.api.app import create_app

    class RedactingHandler(WSGIRequestHandler):
        """Log the path without its query string (it may hold the webhook token). Errors the
        server answers itself (a request line it cannot parse, a URI over 64 KB) are JSON with a
        message, like every other error of sonoseg's."""

        error_content_type = "application/json"
        error_message_format = '{"status": "error", "error": "%(code)d %(message)s"}'

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            # http.server escapes the message for HTML; backslashes (in a repr of a garbage
            # request line) would still break the JSON string.
            safe = None if message is None else message.replace("\\", "/")[:200]
            super().send_error(code, safe, explain)

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            # A request line the server could not parse (HTTP/0.9, TLS bytes, a line over the
            # limit) reaches here before path/command are set: log what there is, never raise.
            path = str(getattr(self, "path", "") or "").split("?", 1)[0][:200]
            command = getattr(self, "command", None) or "-"
            version = getattr(self, "request_version", None) or "-"
            self.log("info", '"%s %s %s" %s %s', command, path, version, code, size)

    try:
        app = create_app(settings)
    except SonosegError as exc:
        raise fail(exc) from exc
    click.echo(
        f"sonoseg ML backend on http://{settings.host}:{settings.port} (development server; "
        "use --workers N for production)"
    )
    run_simple(settings.host, settings.port, app, threaded=True, request_handler=RedactingHandler)


def _serve_gunicorn(settings: Settings, workers: int, threads: int, timeout: int) -> None:
    from gunicorn.app.base import BaseApplication

    class SonosegGunicorn(BaseApplication):  # type: ignore[misc]
        """Each worker builds its own app after the fork (no preload): own threads, own connections."""

        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": f"{settings.host}:{settings.port}",
                "workers": workers,
                "threads": threads,
                "worker_class": "gthread",
                "timeout": timeout,
                "graceful_timeout": 30,
                "preload_app": False,
                # %(U)s is the path without the query string: a webhook ?token= never reaches the log.
                "access_log_format": '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(L)ss',
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from backend.api.app import create_app

            return create_app(settings)

    click.echo(f"sonoseg ML backend on http://{settings.host}:{settings.port} (gunicorn, {workers} worker(s))")
    SonosegGunicorn().run()


@click.command("sync")
@click.option(
    "--project",
    "ls_project_ids",
    type=int,
    multiple=True,
    help="Label Studio project id (repeatable). Default: every project sonoseg has seen from Label Studio.",
)
@pass_ctx
def sync(c: CliContext, ls_project_ids: tuple[int, ...]) -> None:
    """Pull annotations from Label Studio and record any that webhooks missed."""
    from sqlalchemy import select

    from backend.db.models import Project
    from backend.db.session import unit_of_work
    from backend.services.reconciliation import reconcile_project

    try:
        factory = c.factory
        mirror = c.runtime.mirror
        ids = list(ls_project_ids)
        if not ids:
            with unit_of_work(factory) as session:
                ids = [i for i in session.scalars(select(Project.ls_project_id).order_by(Project.id)) if i is not None]
        if not ids:
            raise click.ClickException("no Label Studio project known yet: pass --project ID")
        failed = False
        for ls_id in ids:
            report = reconcile_project(mirror, ls_id)
            click.echo(
                f"project {ls_id}: {report.tasks} tasks, {report.annotations} annotations: {report.created} created, "
                f"{report.updated} updated, {report.unchanged} unchanged, {report.skips} skips, "
                f"{report.deactivated} deactivated, "
                f"{report.tasks_gone} tasks gone"
            )
            for error in report.errors:
                failed = True
                click.echo(f"  error: {error}", err=True)
    except SonosegError as exc:
        raise fail(exc) from exc
    if failed:
        raise click.ClickException("some annotations could not be recorded (see above)")
