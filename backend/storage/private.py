"""The data directory and the embedded database are readable by their owner only.

They hold ultrasound frames, labels, the pseudonym key and, in SQLite, every record: on a shared
server (a hospital's research machine) a default umask of 022 would let every local account read
them. The data directory is created 0700 (and tightened to 0700 if it exists with group or other
access); the SQLite database file is created 0600 before SQLite opens it, and SQLite gives its
``-wal`` and ``-shm`` files the database file's permissions.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with owner-only access; tighten it if it is wider."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077 and _owned(path):
        os.chmod(path, DIR_MODE)
        log.info("data directory %s was readable by others (mode %o): now %o", path, mode, DIR_MODE)
    return path


def private_sqlite_file(url: str) -> None:
    """For a SQLite file URL: create the database file 0600 (or tighten it) before SQLite opens it."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return
    db = Path(parsed.database)
    if str(db).startswith("file:"):
        return  # a URI filename: the operator chose its options
    private_dir(db.parent)
    try:
        fd = os.open(db, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    for suffix in ("", "-wal", "-shm", "-journal"):
        f = db.with_name(db.name + suffix)
        if f.exists() and _owned(f) and stat.S_IMODE(f.stat().st_mode) & 0o077:
            os.chmod(f, FILE_MODE)


def _owned(path: Path) -> bool:
    return path.stat().st_uid == os.getuid()
