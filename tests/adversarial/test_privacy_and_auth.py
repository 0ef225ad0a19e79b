"""Patient identifiers never reach the database; secrets fail closed; files are the owner's only."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from backend.db.models import ImageSource, WebhookEvent
from backend.db.session import SessionFactory, make_engine, unit_of_work
from backend.errors import InvalidInput
from backend.imaging.io import encode_png
from backend.services.dataset import import_files
from backend.settings import Settings
from backend.storage.blobs import LocalBlobStore
from tests.support.frames import synthetic_frame
from tests.support.payloads import annotation_event
from tests.test_webhooks import Hooks, hooks  # noqa: F401  (the fixture)

PATIENT = "Doe_John_19600101"
RECORD = "PID-123456"


def _dump_sqlite(url: str) -> str:
    """Every value of every table, as text: what anyone with the database file can read."""
    path = url.removeprefix("sqlite:///")
    conn = sqlite3.connect(path)
    try:
        out = []
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            out.extend(repr(row) for row in conn.execute(f'SELECT * FROM "{table}"'))
        return "\n".join(out)
    finally:
        conn.close()


def test_import_stores_no_path_file_or_folder_name(
    tmp_path: Path, settings: Settings, factory: SessionFactory, store: LocalBlobStore
) -> None:
    folder = tmp_path / RECORD
    folder.mkdir()
    img, mask = synthetic_frame(3)
    (folder / f"{PATIENT}.png").write_bytes(encode_png(img))
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / f"{PATIENT}.png").write_bytes(encode_png(mask))
    for subject_from in ("file", "parent"):
        report = import_files(
            factory,
            store,
            settings,
            project_name="p",
            class_names=("Nerve", "Vessel"),
            paths=[folder],
            mask_dir=tmp_path / "masks",
            subject_from=subject_from,
        )
        assert not report.errors
    if settings.is_sqlite:
        dump = _dump_sqlite(settings.database_url)
        for secret in (PATIENT, RECORD, str(tmp_path)):
            assert secret not in dump
    with factory() as s:
        (source,) = s.scalars(select(ImageSource)).all()
        assert source.source_ref and source.source_ref.startswith("src-")
        assert source.file_sha256 and source.file_bytes == (folder / f"{PATIENT}.png").stat().st_size
    # ... yet the curator who holds the file finds its image again
    from cli.main import cli

    env = {"SONOSEG_DATA_DIR": str(settings.data_dir), "SONOSEG_DATABASE_URL": settings.database_url}
    out = CliRunner().invoke(cli, ["sources", "find", str(folder / f"{PATIENT}.png")], env=env)
    assert out.exit_code == 0 and "image 1" in out.output and "matched by path" in out.output, out.output
    moved = tmp_path / "elsewhere.png"
    moved.write_bytes((folder / f"{PATIENT}.png").read_bytes())
    out = CliRunner().invoke(cli, ["sources", "find", str(moved)], env=env)
    assert "matched by content" in out.output, out.output


def test_webhook_payloads_are_stored_without_personal_fields(hooks: Hooks) -> None:  # noqa: F811
    event = annotation_event("ANNOTATION_CREATED", 1, 10, hooks.urls[0], hooks.masks[0])
    person = {
        "id": 7,
        "email": "jane.doe@hospital.example",
        "first_name": "Jane",
        "last_name": "Doe",
        "username": "jdoe",
        "avatar": "/avatars/jdoe.png",
    }
    event["annotation"]["completed_by"] = person
    event["annotation"]["created_username"] = "jane.doe@hospital.example, 7"
    event["annotation"]["updated_by"] = person
    event["task"]["updated_by"] = person
    event["task"]["annotators"] = [person]
    event["project"]["created_by"] = person
    hooks.post(event)
    with unit_of_work(hooks.state.factory) as session:
        stored = json.dumps(session.scalars(select(WebhookEvent)).one().payload)
    for value in ("jane.doe", "Jane", "jdoe", "avatars"):
        assert value not in stored
    assert '"completed_by": 7' in stored  # the id is kept: it is the author reference
    hooks.process()
    (mv,) = hooks.versions()
    assert mv.author == "ls-user:7"
    with unit_of_work(hooks.state.factory) as session:  # once applied, the image URL is dropped too
        done = session.scalars(select(WebhookEvent)).one().payload
        assert "data" not in done["task"] and hooks.urls[0] not in json.dumps(done)


def test_data_dir_and_sqlite_database_are_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "fresh-data"
    env = {**os.environ, "SONOSEG_DATA_DIR": str(data)}
    env.pop("SONOSEG_DATABASE_URL", None)
    old = os.umask(0o022)
    try:
        subprocess.run(
            [sys.executable, "-m", "cli.main", "db", "upgrade"],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    db = data / "sonoseg.db"
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    for extra in ("sonoseg.db-wal", "sonoseg.db-shm", "pseudonym.key"):
        if (data / extra).exists():
            assert stat.S_IMODE((data / extra).stat().st_mode) & 0o077 == 0, extra


def test_an_existing_world_readable_data_dir_is_tightened(tmp_path: Path) -> None:
    from backend.storage.private import private_dir, private_sqlite_file

    data = tmp_path / "d"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    private_dir(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    db = data / "x.db"
    db.write_bytes(b"")
    os.chmod(db, 0o644)
    private_sqlite_file(f"sqlite:///{db}")
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    make_engine(f"sqlite:///{data / 'new.db'}").dispose()
    assert stat.S_IMODE((data / "new.db").stat().st_mode) == 0o600


# -- item 2: a half-configured secret refuses to start, naming what is missing ---------------------------------
@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ("SONOSEG_BASIC_AUTH_USER", "SONOSEG_BASIC_AUTH_PASSWORD"),
        ("SONOSEG_BASIC_AUTH_PASSWORD", "SONOSEG_BASIC_AUTH_USER"),
    ],
)
def test_half_configured_basic_auth_refuses_to_start(tmp_path: Path, present: str, missing: str) -> None:
    with pytest.raises(InvalidInput, match=missing):
        Settings.from_env({"SONOSEG_DATA_DIR": str(tmp_path), present: "x"})
    env = {**os.environ, "SONOSEG_DATA_DIR": str(tmp_path / "d"), present: "x"}
    env.pop(missing, None)
    for command in (["serve"], ["worker"], ["status"]):
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", *command],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0 and missing in done.stderr, (command, done.stderr[-500:])


def test_full_or_no_basic_auth_starts(tmp_path: Path) -> None:
    assert Settings.from_env({"SONOSEG_BASIC_AUTH_USER": "u", "SONOSEG_BASIC_AUTH_PASSWORD": "p"}).basic_auth_user
    assert not Settings.from_env({}).basic_auth_user
