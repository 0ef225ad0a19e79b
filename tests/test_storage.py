"""The content-addressed store: dedup, atomic writes, cleanup of a failed unit of work."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.errors import InvalidInput, NotFound
from backend.storage.blobs import LocalBlobStore, sha256_bytes, staged_writes


def test_put_is_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    a = store.put_bytes("images", b"hello", ".png")
    b = store.put_bytes("images", b"hello", ".png")
    assert a.key == b.key == f"images/{sha256_bytes(b'hello')[:2]}/{sha256_bytes(b'hello')}.png"
    assert a.created and not b.created
    assert store.get_bytes(a.key) == b"hello"
    assert store.verify(a.key)
    assert store.leftover_temp_files() == []


def test_corruption_is_detected(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    key = store.put_bytes("masks", b"mask-bytes", ".png").key
    store.local_path(key).write_bytes(b"tampered")
    assert not store.verify(key)


def test_bad_keys_and_namespaces_are_refused(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(InvalidInput):
        store.put_bytes("../etc", b"x")
    with pytest.raises(InvalidInput):
        store.get_bytes("images/../../etc/passwd")
    with pytest.raises(NotFound):
        store.get_bytes("images/ab/" + "ab" * 32 + ".png")


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalBlobStore(tmp_path)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("backend.storage.atomic.os.replace", broken_replace)
    with pytest.raises(OSError):
        store.put_bytes("images", b"payload", ".png")
    assert store.leftover_temp_files() == []
    assert not list(tmp_path.rglob("*.png"))


def test_staged_writes_discard_only_new_blobs_on_failure(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    old = store.put_bytes("images", b"already there", ".png")
    with pytest.raises(RuntimeError):
        with staged_writes(store) as staged:
            again = staged.put_bytes("images", b"already there", ".png")
            new = staged.put_bytes("images", b"brand new", ".png")
            assert store.exists(new.key)
            raise RuntimeError("commit failed")
    assert store.exists(old.key) and again.key == old.key
    assert not store.exists(new.key)
