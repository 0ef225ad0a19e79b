"""Request bodies as JSON objects, refused with a 4xx (never a 500) when they cannot be one.

Why not ``request.get_json()``:

- Python's JSON parser recurses once per nesting level, so a body of ~1,000 nested brackets
  raised ``RecursionError`` (a 500), and one a little shallower parsed, then crashed whatever
  walked it next (``json.dumps`` for the event key, the JSON column). The parser's own guard
  is turned into a 400, and a parsed body deeper than :data:`MAX_DEPTH` (measured without
  recursion) is refused too. Label Studio's deepest body (a webhook with brush results) is
  about 6 levels deep.
- ``get_json(silent=True)`` swallowed Werkzeug's "too large" for a chunked body over
  ``MAX_CONTENT_LENGTH`` and answered "not valid JSON"; reading the stream directly lets the 413
  through.
- ``NaN``/``Infinity`` are not JSON: they are refused here rather than stored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flask import Request

from backend.errors import InvalidInput, PayloadTooLarge

MAX_DEPTH = 64


def nesting_depth(value: object, limit: int = MAX_DEPTH) -> int:
    """The nesting depth of a parsed JSON value, walked without recursion; stops past ``limit``.

    Raises :class:`InvalidInput` for a NUL character in any key or string: PostgreSQL's text and
    JSONB types cannot hold one (the insert failed with a 500), and no Label Studio field has one.
    """
    if isinstance(value, str):
        _check_text(value)
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
            for key in item:
                _check_text(key)
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        for child in children:  # only containers are pushed: scalars are checked in place
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif isinstance(child, str):
                _check_text(child)
    return deepest


def _check_text(text: str) -> None:
    if "\x00" in text:
        raise InvalidInput("the request body holds a NUL character (\\u0000), which sonoseg does not store")


def _no_constants(name: str) -> Any:
    raise InvalidInput(f"the request body holds {name}, which is not valid JSON")


MAX_INT_DIGITS = 64
"""No field Label Studio sends needs a longer integer; Python refuses over 4,300 digits with a
ValueError (a 500), and converting long ones costs quadratic time."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise InvalidInput(
            f"the request body holds an integer of {len(text)} digits; at most {MAX_INT_DIGITS} are accepted"
        )
    return int(text)


def parse_json_object(raw: bytes, *, max_depth: int = MAX_DEPTH) -> Mapping[str, Any]:
    """``raw`` as a JSON object, or :class:`InvalidInput` saying what is wrong with it."""
    if not raw.strip():
        raise InvalidInput("the request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the request body is not UTF-8 text (byte {exc.start})") from exc
    try:
        body = json.loads(text, parse_constant=_no_constants, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except RecursionError as exc:  # the C parser's own guard, at ~1,000 levels
        raise InvalidInput(f"the request body is nested more than {max_depth} levels deep") from exc
    if nesting_depth(body, max_depth) > max_depth:
        raise InvalidInput(f"the request body is nested more than {max_depth} levels deep")
    if not isinstance(body, Mapping):
        raise InvalidInput(f"expected a JSON object, got a JSON {type(body).__name__}")
    return body


def request_body(request: Request) -> bytes:
    """The raw body, refusing more than ``MAX_CONTENT_LENGTH`` bytes with a 413.

    With a Content-Length, Werkzeug refuses an oversized body before reading it. A chunked body
    has none, and Werkzeug's limited stream then stops at the limit and returns what it read (a
    truncated body, which parsed as "not valid JSON"); so such a body is read here, one byte
    past the limit at most, and refused if it goes on.
    """
    limit = request.max_content_length
    cached = getattr(request, "_sonoseg_body", None)
    if cached is not None:
        return bytes(cached)
    if request.content_length is not None or limit is None or "wsgi.input_terminated" not in request.environ:
        body = request.get_data(cache=True)
    else:
        stream = request.environ["wsgi.input"]
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = stream.read(min(1 << 16, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"request body is over the {limit}-byte limit (SONOSEG_MAX_REQUEST_BYTES)")
        body = b"".join(chunks)
    request._sonoseg_body = body  # type: ignore[attr-defined]
    return body


def request_json_object(request: Request) -> Mapping[str, Any]:
    """The request's body as a JSON object (see :func:`request_body` for the size limit)."""
    return parse_json_object(request_body(request))
