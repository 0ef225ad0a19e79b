"""The local-files path policy, row by row, and one bad local file failing alone in a /predict batch.

Why: ``/data/local-files/?d=`` names a file on our disk. Every way such a path can go wrong (a
NUL byte, a path longer than the OS allows, a symlink loop, ``..``, a link leading out of the
root, a directory, a FIFO, two ``d`` parameters, a file that grows while it is read) must end
as a :class:`~backend.errors.SonosegError` naming the reason, so that the task fails alone as
every other bad image does, instead of a RuntimeError/OSError/ValueError failing the whole batch.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from backend.api.app import AppState, create_app
from backend.db.models import Project
from backend.db.session import unit_of_work
from backend.errors import InvalidInput, NotFound, PayloadTooLarge, SonosegError
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.labelstudio.images import TaskImageFetcher, read_local_file
from backend.settings import Settings
from tests.support.frames import png_bytes
from tests.support.models import ThresholdModel, fake_loader, record_version

PNG = b"\x89PNG\r\n\x1a\n-fake-image-bytes"
LIMIT = 4096


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A local files root with good files, and traps around it."""
    root = tmp_path / "root"
    (root / "scans").mkdir(parents=True)
    (root / "ok.png").write_bytes(PNG)
    (root / "scans" / "a b.png").write_bytes(PNG)
    (root / "big.png").write_bytes(b"x" * (LIMIT + 1))
    (tmp_path / "secret.png").write_bytes(b"do not read")
    (root / "inlink.png").symlink_to(root / "ok.png")
    (root / "out.png").symlink_to(tmp_path / "secret.png")
    (root / "outdir").symlink_to(tmp_path)
    (root / "dangling.png").symlink_to(root / "nowhere.png")
    (root / "dangling-out.png").symlink_to(tmp_path / "nowhere.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "loopa").symlink_to(root / "loopb")
    (root / "loopb").symlink_to(root / "loopa")
    (root / "null.png").symlink_to("/dev/null")
    os.mkfifo(root / "pipe.png")
    return root


@dataclass(frozen=True)
class Row:
    query: str  # what follows "/data/local-files/?" in the task's URL (percent-encoded as in a URL)
    expect: type[SonosegError] | bytes  # the error class, or the bytes read
    reason: str = ""  # a fragment the error message must contain


def d(value: str) -> str:
    return f"d={value}"


ROWS = [
    Row(d("ok.png"), PNG),
    Row(d("scans/a%20b.png"), PNG),  # percent-encoded, decoded once
    Row(d("scans%2Fa+b.png"), PNG),  # %2F and '+' decode as Label Studio (Django) decodes them
    Row(d("inlink.png"), PNG),  # a symlink that stays inside the root
    Row(d("scans/../ok.png"), PNG),  # '..' that stays inside
    Row(d("{root}/ok.png"), PNG),  # an absolute path inside the root (os.path.join semantics)
    Row(d("ok.png") + "#frag", PNG),
    Row(d("../secret.png"), InvalidInput, "outside the local files root"),
    Row(d("scans/../../secret.png"), InvalidInput, "outside the local files root"),
    Row(d("%2e%2e/secret.png"), InvalidInput, "outside the local files root"),
    Row(d("%2E%2E%2Fsecret.png"), InvalidInput, "outside the local files root"),
    Row(d("/etc/passwd"), InvalidInput, "outside the local files root"),
    Row(d("{root}/../secret.png"), InvalidInput, "outside the local files root"),
    Row(d("../missing-outside.png"), InvalidInput, "outside"),  # no probing of what exists outside
    Row(d("out.png"), InvalidInput, "a symlink leads out"),
    Row(d("outdir/secret.png"), InvalidInput, "a symlink leads out"),
    Row(d("dangling-out.png"), InvalidInput, "outside"),
    Row(d("null.png"), InvalidInput, "outside"),
    Row(d("dangling.png"), NotFound, "does not exist"),
    Row(d("missing.png"), NotFound, "does not exist"),
    Row(d("ok.png/x.png"), NotFound, "does not exist"),  # a file used as a directory (ENOTDIR)
    Row(d("scans"), InvalidInput, "is a directory"),
    Row(d("."), InvalidInput, "is a directory"),
    Row(d("loop.png"), InvalidInput, "symlink loop"),
    Row(d("loopa/x.png"), InvalidInput, "symlink loop"),
    Row(d("a%00b.png"), InvalidInput, "NUL byte"),
    Row(d("x" * 5000), InvalidInput, "too long"),
    Row(d("a/" * 2100 + "x.png"), InvalidInput, "too long"),
    Row(d("n" * 300 + ".png"), InvalidInput, "longer than 255 bytes"),
    Row(d("pipe.png"), InvalidInput, "FIFO"),
    Row(d("big.png"), PayloadTooLarge, "limit"),
    Row("d=ok.png&d=../secret.png", InvalidInput, "more than one ?d="),
    Row("d=ok.png&d=ok.png", InvalidInput, "more than one ?d="),
    Row("", InvalidInput, "without its ?d="),
    Row("d=", InvalidInput, "without its ?d="),
    Row("x=ok.png", InvalidInput, "without its ?d="),
    Row(d("%ff.png"), InvalidInput, "not valid UTF-8"),
    Row(d("ok.png\x00"), InvalidInput, "control"),  # a raw NUL in the URL itself
    Row(d("ok\n.png"), InvalidInput, "whitespace"),
    Row(d("ok.png\\..\\..\\secret.png"), InvalidInput, "backslash"),
]


def make_fetcher(tmp_path: Path, root: Path) -> TaskImageFetcher:
    settings = Settings(data_dir=tmp_path / "data").replace(local_files_root=root, max_image_bytes=LIMIT)
    return TaskImageFetcher(settings, None)  # no Label Studio: nothing may be downloaded instead


@pytest.mark.parametrize("row", ROWS, ids=[r.query[:40] for r in ROWS])
def test_local_files_policy(row: Row, root: Path, tmp_path: Path) -> None:
    url = "/data/local-files/?" + row.query.replace("{root}", str(root))
    fetcher = make_fetcher(tmp_path, root)
    if isinstance(row.expect, bytes):
        assert fetcher.fetch(url).data == row.expect
        return
    with pytest.raises(row.expect) as info:
        fetcher.fetch(url)
    assert row.reason in info.value.message
    assert "do not read" not in info.value.message
    assert len(info.value.message) < 400  # a 5000-character path is not echoed whole


def test_a_socket_is_not_a_regular_file(root: Path, tmp_path: Path) -> None:
    path = root / "s.png"
    if len(os.fsencode(path)) > 100:
        pytest.skip("tmp path too long for an AF_UNIX socket")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(InvalidInput, match="socket"):
            make_fetcher(tmp_path, root).fetch("/data/local-files/?d=s.png")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_says_so(root: Path, tmp_path: Path) -> None:
    (root / "locked.png").write_bytes(PNG)
    (root / "locked.png").chmod(0)
    with pytest.raises(InvalidInput, match="not readable"):
        make_fetcher(tmp_path, root).fetch("/data/local-files/?d=locked.png")


def test_a_file_that_grows_after_fstat_is_read_only_up_to_the_limit(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fstat says small, the file is big (it grew in between): the read stops at limit + 1 bytes."""
    (root / "growing.png").write_bytes(b"y" * (LIMIT * 50))
    real_fstat, real_read = os.fstat, os.read
    read: list[int] = []

    def small_fstat(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        return os.stat_result(
            (
                st.st_mode,
                st.st_ino,
                st.st_dev,
                st.st_nlink,
                st.st_uid,
                st.st_gid,
                10,
                int(st.st_atime),
                int(st.st_mtime),
                int(st.st_ctime),
            )
        )

    def counting_read(fd: int, n: int) -> bytes:
        chunk = real_read(fd, n)
        read.append(len(chunk))
        return chunk

    monkeypatch.setattr(os, "fstat", small_fstat)
    monkeypatch.setattr(os, "read", counting_read)
    with pytest.raises(PayloadTooLarge, match="grew past"):
        read_local_file(root.resolve(), "growing.png", LIMIT)
    monkeypatch.undo()
    assert sum(read) == LIMIT + 1


# -- a /predict batch through the real app ---------------------------------------------------------
PROJECT = "7.1700000000"


@dataclass
class Env:
    client: Any
    state: AppState
    root: Path


@pytest.fixture
def env(settings: Settings, root: Path) -> Iterator[Env]:
    model, loads = ThresholdModel(), []
    app = create_app(
        settings.replace(local_files_root=root), start_background=False, loader=fake_loader(model, loads, set())
    )
    state: AppState = app.extensions["sonoseg"]
    yield Env(app.test_client(), state, root)
    state.close()


def _serve(env: Env) -> None:
    assert env.client.post("/setup", json={"project": PROJECT, "schema": DEFAULT_LABEL_CONFIG}).status_code == 200
    with unit_of_work(env.state.factory) as session:
        project = session.scalars(select(Project).where(Project.ls_project_id == 7)).one()
        record_version(session, project)  # serving; the stand-in loader needs no checkpoint
    env.state.holder.refresh()


BAD = {
    "loop": "/data/local-files/?d=loop.png",
    "nul": "/data/local-files/?d=a%00b.png",
    "long": "/data/local-files/?d=" + "x" * 5000,
    "fifo": "/data/local-files/?d=pipe.png",
    "dir": "/data/local-files/?d=scans",
    "two-d": "/data/local-files/?d=ok.png&d=../secret.png",
}


@pytest.mark.parametrize("bad_url", list(BAD.values()), ids=list(BAD))
def test_one_bad_local_file_fails_alone_in_a_predict_batch(env: Env, bad_url: str) -> None:
    _serve(env)
    pixels = np.full((64, 80), 200, np.uint8)
    pixels[:10, :10] = 5
    (env.root / "good.png").write_bytes(png_bytes(pixels))
    tasks = [{"id": 1, "data": {"image": bad_url}}, {"id": 2, "data": {"image": "/data/local-files/?d=good.png"}}]
    resp = env.client.post(
        "/predict", json={"tasks": tasks, "project": PROJECT, "label_config": DEFAULT_LABEL_CONFIG, "params": {}}
    )
    assert resp.status_code == 200, resp.get_json()
    results = resp.get_json()["results"]
    assert len(results) == 2
    assert results[0]["result"] == []
    assert [r["value"]["brushlabels"] for r in results[1]["result"]] == [["Nerve"], ["Vessel"]]
