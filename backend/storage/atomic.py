"""Atomic file replacement: readers see the old file or the new one, never a part of either.

Used by the blob store, checkpoints and training resume state. The temp file lives in the target's
directory (so the rename is atomic on one filesystem) and is named ``.tmp-*`` so that leftovers of a
crashed writer can be found (``LocalBlobStore.leftover_temp_files``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Persist a rename: fsync the directory that holds it (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file, fsync and rename; the temp file never survives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
