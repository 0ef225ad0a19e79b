"""Typed settings, read once from ``SONOSEG_*`` (and ``LABEL_STUDIO_*``) environment variables.

This module is the only reader of ``os.environ`` in sonoseg. Everything else receives a
:class:`Settings` instance (built at the edge: the CLI, the Flask factory, the Celery app), so
tests pass overrides instead of patching globals. Every variable is documented in README.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from backend.errors import InvalidInput


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in {"1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off", ""}:
        return False
    raise InvalidInput(f"expected a boolean (true/false), got {value!r}")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    """All configuration. Defaults give the embedded setup: SQLite and files under ``data_dir``."""

    data_dir: Path = Path("./sonoseg-data")
    database_url: str = ""  # "" -> sqlite:///<data_dir>/sonoseg.db
    broker_url: str = ""  # "" -> kombu SQLAlchemy transport on <data_dir>/broker.sqlite
    result_backend: str = ""  # "" -> SQLAlchemy result backend on <data_dir>/results.sqlite
    # Prefix of every Redis key the broker and the result backend write ("" = none): two sonoseg
    # installations (staging and production, or concurrent test runs) can share one Redis without
    # one's workers taking the other's tasks. Ignored by the embedded broker (a file per data dir).
    broker_namespace: str = ""
    host: str = "127.0.0.1"
    port: int = 9090
    log_level: str = "INFO"

    label_studio_url: str = ""
    label_studio_api_key: str = field(default="", repr=False)
    # Documents root for /data/local-files/?d=... (Label Studio's LOCAL_FILES_DOCUMENT_ROOT).
    local_files_root: Path | None = None
    # Extra hosts from which plain http(s) image URLs may be fetched (the LS host is always allowed).
    allowed_image_hosts: tuple[str, ...] = ()

    basic_auth_user: str = ""
    basic_auth_password: str = field(default="", repr=False)
    webhook_secret: str = field(default="", repr=False)
    max_request_bytes: int = 32 * 1024 * 1024

    # Images: reject anything with a side longer than this (decompression bombs).
    max_image_side: int = 8192
    max_image_bytes: int = 256 * 1024 * 1024
    # Memory that concurrent image decodes may hold together (backend/imaging/budget.py).
    decode_memory_bytes: int = 1024 * 1024 * 1024

    device: str = "auto"  # auto | cpu | cuda
    model_preset: str = "cpu_small"
    train_max_minutes: float = 30.0
    retrain_after: int = 20
    retrain_debounce_seconds: float = 60.0
    gate_margin: float = 0.0
    # The first promotion's floor: a first model serves only after at least one full epoch and a
    # validation gate-metric score at least this high (an empty pre-annotation beats a random one).
    gate_min_dice: float = 0.05
    repredict_after_promotion: bool = True
    model_poll_seconds: float = 2.0
    # Retraining loop (workers/): gate metric, nightly schedule, liveness of running runs.
    gate_metric: str = "fg_mDice"  # a key of a model version's metrics (fg_mDice, fg_mIoU, fg_image_dice)
    retrain_cron: str = "0 2 * * *"  # crontab (m h dom mon dow) of the "anything changed?" retrain; "" = off
    dispatch_interval_seconds: float = 5.0  # how often beat hands due queued runs to the broker
    train_heartbeat_seconds: float = 10.0  # a running run writes heartbeat_at this often
    train_stale_after_seconds: float = 300.0  # no heartbeat for this long: the worker is gone
    train_max_attempts: int = 2  # a run whose worker was lost is retried until this many attempts

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.data_dir.resolve() / 'sonoseg.db'}")
        if not self.broker_url:
            object.__setattr__(self, "broker_url", f"sqla+sqlite:///{self.data_dir.resolve() / 'broker.sqlite'}")
        if not self.result_backend:
            object.__setattr__(self, "result_backend", f"db+sqlite:///{self.data_dir.resolve() / 'results.sqlite'}")
        if self.device not in {"auto", "cpu", "cuda"}:
            raise InvalidInput(f"SONOSEG_DEVICE must be auto, cpu or cuda, not {self.device!r}")
        if not 0 < self.port < 65536:
            raise InvalidInput(f"SONOSEG_PORT must be 1-65535, not {self.port}")
        # A half-configured secret fails closed: starting with auth silently off would expose
        # /predict, /webhook and /metrics to anyone who can reach the port.
        if self.basic_auth_user and not self.basic_auth_password:
            raise InvalidInput(
                "SONOSEG_BASIC_AUTH_USER is set but SONOSEG_BASIC_AUTH_PASSWORD is not: set both "
                "(basic auth on) or neither (off); sonoseg does not start half-configured"
            )
        if self.basic_auth_password and not self.basic_auth_user:
            raise InvalidInput(
                "SONOSEG_BASIC_AUTH_PASSWORD is set but SONOSEG_BASIC_AUTH_USER is not: set both "
                "(basic auth on) or neither (off); sonoseg does not start half-configured"
            )
        if not 0.0 <= self.gate_min_dice <= 1.0:
            raise InvalidInput(f"SONOSEG_GATE_MIN_DICE must be between 0 and 1, not {self.gate_min_dice}")

    # -- derived paths -------------------------------------------------------------------------
    @property
    def store_dir(self) -> Path:
        """Root of the content-addressed file store (images, masks, checkpoints)."""
        return self.data_dir / "store"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (derived URLs are recomputed if left empty)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from the environment. Unknown ``SONOSEG_*`` variables are ignored."""
        env = os.environ if environ is None else environ
        kw: dict[str, object] = {}

        def get(name: str) -> str | None:
            value = env.get(name)
            return None if value is None or value == "" else value

        def num(name: str, conv: type) -> object | None:
            raw = get(name)
            if raw is None:
                return None
            try:
                converted: object = conv(raw)
                return converted
            except ValueError as exc:
                raise InvalidInput(f"{name} must be a number, got {raw!r}") from exc

        simple = {
            "SONOSEG_DATA_DIR": ("data_dir", Path),
            "SONOSEG_DATABASE_URL": ("database_url", str),
            "SONOSEG_BROKER_URL": ("broker_url", str),
            "SONOSEG_RESULT_BACKEND": ("result_backend", str),
            "SONOSEG_BROKER_NAMESPACE": ("broker_namespace", str),
            "SONOSEG_HOST": ("host", str),
            "SONOSEG_LOG_LEVEL": ("log_level", str),
            "LABEL_STUDIO_URL": ("label_studio_url", lambda s: s.rstrip("/")),
            "LABEL_STUDIO_API_KEY": ("label_studio_api_key", str),
            "SONOSEG_LOCAL_FILES_ROOT": ("local_files_root", Path),
            "SONOSEG_ALLOWED_IMAGE_HOSTS": ("allowed_image_hosts", _csv),
            "SONOSEG_BASIC_AUTH_USER": ("basic_auth_user", str),
            "SONOSEG_BASIC_AUTH_PASSWORD": ("basic_auth_password", str),
            "SONOSEG_WEBHOOK_SECRET": ("webhook_secret", str),
            "SONOSEG_DEVICE": ("device", str.lower),
            "SONOSEG_MODEL_PRESET": ("model_preset", str),
            "SONOSEG_REPREDICT_AFTER_PROMOTION": ("repredict_after_promotion", _bool),
            "SONOSEG_GATE_METRIC": ("gate_metric", str),
            "SONOSEG_RETRAIN_CRON": ("retrain_cron", str.strip),
        }
        for var, (attr, conv) in simple.items():
            raw = get(var)
            if raw is not None:
                kw[attr] = conv(raw)  # type: ignore[operator]
        numeric = {
            "SONOSEG_PORT": ("port", int),
            "SONOSEG_MAX_REQUEST_BYTES": ("max_request_bytes", int),
            "SONOSEG_MAX_IMAGE_SIDE": ("max_image_side", int),
            "SONOSEG_MAX_IMAGE_BYTES": ("max_image_bytes", int),
            "SONOSEG_DECODE_MEMORY_BYTES": ("decode_memory_bytes", int),
            "SONOSEG_TRAIN_MAX_MINUTES": ("train_max_minutes", float),
            "SONOSEG_RETRAIN_AFTER": ("retrain_after", int),
            "SONOSEG_RETRAIN_DEBOUNCE_SECONDS": ("retrain_debounce_seconds", float),
            "SONOSEG_GATE_MARGIN": ("gate_margin", float),
            "SONOSEG_GATE_MIN_DICE": ("gate_min_dice", float),
            "SONOSEG_MODEL_POLL_SECONDS": ("model_poll_seconds", float),
            "SONOSEG_DISPATCH_INTERVAL_SECONDS": ("dispatch_interval_seconds", float),
            "SONOSEG_TRAIN_HEARTBEAT_SECONDS": ("train_heartbeat_seconds", float),
            "SONOSEG_TRAIN_STALE_AFTER_SECONDS": ("train_stale_after_seconds", float),
            "SONOSEG_TRAIN_MAX_ATTEMPTS": ("train_max_attempts", int),
        }
        for var, (attr, conv) in numeric.items():
            value = num(var, conv)
            if value is not None:
                kw[attr] = value
        return cls(**kw)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The environment variables from which :meth:`from_env` builds settings equal to these.

        The inverse of :meth:`from_env`: ``Settings.from_env(s.to_env()) == s``. It is how a parent
        process hands its settings to a child (a worker, a test's subprocess), so every field is
        written, secrets too: never log the result. A field that is None, or empty where
        ``from_env`` reads empty as unset, is left out. Booleans are written ``true``/``false``,
        floats with ``repr`` (which parses back to the same float), tuples comma-separated.

        Raises InvalidInput for settings that ``from_env`` cannot reproduce, naming the variables:
        an empty string where the default is not empty (``retrain_cron=""``; ``"off"`` also turns
        the schedule off), a Label Studio URL ending in ``/`` or a crontab with surrounding blanks
        (``from_env`` strips them), an image host that is empty, padded or holds a comma, or NaN.
        """
        variables = {
            "data_dir": "SONOSEG_DATA_DIR",
            "database_url": "SONOSEG_DATABASE_URL",
            "broker_url": "SONOSEG_BROKER_URL",
            "result_backend": "SONOSEG_RESULT_BACKEND",
            "broker_namespace": "SONOSEG_BROKER_NAMESPACE",
            "host": "SONOSEG_HOST",
            "port": "SONOSEG_PORT",
            "log_level": "SONOSEG_LOG_LEVEL",
            "label_studio_url": "LABEL_STUDIO_URL",
            "label_studio_api_key": "LABEL_STUDIO_API_KEY",
            "local_files_root": "SONOSEG_LOCAL_FILES_ROOT",
            "allowed_image_hosts": "SONOSEG_ALLOWED_IMAGE_HOSTS",
            "basic_auth_user": "SONOSEG_BASIC_AUTH_USER",
            "basic_auth_password": "SONOSEG_BASIC_AUTH_PASSWORD",
            "webhook_secret": "SONOSEG_WEBHOOK_SECRET",
            "max_request_bytes": "SONOSEG_MAX_REQUEST_BYTES",
            "max_image_side": "SONOSEG_MAX_IMAGE_SIDE",
            "max_image_bytes": "SONOSEG_MAX_IMAGE_BYTES",
            "decode_memory_bytes": "SONOSEG_DECODE_MEMORY_BYTES",
            "device": "SONOSEG_DEVICE",
            "model_preset": "SONOSEG_MODEL_PRESET",
            "train_max_minutes": "SONOSEG_TRAIN_MAX_MINUTES",
            "retrain_after": "SONOSEG_RETRAIN_AFTER",
            "retrain_debounce_seconds": "SONOSEG_RETRAIN_DEBOUNCE_SECONDS",
            "gate_margin": "SONOSEG_GATE_MARGIN",
            "gate_min_dice": "SONOSEG_GATE_MIN_DICE",
            "repredict_after_promotion": "SONOSEG_REPREDICT_AFTER_PROMOTION",
            "model_poll_seconds": "SONOSEG_MODEL_POLL_SECONDS",
            "gate_metric": "SONOSEG_GATE_METRIC",
            "retrain_cron": "SONOSEG_RETRAIN_CRON",
            "dispatch_interval_seconds": "SONOSEG_DISPATCH_INTERVAL_SECONDS",
            "train_heartbeat_seconds": "SONOSEG_TRAIN_HEARTBEAT_SECONDS",
            "train_stale_after_seconds": "SONOSEG_TRAIN_STALE_AFTER_SECONDS",
            "train_max_attempts": "SONOSEG_TRAIN_MAX_ATTEMPTS",
        }
        env: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value: object = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, float):
                text = repr(value)
            elif isinstance(value, tuple):
                text = ",".join(str(part) for part in value)
            else:  # str, int, Path
                text = str(value)
            if text:
                env[variables[f.name]] = text
        back = Settings.from_env(env)
        lost = [variables[f.name] for f in dataclasses.fields(self) if getattr(back, f.name) != getattr(self, f.name)]
        if lost:
            raise InvalidInput(
                f"{', '.join(lost)}: these settings have no environment form that reads back the same "
                "(an empty value where the default is not empty, a value from_env would strip or split, NaN)"
            )
        return env
