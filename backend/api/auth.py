"""Who may call the backend: optional HTTP basic auth on every route, a secret for webhooks.

- Basic auth (``SONOSEG_BASIC_AUTH_USER`` / ``_PASSWORD``) is what Label Studio sends on every
  ML call when the model connection uses "Basic Authentication".
- The webhook Label Studio creates automatically for a connected model carries no credentials,
  so ``/webhook`` also accepts a shared secret (``SONOSEG_WEBHOOK_SECRET``): the header
  ``X-Sonoseg-Webhook-Secret`` (set it in Label Studio under Settings > Webhooks) or the URL
  token ``?token=``. With a secret set, ``/webhook`` takes either the secret or valid basic auth
  (Start Training is posted to ``/webhook`` by Label Studio's ML client, with basic auth only).

Comparisons are constant-time (``hmac.compare_digest`` on bytes). Credentials are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging

from flask import Request

from backend.errors import Unauthorized
from backend.settings import Settings

log = logging.getLogger(__name__)

WEBHOOK_SECRET_HEADER = "X-Sonoseg-Webhook-Secret"
WEBHOOK_TOKEN_PARAM = "token"


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def basic_auth_ok(request: Request, settings: Settings) -> bool:
    """True when the request carries the configured basic credentials (both compared, always)."""
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user, sep, password = decoded.partition(":")
    if not sep:
        return False
    user_ok = _same(user, settings.basic_auth_user)
    password_ok = _same(password, settings.basic_auth_password)
    return user_ok and password_ok


def webhook_secret_ok(request: Request, settings: Settings) -> bool:
    given = request.headers.get(WEBHOOK_SECRET_HEADER) or request.args.get(WEBHOOK_TOKEN_PARAM) or ""
    return bool(given) and _same(given, settings.webhook_secret)


def basic_auth_enabled(settings: Settings) -> bool:
    return bool(settings.basic_auth_user and settings.basic_auth_password)


def authorize(request: Request, settings: Settings, *, webhook: bool = False) -> None:
    """Raise :class:`Unauthorized` unless the request may proceed."""
    if webhook and settings.webhook_secret:
        if webhook_secret_ok(request, settings) or (basic_auth_enabled(settings) and basic_auth_ok(request, settings)):
            return
        raise Unauthorized(
            f"this webhook needs the shared secret: set the {WEBHOOK_SECRET_HEADER} header on the Label Studio "
            "webhook (Settings > Webhooks), or add ?token=<secret> to its URL"
        )
    if basic_auth_enabled(settings) and not basic_auth_ok(request, settings):
        raise Unauthorized(
            "HTTP basic authentication required: set the same user and password in Label Studio's "
            "model connection (Authentication method: Basic Authentication)"
        )
