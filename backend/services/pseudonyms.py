"""Subject pseudonyms: a keyed hash, so a real patient id or file name never reaches the database.

The key lives in ``<data_dir>/pseudonym.key`` (created on first use, mode 0600). The same raw
identifier always maps to the same pseudonym within one installation (so frames of one subject
stay together), and the pseudonym cannot be reversed without the key (a plain hash of a short
hospital number could be brute-forced).
"""

from __future__ import annotations

import hmac
import os
import secrets
import tempfile
from hashlib import sha256
from pathlib import Path

from backend.storage.private import private_dir


def load_or_create_key(data_dir: Path) -> bytes:
    """Read the installation's key, creating it on first use.

    Safe when several processes start at once: the key is written completely to a temp file and
    then hard-linked into place, which fails if another process won; everyone then reads the
    winner's complete file.
    """
    path = Path(data_dir) / "pseudonym.key"
    if not path.exists():
        private_dir(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-key-")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, secrets.token_bytes(32).hex().encode())
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    return bytes.fromhex(path.read_text().strip())


def pseudonymise(raw: str, key: bytes) -> str:
    """``raw`` (a patient id, a folder name...) -> ``subj-<16 hex>``."""
    return "subj-" + hmac.new(key, raw.encode("utf-8"), sha256).hexdigest()[:16]


def source_ref(raw: str, key: bytes) -> str:
    """An image's source (a resolved file path, a Label Studio image URL) -> ``src-<32 hex>``.

    Keyed like subjects, with its own domain prefix so a source reference never equals a subject
    pseudonym of the same string. 128 bits: distinct paths never collide in practice, which the
    dedup of sources relies on.
    """
    return "src-" + hmac.new(key, b"source:" + raw.encode("utf-8", "surrogateescape"), sha256).hexdigest()[:32]
