"""The dashboard's CSRF token: a browser holding basic-auth credentials sends them to any page that
posts to this origin, so the two buttons that change data (promote, rollback) also need a token
that only a page served by sonoseg contains.

The token is an HMAC-SHA256 of a fixed label under a key derived from the installation's secret
key file (``<data_dir>/pseudonym.key``, shared by every process on one data directory, so every
gunicorn worker accepts a token another rendered) and the basic-auth credentials (changing the
password invalidates old pages). The key itself is never sent; the token cannot be turned back
into it. It is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac

from backend.services.pseudonyms import load_or_create_key
from backend.settings import Settings

FIELD = "csrf_token"
HEADER = "X-CSRF-Token"
_LABEL = b"sonoseg dashboard csrf v1"


def csrf_key(settings: Settings) -> bytes:
    material = b"\0".join([_LABEL, settings.basic_auth_user.encode(), settings.basic_auth_password.encode()])
    return hmac.new(load_or_create_key(settings.data_dir), material, hashlib.sha256).digest()


def token(key: bytes) -> str:
    return hmac.new(key, b"form", hashlib.sha256).hexdigest()


def valid(key: bytes, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(token(key).encode(), (given or "").encode())
