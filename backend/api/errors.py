"""The one place where errors become HTTP answers: always JSON, always with a message.

Label Studio shows the exception text of a failed call rather than our body, but people using
curl, and our logs, read the message. A :class:`SonosegError` gets the status of the nearest
class in :data:`HTTP_STATUS` (the one table; the core error classes know nothing of HTTP);
Flask's own errors (404, 405, 413...) keep theirs; anything else is a logged 500 without internals.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.errors import (
    CheckpointError,
    Conflict,
    InvalidImage,
    InvalidInput,
    NotFound,
    NotReady,
    PayloadTooLarge,
    SonosegError,
    Unauthorized,
    UpstreamError,
)

log = logging.getLogger(__name__)


HTTP_STATUS: dict[type[SonosegError], int] = {
    InvalidInput: 400,  # UnknownLabel and InvalidLabelConfig too
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    InvalidImage: 422,
    CheckpointError: 422,
    UpstreamError: 502,
    NotReady: 503,
    SonosegError: 500,
}


def http_status_of(exc: SonosegError) -> int:
    """The status of the most specific class of ``exc`` in :data:`HTTP_STATUS` (by its MRO)."""
    for cls in type(exc).__mro__:
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_response(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"status": "error", "error": message}), status


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(SonosegError)
    def _sonoseg(exc: SonosegError) -> tuple[Response, int]:
        status = http_status_of(exc)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, exc.message)
        else:
            log.info("%s %s refused (%d): %s", request.method, request.path, status, exc.message)
        response, code = error_response(status, exc.message)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Basic realm="sonoseg"'
        return response, code

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> tuple[Response, int]:
        limit = app.config.get("MAX_CONTENT_LENGTH")
        log.info("%s %s refused: body over %s bytes", request.method, request.path, limit)
        return error_response(413, f"request body is over the {limit}-byte limit (SONOSEG_MAX_REQUEST_BYTES)")

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        return error_response(status, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("%s %s failed unexpectedly", request.method, request.path)
        return error_response(500, f"internal error ({type(exc).__name__}); see the sonoseg server log")
