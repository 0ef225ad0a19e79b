"""Content-addressed file store for images, masks and checkpoints.

Files are addressed by the sha256 of their bytes: ``<namespace>/<ab>/<sha256><suffix>``. Writing
the same bytes twice stores them once. Writes are atomic (temp file in the same directory, fsync,
rename, fsync of the directory), so a crash never leaves a half-written file under a real key.

Callers use the :class:`BlobStore` protocol only, so an S3-compatible store can be added later
without touching them; :class:`LocalBlobStore` is the embedded implementation.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from backend.errors import InvalidInput, NotFound
from backend.storage.atomic import TEMP_PREFIX, write_atomic

NAMESPACES = ("images", "masks", "checkpoints", "exports")
_KEY_RE = re.compile(r"^(?P<ns>[a-z]+)/(?P<shard>[0-9a-f]{2})/(?P<sha>[0-9a-f]{64})(?P<suffix>(\.[a-z0-9]+)*)$")


@dataclass(frozen=True)
class StoredBlob:
    key: str
    sha256: str
    size: int
    created: bool  # False when identical bytes were already stored


@runtime_checkable
class BlobStore(Protocol):
    def put_bytes(self, namespace: str, data: bytes, suffix: str = "") -> StoredBlob: ...

    def put_file(self, namespace: str, path: Path, suffix: str = "") -> StoredBlob: ...

    def get_bytes(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> Path:
        """A local filesystem path for ``key`` (downloaded to a cache by remote stores)."""
        ...


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class LocalBlobStore:
    """Content-addressed files under ``root`` on the local filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _key(self, namespace: str, sha: str, suffix: str) -> str:
        if namespace not in NAMESPACES:
            raise InvalidInput(f"unknown store namespace {namespace!r}; expected one of {NAMESPACES}")
        if suffix and not re.fullmatch(r"(\.[a-z0-9]+)+", suffix):
            raise InvalidInput(f"invalid file suffix {suffix!r}")
        return f"{namespace}/{sha[:2]}/{sha}{suffix}"

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise InvalidInput(f"not a store key: {key!r}")
        return self.root / key

    def put_bytes(self, namespace: str, data: bytes, suffix: str = "") -> StoredBlob:
        sha = sha256_bytes(data)
        key = self._key(namespace, sha, suffix)
        dest = self.root / key
        if dest.exists():
            return StoredBlob(key, sha, len(data), created=False)
        write_atomic(dest, data)
        return StoredBlob(key, sha, len(data), created=True)

    def put_file(self, namespace: str, path: Path, suffix: str = "") -> StoredBlob:
        """Store a file's bytes (e.g. a checkpoint written elsewhere). The source is left as is."""
        return self.put_bytes(namespace, Path(path).read_bytes(), suffix)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"no stored file {key!r} under {self.root}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def delete(self, key: str) -> None:
        """Remove a blob (only for rolling back a blob this transaction created)."""
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def local_path(self, key: str) -> Path:
        path = self._path(key)
        if not path.exists():
            raise NotFound(f"no stored file {key!r} under {self.root}")
        return path

    def verify(self, key: str) -> bool:
        """True when the file's bytes still hash to its key (detects on-disk corruption)."""
        m = _KEY_RE.match(key)
        if m is None:
            raise InvalidInput(f"not a store key: {key!r}")
        return sha256_file(self.local_path(key)) == m.group("sha")

    def leftover_temp_files(self) -> list[Path]:
        """Temp files left by a crashed writer (tests and `sonoseg status` report them)."""
        return sorted(self.root.rglob(f"{TEMP_PREFIX}*")) if self.root.exists() else []


class StagedWrites:
    """Wraps a store for one unit of work and remembers the blobs it newly created.

    If the unit of work fails (bad input, constraint violation, crash before commit),
    :meth:`discard` removes exactly those blobs, so no orphan file is left behind. Blobs that
    already existed are never touched.
    """

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self.created: list[str] = []

    def put_bytes(self, namespace: str, data: bytes, suffix: str = "") -> StoredBlob:
        blob = self.store.put_bytes(namespace, data, suffix)
        if blob.created:
            self.created.append(blob.key)
        return blob

    def discard(self) -> None:
        for key in reversed(self.created):
            self.store.delete(key)
        self.created.clear()


@contextlib.contextmanager
def staged_writes(store: BlobStore):  # type: ignore[no-untyped-def]
    """``with staged_writes(store) as st, unit_of_work(f) as s:`` -- list the store FIRST (outer),
    so a failed commit (raised when the inner session block exits) also discards the new blobs."""
    staged = StagedWrites(store)
    try:
        yield staged
    except BaseException:
        staged.discard()
        raise
