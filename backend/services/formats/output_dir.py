"""Where an export is written: a new or empty folder, and nothing left behind when it fails.

A non-empty folder is refused because an export merged into an older one (or into a folder of
other files) would be a dataset nobody can describe: stale masks next to fresh ones, a manifest
that lists some of the files. A failed or interrupted export removes what it wrote, so the same
command can simply be run again.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backend.errors import InvalidInput

__all__ = ["check_output_dir", "fresh_output_dir"]


def check_output_dir(path: Path) -> None:
    """Refuse ``path`` unless it is missing or an empty folder; writes nothing."""
    if path.exists() and not path.is_dir():
        raise InvalidInput(f"{path} exists and is not a folder; exports go to a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise InvalidInput(
            f"{path} is not empty; exports go to a new or empty folder only, so that nothing is overwritten "
            "or mixed with an older export. Choose another --out, or empty that folder first."
        )


@contextmanager
def fresh_output_dir(path: Path) -> Iterator[Path]:
    """Create (or take the empty) folder ``path`` and yield it; on any failure, remove what was written.

    Only what this export created is removed: the folders it made (up to the first that existed)
    and, in a folder that existed empty, its contents, never the folder itself.
    """
    check_output_dir(path)
    created_top: Path | None = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        created_top = candidate
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot create {path}: {exc.strerror or exc}") from exc
    try:
        yield path
    except BaseException:  # Ctrl-C included: an interrupted export must not look like a finished one
        if created_top is not None:
            shutil.rmtree(created_top, ignore_errors=True)
        else:
            for child in list(path.iterdir()):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
