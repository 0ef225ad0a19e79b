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
from hashlib import sha256
from pathlib import Path


def load_or_create_key(data_dir: Path) -> bytes:
    path = Path(data_dir) / "pseudonym.key"
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.hex().encode())
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return key


def pseudonymise(raw: str, key: bytes) -> str:
    """``raw`` (a patient id, a folder name...) -> ``subj-<16 hex>``."""
    return "subj-" + hmac.new(key, raw.encode("utf-8"), sha256).hexdigest()[:16]
