"""The reliability table: a real ``sonoseg serve`` against classes of hostile and broken input.

    .venv/bin/python bench/adversarial_inputs.py --out docs/reliability.md

What it does, all on loopback (127.0.0.1) and in a temporary data directory:

1. migrates a fresh SQLite database (``sonoseg db upgrade``) and starts ``sonoseg serve`` (the
   development server) with basic auth and a webhook secret on, ``LABEL_STUDIO_URL`` pointing at
   a stand-in Label Studio run here (a threading HTTP server that serves a few PNGs under
   ``/data/upload/``, a project and tasks under ``/api/``, redirects, and records every
   Authorization header it receives), and ``SONOSEG_LOCAL_FILES_ROOT`` at a folder of files and
   traps (symlink loops, a FIFO, a link to /dev/zero, a 300 MB sparse file);
2. runs an "evil" listener on another port, which answers every request with a valid PNG and
   records every header: it must never see a credential;
3. sends each class of bad input (many generated cases per class; every loop bounded in count
   and time) and classifies each answer: clean 4xx (a 4xx with a JSON ``error`` message),
   per-task failure (/predict answered 200 but the task got an empty result and nothing was
   stored for it), 200 ok, 5xx, hang (no answer in 10 s), connection error, other;
4. checks afterwards that nothing bad was stored (no webhook_event row for a refused event, no
   image stored from a hostile URL), that the evil listener saw no credential, that Label Studio
   received only the API token, and that the server is still alive;
5. prints a Markdown table and, with ``--out``, writes it with the command, date and machine.

No count is hard-coded: every number in the table comes from the run.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.server
import json
import os
import platform
import random
import secrets
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.imaging.io import encode_png
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.labelstudio.payloads import scrub_webhook
from backend.labelstudio.rle import mask_to_rle
from backend.services.webhooks import event_key

HANG_SECONDS = 10.0
PREDICT_HANG_SECONDS = 100.0  # Label Studio's own ML_TIMEOUT_PREDICT: a /predict answered within it is no hang
CLASS_BUDGET_SECONDS = 240.0  # a class that takes longer stops; the rest of its cases are counted as skipped
RUN_BUDGET_SECONDS = 40 * 60.0
IMAGE_SIDE = 64
LS_PROJECT = 1
PROJECT_REF = f"{LS_PROJECT}.1700000000"
OUTCOMES = ("clean_4xx", "task_failure", "ok", "5xx", "hang", "conn", "other")
HEADINGS = {
    "clean_4xx": "clean 4xx",
    "task_failure": "per-task failure",
    "ok": "200 ok",
    "5xx": "500",
    "hang": "hang",
    "conn": "conn. error",
    "other": "other",
}
DELETE = object()  # a field value meaning "remove this field"


# -- images ---------------------------------------------------------------------------------------
def grey_png(side: int = IMAGE_SIDE, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 256, (side, side), dtype=np.uint8))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png_rgb16(side: int = 8192) -> bytes:
    """A side x side 16-bit RGB PNG of zeros: ~400 KB on the wire, 400 MB of pixels (at the side limit)."""
    row = b"\x00" * (1 + side * 6)
    packer = zlib.compressobj(9)
    parts = [packer.compress(row) for _ in range(side)]
    parts.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def header_bomb_png(side: int = 30000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side + 1) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def jpeg_header_bomb() -> bytes | None:
    """A 16x16 JPEG whose SOF says 65500x65500 (None when Pillow is not installed)."""
    try:
        from PIL import Image
    except ImportError:
        return None
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    at = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, at + 5, 65500, 65500)
    return bytes(data)


def multipage_tiff(subfile_types: list[int | None], side: int = 8) -> bytes:
    """Uncompressed grey pages with the given NewSubfileType values (None: tag absent)."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    starts = []
    for _ in subfile_types:
        starts.append(len(out))
        out += bytes(side * side)
    link = 4
    for subfile, start in zip(subfile_types, starts, strict=True):
        struct.pack_into("<I", out, link, len(out))
        entries = [(254, 4, subfile)] if subfile is not None else []
        entries += [
            (256, 4, side),
            (257, 4, side),
            (258, 3, 8),
            (259, 3, 1),
            (262, 3, 1),
            (273, 4, start),
            (277, 3, 1),
            (278, 4, side),
            (279, 4, side * side),
        ]
        out += struct.pack("<H", len(entries))
        for tag, kind, value in entries:
            out += struct.pack("<HHI", tag, kind, 1) + (
                struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
            )
        link = len(out)
        out += b"\x00\x00\x00\x00"
    return bytes(out)


# -- the stand-in Label Studio and the evil listener ---------------------------------------------------
@dataclass
class Seen:
    server: str
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Recorder:
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, item: Seen) -> None:
        with self.lock:
            if len(self.seen) < 100_000:
                self.seen.append(item)


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "standin/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def standin_label_studio(recorder: Recorder, files: dict[str, bytes], evil_base: str) -> type[_Quiet]:
    redirects = {
        "redirect-evil.png": f"{evil_base}/stolen.png",
        "redirect-evil-userinfo.png": f"http://lsuser:lspass@{evil_base.split('//', 1)[1]}/stolen.png",
        "redirect-relative-evil.png": "//" + evil_base.split("//", 1)[1] + "/stolen.png",
        "redirect-backslash.png": "http://127.0.0.1:1\\@" + evil_base.split("//", 1)[1] + "/stolen.png",
        "redirect-file.png": "file:///etc/passwd",
        "redirect-loop.png": "/data/upload/1/redirect-loop.png",
        "redirect-ls-then-evil.png": "/data/upload/1/redirect-evil.png",
        "redirect-crlf.png": f"{evil_base}/x.png\r\nX-Injected: 1",
    }

    class LabelStudio(_Quiet):
        def do_GET(self) -> None:
            recorder.add(Seen("ls", self.command, self.path, dict(self.headers.items())))
            route = urlsplit(self.path)
            parts = route.path.strip("/").split("/")
            if route.path.startswith("/data/upload/"):
                name = parts[-1]
                if name in redirects:
                    location = redirects[name]
                    self.send_response(302)
                    self.send_header("Location", location.split("\r\n")[0] if "\r\n" in location else location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if name == "404.png":
                    return self.reply(404, b"not found", "text/plain")
                if name == "500.png":
                    return self.reply(500, b"boom", "text/plain")
                if name == "html.png":
                    return self.reply(200, b"<html><body>login</body></html>", "text/html")
                if name in files:
                    return self.reply(200, files[name], "image/png")
                return self.reply(404, b"no such upload", "text/plain")
            if len(parts) >= 3 and parts[0] == "tasks" and parts[2] == "presign":  # -> a "cloud" URL elsewhere
                uri = parse_qs(route.query).get("fileuri", [""])[0]
                try:
                    scheme = base64.urlsafe_b64decode(uri + "=" * (-len(uri) % 4)).split(b":", 1)[0]
                except ValueError:
                    scheme = b""
                if scheme not in (b"s3", b"gs"):  # like Label Studio: only a connected storage presigns
                    return self.reply(404, b'{"detail": "no storage for this URI"}', "application/json")
                self.send_response(303)
                self.send_header("Location", f"{evil_base}/presigned.png")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if parts[:2] == ["api", "projects"] and len(parts) >= 3:
                body = {"id": LS_PROJECT, "title": "bench", "label_config": DEFAULT_LABEL_CONFIG}
                return self.reply(200, json.dumps(body).encode(), "application/json")
            if parts[:2] == ["api", "tasks"] and len(parts) >= 3 and parts[2].isdigit():
                body = {
                    "id": int(parts[2]),
                    "data": {"image": "/data/upload/1/ok.png"},
                    "project": LS_PROJECT,
                    "annotations": [],
                }
                return self.reply(200, json.dumps(body).encode(), "application/json")
            self.reply(404, b'{"detail": "not found"}', "application/json")

        do_HEAD = do_GET

        def do_POST(self) -> None:
            recorder.add(Seen("ls", self.command, self.path, dict(self.headers.items())))
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(min(length, 1 << 20))
            self.reply(404, b'{"detail": "not found"}', "application/json")

    return LabelStudio


def evil_listener(recorder: Recorder, png: bytes) -> type[_Quiet]:
    class Evil(_Quiet):
        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except (ConnectionError, OSError):
                pass

        def _any(self) -> None:
            recorder.add(Seen("evil", self.command, self.path, dict(self.headers.items())))
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(min(length, 1 << 20))
            self.reply(200, png, "image/png")

        do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = do_OPTIONS = _any

    return Evil


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client (sonoseg) that hangs up early is expected here, not news


def serve_in_thread(handler: type[_Quiet]) -> http.server.ThreadingHTTPServer:
    server = _QuietServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# -- a raw HTTP client: bounded, and able to send what requests/http.client refuse --------------------
@dataclass
class Answer:
    status: int | None
    body: bytes
    seconds: float
    error: str | None = None  # "timeout" = hang; anything else = connection error

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


def http_call(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str],
    body: bytes | None = None,
    *,
    chunks: Iterator[bytes] | None = None,
    timeout: float = HANG_SECONDS,
    raw_head: str | None = None,
) -> Answer:
    """One request on a fresh connection (Connection: close), answered within ``timeout`` or a hang."""
    started = time.monotonic()
    deadline = started + timeout
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        return Answer(None, b"", time.monotonic() - started, f"connect: {type(exc).__name__}")
    try:
        if raw_head is None:
            lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
            names = {k.lower() for k in headers}
            for key, value in headers.items():
                lines.append(f"{key}: {value}")
            if chunks is not None:
                lines.append("Transfer-Encoding: chunked")
            elif body is not None and "content-length" not in names:
                lines.append(f"Content-Length: {len(body)}")
            raw_head = "\r\n".join(lines) + "\r\n\r\n"
        sent_error = None
        try:
            sock.sendall(raw_head.encode("latin-1", "replace"))
            if chunks is not None:
                for piece in chunks:
                    if time.monotonic() > deadline:
                        break
                    sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                sock.sendall(b"0\r\n\r\n")
            elif body:
                view = memoryview(body)
                for at in range(0, len(body), 1 << 16):
                    if time.monotonic() > deadline:
                        break
                    sock.sendall(view[at : at + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError) as exc:  # the server may have answered and closed
            sent_error = type(exc).__name__
        except TimeoutError:
            return Answer(None, b"", time.monotonic() - started, "timeout")
        data = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return Answer(None, bytes(data), time.monotonic() - started, "timeout")
            sock.settimeout(left)
            try:
                piece = sock.recv(1 << 16)
            except TimeoutError:
                return Answer(None, bytes(data), time.monotonic() - started, "timeout")
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
            if _complete(bytes(data), method):  # like any HTTP client: an answer ends at its Content-Length
                break
        seconds = time.monotonic() - started
    finally:
        sock.close()
    head, _, payload = bytes(data).partition(b"\r\n\r\n")
    first = head.split(b"\r\n", 1)[0].split()
    if len(first) < 2 or not first[1].isdigit():
        if data:  # an HTTP/0.9 answer: no status line, only the body (what a server sends a 0.9 request)
            return Answer(None, bytes(data), seconds, "http/0.9 body")
        return Answer(None, bytes(data), seconds, f"no HTTP answer ({sent_error or 'connection closed'})")
    if b"transfer-encoding: chunked" in head.lower():
        payload = _dechunk(payload)
    return Answer(int(first[1]), payload, seconds)


def _complete(data: bytes, method: str) -> bool:
    """Whether ``data`` holds a whole response (headers, then Content-Length bytes or none for HEAD).

    Needed because werkzeug's development server drains an unread request body with a blocking
    read after answering, so it closes the connection only when the client does: a client that
    waited for the close instead of counting bytes would report a hang that Label Studio never sees.
    """
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    if method == "HEAD":
        return True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False


def _dechunk(data: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            return bytes(out)
        size = int(data[at:end].split(b";")[0] or b"0", 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        at = end + 2 + size + 2


# -- cases ------------------------------------------------------------------------------------------
@dataclass
class Case:
    label: str
    method: str
    target: str
    body: bytes | None = None
    headers: dict[str, str] | None = None  # None: the valid defaults for the route
    extra_headers: dict[str, str] = field(default_factory=dict)
    chunks: Callable[[], Iterator[bytes]] | None = None
    raw_head: str | None = None
    tasks: list[int | None] | None = None  # /predict: the task ids, in order
    webhook: Any = None  # /webhook: the body as sent (to find a stored row)
    hostile_tasks: tuple[int, ...] = ()  # tasks whose image must never be stored


class Raw:
    """A JSON token written as is (numbers JSON allows but Python would not produce)."""

    def __init__(self, token: str) -> None:
        self.token = token


def to_json(value: Any) -> bytes:
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.token)
            return f"\u0000RAW{len(raws) - 1}\u0000"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items() if x is not DELETE}
        if isinstance(v, list):
            return [swap(x) for x in v if x is not DELETE]
        return v

    text = json.dumps(swap(value))
    for n, token in enumerate(raws):
        text = text.replace(json.dumps(f"\u0000RAW{n}\u0000"), token)
    return text.encode()


def with_field(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A deep copy of ``body`` with ``path`` set to ``value`` (DELETE removes it)."""
    copy = json.loads(json.dumps(body))
    node = copy
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        if isinstance(node, dict):
            node.pop(path[-1], None)
        elif path[-1] < len(node):
            del node[path[-1]]
    else:
        node[path[-1]] = value
    return copy


class Ids:
    def __init__(self, start: int) -> None:
        self._next = start

    def __call__(self) -> int:
        self._next += 1
        return self._next


@dataclass
class World:
    ls_port: int
    evil_port: int
    auth: str  # the valid Authorization header
    secret: str
    task_ids: Ids = field(default_factory=lambda: Ids(100_000))
    annotation_ids: Ids = field(default_factory=lambda: Ids(500_000))
    mask_rle: list[int] = field(default_factory=list)

    @property
    def ls(self) -> str:
        return f"http://127.0.0.1:{self.ls_port}"

    @property
    def evil(self) -> str:
        return f"127.0.0.1:{self.evil_port}"

    def region(
        self, rle: Any = None, labels: Any = None, width: Any = IMAGE_SIDE, height: Any = IMAGE_SIDE
    ) -> dict[str, Any]:
        return {
            "id": secrets.token_hex(4),
            "type": "brushlabels",
            "from_name": "tag",
            "to_name": "image",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {
                "format": "rle",
                "rle": self.mask_rle if rle is None else rle,
                "brushlabels": ["Nerve"] if labels is None else labels,
            },
        }

    def webhook_body(self, image: str = "/data/upload/1/ok.png", results: list[Any] | None = None) -> dict[str, Any]:
        task = self.task_ids()
        return {
            "action": "ANNOTATION_CREATED",
            "project": {"id": LS_PROJECT, "title": "bench", "label_config": DEFAULT_LABEL_CONFIG},
            "task": {"id": task, "data": {"image": image}, "project": LS_PROJECT},
            "annotation": {
                "id": self.annotation_ids(),
                "task": task,
                "was_cancelled": False,
                "updated_at": "2026-01-01T00:00:00Z",
                "completed_by": 1,
                "lead_time": 3.5,
                "result": [self.region()] if results is None else results,
            },
        }

    def predict_body(self, images: list[str] | None = None, project: Any = PROJECT_REF) -> dict[str, Any]:
        tasks = [{"id": self.task_ids(), "data": {"image": image}} for image in (images or ["/data/upload/1/ok.png"])]
        return {"tasks": tasks, "project": project, "label_config": DEFAULT_LABEL_CONFIG, "params": {"context": None}}

    def setup_body(self) -> dict[str, Any]:
        return {
            "project": PROJECT_REF,
            "schema": DEFAULT_LABEL_CONFIG,
            "hostname": self.ls,
            "access_token": "x",
            "extra_params": None,
        }

    # request builders
    def post(
        self, label: str, route: str, body: Any, *, raw: bytes | None = None, hostile: bool = False, **kw: Any
    ) -> Case:
        data = raw if raw is not None else to_json(body)
        tasks = None
        if route == "/predict" and isinstance(body, dict) and isinstance(body.get("tasks"), list):
            tasks = [
                t.get("id") if isinstance(t, dict) and isinstance(t.get("id"), int) else None for t in body["tasks"]
            ]
        hostile_tasks = tuple(t for t in (tasks or []) if t is not None) if hostile else ()
        if route == "/webhook" and hostile and isinstance(body, dict):
            task = body.get("task")
            if isinstance(task, dict) and isinstance(task.get("id"), int):
                hostile_tasks = (task["id"],)
        return Case(
            label,
            "POST",
            route,
            data,
            tasks=tasks,
            webhook=body if route == "/webhook" else None,
            hostile_tasks=hostile_tasks,
            **kw,
        )

    def default_headers(self, case: Case) -> dict[str, str]:
        headers = {"Authorization": self.auth, "Content-Type": "application/json", "Accept": "application/json"}
        if case.target.startswith("/webhook"):
            headers["X-Sonoseg-Webhook-Secret"] = self.secret
        return headers


# -- the classes -----------------------------------------------------------------------------------------
def class_control(w: World) -> Iterator[Case]:
    yield Case("GET /health", "GET", "/health")
    yield w.post("/setup default config", "/setup", w.setup_body())
    yield w.post("/predict one upload", "/predict", w.predict_body())
    yield w.post("/predict three uploads", "/predict", w.predict_body(["/data/upload/1/ok.png"] * 3))
    yield w.post("/predict local file", "/predict", w.predict_body(["/data/local-files/?d=ok.png"]))
    yield w.post("/webhook ANNOTATION_CREATED", "/webhook", w.webhook_body())
    yield w.post("/webhook START_TRAINING", "/webhook", {"action": "START_TRAINING", "project": {"id": LS_PROJECT}})
    yield Case("GET /versions", "GET", "/versions")
    yield Case("GET /metrics", "GET", "/metrics")


MALFORMED = [
    b"",
    b"{",
    b'{"project": ',
    b"[1, 2",
    b"{'single': 'quotes'}",
    b'{"a": 1,}',
    b"nul",
    b"NaN",
    b'{"a": NaN}',
    b'{"a": Infinity}',
    b'{"a": -Infinity}',
    b"\xff\xfe{\x00}\x00",
    b"\xef\xbb\xbf{}",
    b'{"a": "\\ud800"}',
    b'{"a": 1} trailing',
    b"[]",
    b"123",
    b'"a string"',
    b"null",
    b"true",
    b'{"a": "\x00"}',
    b"\x00" * 64,
    b'{"tasks": [}',
    b'{"a": 1e999999}',
    b'{"a": ' + b"9" * 5000 + b"}",
    b'{"project": 1, "project": "x"}',
    b"\x1f\x8b\x08\x00\x00\x00\x00\x00",
    b'{"a":"\xc3\x28"}',
    b"\r\n\r\n",
]


def class_malformed_json(w: World) -> Iterator[Case]:
    rng = random.Random(1)
    bodies = [*MALFORMED, *(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(6))]
    for route in ("/setup", "/predict", "/webhook"):
        for n, body in enumerate(bodies):
            yield w.post(f"{route} malformed #{n}: {body[:40]!r}", route, None, raw=body)
    valid = {"/setup": w.setup_body, "/predict": w.predict_body, "/webhook": w.webhook_body}
    for route, make in valid.items():  # valid JSON under a wrong content type (Label Studio always sends JSON)
        yield w.post(
            f"{route} valid body, Content-Type text/plain; charset=utf-16",
            route,
            make(),
            extra_headers={"Content-Type": "text/plain; charset=utf-16"},
        )


def deep(depth: int, shape: str) -> str:
    if shape == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def class_deep_json(w: World) -> Iterator[Case]:
    for depth in (1_000, 10_000, 100_000):
        for shape in ("array", "object"):
            text = deep(depth, shape)
            for route in ("/setup", "/predict", "/webhook"):
                yield w.post(f"{route} top-level {shape} {depth} levels", route, None, raw=text.encode())
            inner = {
                "/setup": f'{{"project": "{PROJECT_REF}", "schema": {text}}}',
                "/predict": f'{{"project": "{PROJECT_REF}", "tasks": [{{"id": {w.task_ids()}, "data": {{"image": {text}}}}}]}}',
                "/webhook": f'{{"action": "ANNOTATION_CREATED", "project": {{"id": 1}}, "annotation": {{"id": {w.annotation_ids()}, '
                f'"task": {w.task_ids()}, "result": {text}}}}}',
            }
            for route, body in inner.items():
                yield w.post(f"{route} {shape} {depth} levels inside a field", route, None, raw=body.encode())


WRONG = [None, True, 0, -1, 1.5, 2**70, "", "x", "x" * 100_000, [], [1], {}, {"id": 1}]


def class_wrong_types(w: World) -> Iterator[Case]:
    fields: list[tuple[str, Callable[[], Any], tuple[Any, ...]]] = [
        ("/setup", w.setup_body, ("project",)),
        ("/setup", w.setup_body, ("schema",)),
        ("/setup", w.setup_body, ("hostname",)),
        ("/setup", w.setup_body, ("access_token",)),
        ("/setup", w.setup_body, ("extra_params",)),
        ("/predict", w.predict_body, ("tasks",)),
        ("/predict", w.predict_body, ("tasks", 0)),
        ("/predict", w.predict_body, ("tasks", 0, "id")),
        ("/predict", w.predict_body, ("tasks", 0, "data")),
        ("/predict", w.predict_body, ("tasks", 0, "data", "image")),
        ("/predict", w.predict_body, ("project",)),
        ("/predict", w.predict_body, ("label_config",)),
        ("/predict", w.predict_body, ("params",)),
        ("/predict", w.predict_body, ("params", "context")),
    ]
    for path in [
        ("action",),
        ("project",),
        ("project", "id"),
        ("project", "label_config"),
        ("project", "title"),
        ("task",),
        ("task", "id"),
        ("task", "data"),
        ("task", "data", "image"),
        ("task", "data", "subject"),
        ("annotation",),
        ("annotation", "id"),
        ("annotation", "task"),
        ("annotation", "result"),
        ("annotation", "result", 0),
        ("annotation", "result", 0, "type"),
        ("annotation", "result", 0, "from_name"),
        ("annotation", "result", 0, "to_name"),
        ("annotation", "result", 0, "value"),
        ("annotation", "result", 0, "value", "rle"),
        ("annotation", "result", 0, "value", "brushlabels"),
        ("annotation", "result", 0, "value", "format"),
        ("annotation", "result", 0, "original_width"),
        ("annotation", "result", 0, "original_height"),
        ("annotation", "was_cancelled"),
        ("annotation", "updated_at"),
        ("annotation", "completed_by"),
        ("annotation", "lead_time"),
        ("annotation", "ground_truth"),
    ]:
        fields.append(("/webhook", w.webhook_body, path))
    for route, make, path in fields:
        for value in [*WRONG, DELETE]:
            body = with_field(make(), path, value)
            shown = "missing" if value is DELETE else json.dumps(value)[:20]
            yield w.post(f"{route} {'.'.join(map(str, path))} = {shown}", route, body)


BAD_IDS: list[Any] = [
    0,
    -1,
    -(2**31),
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    10**30,
    Raw("1" + "0" * 400),
    Raw("1" + "0" * 5000),
    True,
    False,
    1.0,
    1.5,
    Raw("-0.0"),
    Raw("1e308"),
    Raw("1e400"),
    "1",
    "1.0",
    "0x10",
    "\u0661",
    " 7",
    None,
]


def class_bad_ids(w: World) -> Iterator[Case]:
    def deleted(action: str, key: str) -> Callable[[Any], tuple[str, Any]]:
        return lambda v: ("/webhook", {"action": action, "project": {"id": LS_PROJECT}, key: [{"id": v}]})

    targets: dict[str, Callable[[Any], tuple[str, Any]]] = {
        "/predict task id": lambda v: ("/predict", with_field(w.predict_body(), ("tasks", 0, "id"), v)),
        "/predict project": lambda v: ("/predict", with_field(w.predict_body(), ("project",), v)),
        "/setup project": lambda v: ("/setup", with_field(w.setup_body(), ("project",), v)),
        "/webhook project.id": lambda v: ("/webhook", with_field(w.webhook_body(), ("project", "id"), v)),
        "/webhook task.id": lambda v: ("/webhook", with_field(w.webhook_body(), ("task", "id"), v)),
        "/webhook annotation.id": lambda v: ("/webhook", with_field(w.webhook_body(), ("annotation", "id"), v)),
        "/webhook annotation.task": lambda v: ("/webhook", with_field(w.webhook_body(), ("annotation", "task"), v)),
        "/webhook completed_by": lambda v: (
            "/webhook",
            with_field(w.webhook_body(), ("annotation", "completed_by"), v),
        ),
        "ANNOTATIONS_DELETED id": deleted("ANNOTATIONS_DELETED", "annotations"),
        "TASKS_DELETED id": deleted("TASKS_DELETED", "tasks"),
    }
    for where, build in targets.items():
        for value in BAD_IDS:
            route, body = build(value)
            shown = (
                value.token[:12] + ("..." if len(value.token) > 12 else "") if isinstance(value, Raw) else repr(value)
            )
            yield w.post(f"{where} = {shown}", route, body)
    for value in ("1.1700000000", "0.17", "-1.17", "99999999999999999999.1", "1e3.1", "１.1"):  # the "id.ts" form
        yield w.post(f"/predict project = {value!r}", "/predict", with_field(w.predict_body(), ("project",), value))


def class_oversized(w: World) -> Iterator[Case]:
    big = 40 * 1024 * 1024

    def padded(route: str, size: int) -> bytes:
        base = {"/setup": w.setup_body(), "/predict": w.predict_body(), "/webhook": w.webhook_body()}[route]
        text = to_json(base)
        return text[:-1] + b', "pad": "' + b"x" * (size - len(text) - 12) + b'"}'

    def pieces(total: int, size: int = 1 << 20) -> Callable[[], Iterator[bytes]]:
        def gen() -> Iterator[bytes]:
            head = b'{"project": "' + PROJECT_REF.encode() + b'", "pad": "'
            yield head
            sent = len(head)
            while sent < total:
                yield b"x" * size
                sent += size
            yield b'"}'

        return gen

    for route in ("/setup", "/predict", "/webhook"):
        yield w.post(f"{route} 40 MB body with Content-Length", route, None, raw=padded(route, big))
        yield Case(f"{route} 40 MB chunked body", "POST", route, chunks=pieces(big))
        yield Case(
            f"{route} Content-Length 40 MB, 1 KB sent",
            "POST",
            route,
            body=b"{" + b" " * 1023,
            extra_headers={"Content-Length": str(big)},
        )
        yield Case(
            f"{route} Content-Length 10**12", "POST", route, body=b"{}", extra_headers={"Content-Length": str(10**12)}
        )
        yield Case(f"{route} Content-Length -1", "POST", route, body=b"{}", extra_headers={"Content-Length": "-1"})
        yield Case(f"{route} Content-Length 'abc'", "POST", route, body=b"{}", extra_headers={"Content-Length": "abc"})
    yield w.post(
        "/webhook 31 MB body (just under the limit)", "/webhook", None, raw=padded("/webhook", 31 * 1024 * 1024)
    )


def class_huge_results(w: World) -> Iterator[Case]:
    for count in (1_000_000, 3_000_000):
        rle = [0] * count
        yield w.post(
            f"/webhook RLE of {count} integers (64x64 region)", "/webhook", w.webhook_body(results=[w.region(rle=rle)])
        )
    rle = [0] * 7_000_000  # 21 MB of JSON, within the length limit of a 4096x4096 region
    yield w.post(
        "/webhook RLE of 7M integers declared 4096x4096",
        "/webhook",
        w.webhook_body(results=[w.region(rle=rle, width=4096, height=4096)]),
    )
    for regions in (1_000, 1_001, 5_000, 20_000):
        yield w.post(
            f"/webhook {regions} regions", "/webhook", w.webhook_body(results=[w.region() for _ in range(regions)])
        )
    for count in (1_000, 1_001):
        annotations = [{"id": w.annotation_ids(), "task": w.task_ids(), "result": [w.region()]} for _ in range(count)]
        yield w.post(
            f"/webhook ANNOTATIONS_CREATED with {count} annotations",
            "/webhook",
            {"action": "ANNOTATIONS_CREATED", "project": {"id": LS_PROJECT}, "annotation": annotations},
        )
    for count in (100, 1_000):
        yield w.post(f"/predict {count} tasks", "/predict", w.predict_body(["/data/upload/1/ok.png"] * count))
    yield w.post(
        "/webhook one region 65535x65535 declared, 64x64 image",
        "/webhook",
        w.webhook_body(results=[w.region(width=65535, height=65535)]),
    )


def class_unknown_labels(w: World) -> Iterator[Case]:
    for labels in (
        ["Tumour"],
        ["nerve"],
        [""],
        ["background"],
        ["Nerve", "Tumour"],
        [],
        [1],
        [None],
        ["x" * 10_000],
        [f"L{i}" for i in range(300)],
        "Nerve",
        {"Nerve": 1},
    ):
        yield w.post(
            f"/webhook brushlabels = {json.dumps(labels)[:30]}",
            "/webhook",
            w.webhook_body(results=[w.region(labels=labels)]),
        )

    def config(labels: str, brush: str = 'name="tag" toName="image"') -> str:
        return f'<View><Image name="image" value="$image"/><BrushLabels {brush}>{labels}</BrushLabels></View>'

    configs = {
        "label 'background'": config('<Label value="background"/>'),
        "duplicate labels": config('<Label value="A"/><Label value="A"/>'),
        "256 labels": config("".join(f'<Label value="L{i}"/>' for i in range(256))),
        "no labels": config(""),
        "Brush + Labels": '<View><Image name="image" value="$image"/><Brush name="b" toName="image"/>'
        '<Labels name="l" toName="image"><Label value="A"/></Labels></View>',
        "toName to nothing": config('<Label value="A"/>', 'name="tag" toName="nope"'),
        "different labels": config('<Label value="Tendon"/><Label value="Muscle"/>'),
        "DOCTYPE": '<!DOCTYPE v [<!ENTITY a "aaaa">]>' + config('<Label value="&a;"/>'),
    }
    for n, (what, xml) in enumerate(configs.items()):
        project = f"{100 + n}.1700000000"  # own projects: a changed config must not touch project 1
        yield w.post(f"/setup schema: {what}", "/setup", {"project": project, "schema": xml})
        yield w.post(
            f"/predict label_config: {what}", "/predict", w.predict_body(project=project) | {"label_config": xml}
        )


def rle_header(num: int, word_size: int = 8, sizes: tuple[int, ...] = (3, 4, 8, 16)) -> list[int]:
    bits = f"{num:032b}{word_size - 1:05b}" + "".join(f"{s - 1:04b}" for s in sizes) + "000"
    return [int(bits[k : k + 8], 2) for k in range(0, len(bits), 8)]


def class_bad_rle(w: World) -> Iterator[Case]:
    valid = w.mask_rle
    rng = random.Random(2)
    cases: dict[str, Any] = {
        "truncated to 5 bytes": valid[:5],
        "header only": valid[:7],
        "truncated half": valid[: len(valid) // 2],
        "last byte dropped": valid[:-1],
        "empty": [],
        "value 256": [*valid[:-1], 256],
        "value -1": [-1, *valid[1:]],
        "floats": [float(v) for v in valid],
        "strings": [str(v) for v in valid],
        "nested": [valid],
        "null inside": [*valid[:-1], None],
        "bools": [True] * 20,
        "a string": "0,29,76",
        "an object": {"rle": valid},
        "2**70 values": [2**70] * 10,
        "header claims 4 Gi words": [255, 255, 255, 255, *valid[4:]],
        "header for 32x32": mask_to_rle(np.ones((32, 32), bool)),
        "header for 65x64": mask_to_rle(np.ones((65, 64), bool)),
        "word size 12": rle_header(IMAGE_SIDE * IMAGE_SIDE * 4, 12),
        "word size 32": rle_header(5, 32),
        "1-bit words all literal, right length": rle_header(IMAGE_SIDE * IMAGE_SIDE * 4, 1, (16, 16, 16, 16))
        + [0] * 40,
        "trailing garbage": [*valid, *range(256)],
    }
    for n in range(12):
        length = rng.randrange(7, 400)
        cases[f"random bytes #{n} ({length})"] = [rng.randrange(256) for _ in range(length)]
    for n in range(6):
        mutated = list(valid)
        for _ in range(3):
            mutated[rng.randrange(7, len(mutated))] = rng.randrange(256)
        cases[f"3 bytes flipped #{n}"] = mutated
    for what, rle in cases.items():
        yield w.post(f"/webhook rle: {what}", "/webhook", w.webhook_body(results=[w.region(rle=rle)]))
    yield w.post(
        "/webhook rle: valid, declared 32x32 (image is 64x64)",
        "/webhook",
        w.webhook_body(results=[w.region(rle=mask_to_rle(np.ones((32, 32), bool)), width=32, height=32)]),
    )


def class_hostile_urls(w: World) -> Iterator[Case]:
    ls, evil = w.ls, w.evil
    lshost = ls.split("//", 1)[1]
    urls = [
        f"http://{evil}/x.png",
        f"http://{lshost}@{evil}/x.png",
        f"http://user:pass@{lshost}/data/upload/1/ok.png",
        f"http://{lshost}\\@{evil}/x.png",
        f"http:\\\\{evil}\\x.png",
        f"http://{evil}#@{lshost}/data/upload/1/ok.png",
        f"http://{evil}?@{lshost}/data/upload/1/ok.png",
        f"//{evil}/x.png",
        f"///{evil}/x.png",
        f"/\\{evil}/x.png",
        f"\\\\{evil}\\x.png",
        f"http://localhost:{w.evil_port}/x.png",
        f"http://[::1]:{w.evil_port}/x.png",
        f"http://2130706433:{w.evil_port}/x.png",
        f"http://0x7f000001:{w.evil_port}/x.png",
        f"http://127.1:{w.evil_port}/x.png",
        f"HTTP://{evil}/x.png",
        f"https://{evil}/x.png",
        f" http://{evil}/x.png",
        f"http://{evil}\t/x.png",
        f"http://{lshost}/data/upload/1/ok.png\r\nX-Injected: 1",
        f"http://{lshost}/data/upload/1/ok.png%0d%0aX-Injected:%201",
        f"http://{lshost}:80/data/upload/1/ok.png",
        f"http://{lshost}./data/upload/1/ok.png",
        f"http://{evil}/data/upload/1/ok.png",
        "/data/upload/1/redirect-evil.png",
        "/data/upload/1/redirect-evil-userinfo.png",
        "/data/upload/1/redirect-relative-evil.png",
        "/data/upload/1/redirect-backslash.png",
        "/data/upload/1/redirect-file.png",
        "/data/upload/1/redirect-loop.png",
        "/data/upload/1/redirect-ls-then-evil.png",
        f"{ls}/data/upload/1/redirect-evil.png",
        "s3://bucket/key.png",
        "gs://bucket/../../key.png",
        "s3://bucket/key\r\nX: 1.png",
        "file:///etc/passwd",
        f"gopher://{evil}/_GET%20/",
        f"ftp://{evil}/x.png",
        "javascript:alert(1)",
        "data:image/png;base64," + base64.b64encode(grey_png(4)).decode(),
        "mailto:x@y",
        "/data/local-files/?d=../../../etc/passwd",
        "/data/local-files/?d=/etc/passwd",
        "/data/local-files/?d=ok.png%00.png",
        "/data/local-files/?d=ok.png\x00",
        "/data/local-files/?d=loop-a",
        "/data/local-files/?d=dirloop/dirloop/dirloop/ok.png",
        "/data/local-files/?d=out.png",
        "/data/local-files/?d=updir/etc/passwd",
        "/data/local-files/?d=subdir",
        "/data/local-files/?d=" + "a/" * 3000 + "x.png",
        "/data/local-files/?d=" + "a" * 300 + ".png",
        "/data/local-files/?d=ok.png&d=out.png",
        "/data/local-files/?d=",
        "/data/local-files/?",
        "/data/local-files/?d=%ff%fe.png",
        "/data/local-files/?d=fifo.png",
        "/data/local-files/?d=zero.png",
        "/data/local-files/?d=sparse.png",
        f"{ls}/data/local-files/?d=../etc/passwd",
        "/data/local-files/?d=%2e%2e/%2e%2e/etc/passwd",
        "/data/upload/../../api/projects/1/",
        "/data/upload/1/" + "x" * 10_000 + ".png",
    ]
    # Allowed by design (Label Studio's own redirects and presigned storage URLs are followed, without
    # credentials, wherever they lead), or harmless (a link to "." inside the root): not "hostile".
    by_design = {
        "/data/upload/1/redirect-evil.png",
        "/data/upload/1/redirect-relative-evil.png",
        "/data/upload/1/redirect-ls-then-evil.png",
        f"{ls}/data/upload/1/redirect-evil.png",
        "s3://bucket/key.png",
        "gs://bucket/../../key.png",
        "/data/local-files/?d=dirloop/dirloop/dirloop/ok.png",
    }
    for url in urls:
        yield w.post(f"/predict image {url[:70]!r}", "/predict", w.predict_body([url]), hostile=url not in by_design)
    for url in (
        f"http://{evil}/x.png",
        "/data/upload/1/redirect-evil-userinfo.png",
        "file:///etc/passwd",
        "/data/local-files/?d=out.png",
        f"http://{lshost}@{evil}/x.png",
    ):
        yield w.post(f"/webhook task image {url[:60]!r}", "/webhook", w.webhook_body(image=url), hostile=True)


def class_bombs(w: World, corpus: list[str]) -> Iterator[Case]:
    names = [
        "bomb-rgb16-8192.png",
        "bomb-header-30000.png",
        "bomb-jpeg-65500.jpg",
        "truncated.png",
        "text.png",
        "empty.png",
        "html.png",
        "404.png",
        "500.png",
        "one-pixel.png",
        "tiff-mixed-subfiles.tif",
        "tiff-thumbnail-first.tif",
        *corpus,
    ]
    for name in names:
        yield w.post(f"/predict {name}", "/predict", w.predict_body([f"/data/upload/1/{name}"]))
    yield w.post(
        "/webhook task image bomb-rgb16-8192.png",
        "/webhook",
        w.webhook_body(image="/data/upload/1/bomb-rgb16-8192.png"),
    )


def class_auth(w: World) -> Iterator[Case]:
    user, password = base64.b64decode(w.auth.split()[1]).decode().split(":", 1)

    def basic(text: str) -> str:
        return "Basic " + base64.b64encode(text.encode()).decode()

    variants: dict[str, str | None] = {
        "no Authorization": None,
        "wrong password": basic(f"{user}:wrong"),
        "wrong user": basic(f"nobody:{password}"),
        "empty user and password": basic(":"),
        "no colon": basic(user + password),
        "bad base64": "Basic ***",
        "Bearer token": f"Bearer {password}",
        "'Basic' alone": "Basic",
        "lower-case scheme": "basic " + w.auth.split()[1],
        "password + space": basic(f"{user}:{password} "),
        "unicode user": basic(f"\u00fc\u00df:{password}"),
        "8 KB header": basic("x" * 6000 + ":" + password),
        "password only": basic(password),
        "Token scheme": f"Token {password}",
    }
    routes = [
        ("GET", "/health", None),
        ("POST", "/setup", w.setup_body),
        ("POST", "/predict", w.predict_body),
        ("GET", "/versions", None),
        ("GET", "/metrics", None),
    ]
    for what, header in variants.items():
        for method, route, make in routes:
            headers = {"Content-Type": "application/json"}
            if header is not None:
                headers["Authorization"] = header
            body = to_json(make()) if make else None
            tasks = None
            if route == "/predict" and body is not None:
                tasks = [t["id"] for t in json.loads(body)["tasks"]]
            yield Case(f"{method} {route}: {what}", method, route, body, headers=headers, tasks=tasks)
    hook = [
        ("no secret, no auth", {}, ""),
        ("wrong secret header", {"X-Sonoseg-Webhook-Secret": "wrong"}, ""),
        ("wrong ?token=", {}, "?token=wrong"),
        ("empty secret header", {"X-Sonoseg-Webhook-Secret": ""}, ""),
        ("secret in another header", {"X-Webhook-Secret": w.secret}, ""),
        ("secret + 1 char", {"X-Sonoseg-Webhook-Secret": w.secret + "x"}, ""),
        ("secret prefix", {"X-Sonoseg-Webhook-Secret": w.secret[:-1]}, ""),
        ("wrong basic auth only", {"Authorization": basic(f"{user}:wrong")}, ""),
        ("valid basic auth only", {"Authorization": w.auth}, ""),
        ("valid ?token=", {}, f"?token={w.secret}"),
        ("valid secret header", {"X-Sonoseg-Webhook-Secret": w.secret}, ""),
        ("?token= twice, wrong first", {}, f"?token=wrong&token={w.secret}"),
    ]
    for what, headers, query in hook:
        body = w.webhook_body()
        yield Case(
            f"POST /webhook: {what}",
            "POST",
            "/webhook" + query,
            to_json(body),
            headers={"Content-Type": "application/json", **headers},
            webhook=body,
        )


def class_methods_routes(w: World) -> Iterator[Case]:
    for route in ("/setup", "/predict", "/webhook", "/health", "/versions", "/metrics"):
        for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"):
            if (method, route) in {
                ("GET", "/health"),
                ("GET", "/versions"),
                ("GET", "/metrics"),
                ("HEAD", "/health"),
                ("HEAD", "/versions"),
                ("HEAD", "/metrics"),
            }:
                continue
            yield Case(f"{method} {route}", method, route, b"{}" if method in ("PUT", "PATCH", "DELETE") else None)
    for target in (
        "/admin",
        "/predict/",
        "/setup/x",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/%00",
        "/" + "a" * 10_000,
        "/predict?" + "x" * 100_000,
        "/webhook?token=" + "t" * 10_000,
        "//predict",
        "/PREDICT",
        "/metrics/../predict",
        "/train",
        "/api/projects/1/",
        "/static/../../etc/passwd",
    ):
        yield Case(f"POST {target[:50]}", "POST", target, to_json(w.predict_body()))
    yield Case("OPTIONS *", "OPTIONS", "*")
    yield Case("absolute-form target to the evil host", "GET", f"http://{w.evil}/health")
    yield Case("HTTP/0.9 request line", "GET", "/health", raw_head="GET /health\r\n\r\n")
    yield Case("garbage request line", "GET", "/", raw_head="\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")


CLASSES: list[tuple[str, str]] = [
    ("valid requests (control)", "well-formed calls Label Studio makes: the baseline must be 200"),
    (
        "malformed JSON",
        "truncated, invalid tokens, NaN/Infinity, BOMs, invalid UTF-8, scalars and arrays, "
        "random bytes, on /setup /predict /webhook",
    ),
    (
        "deeply nested JSON",
        "arrays and objects 1,000, 10,000 and 100,000 levels deep, as the whole body and inside "
        "a field, on /setup /predict /webhook",
    ),
    (
        "wrong types for every field",
        "each field of the /setup, /predict and /webhook bodies set to null, bool, "
        "numbers, 2**70, strings (up to 100 KB), lists, objects, or removed",
    ),
    (
        "ids beyond 64 bits, <= 0, bool, float",
        "project/task/annotation/user ids: 0, negative, 2**31..10**5000, true/false, 1.0, 1e400, strings",
    ),
    (
        "oversized bodies",
        "40 MB with Content-Length and chunked, Content-Length lies (40 MB, 10**12, -1, 'abc'), "
        "31 MB (under the limit)",
    ),
    (
        "huge annotation results",
        "RLEs of 1-7 million integers, 1,000-20,000 regions, 1,000 annotations, "
        "/predict with 100 and 1,000 tasks, a 65535x65535 region",
    ),
    (
        "unknown labels and label configs",
        "brush labels the config does not have, empty/non-string labels; "
        "configs with reserved, duplicate, 256 or no labels, a DOCTYPE",
    ),
    (
        "bad RLE",
        "truncated, forged headers, wrong sizes, word sizes above 8, out-of-range and non-integer "
        "values, random and mutated bytes (webhook regions)",
    ),
    (
        "hostile image URLs",
        "userinfo, backslash, fragment and scheme-relative tricks toward the evil listener, "
        "redirects to it, IP spellings, non-http schemes, local-files traversal, NUL bytes, "
        "symlink loops, a FIFO, /dev/zero, long paths",
    ),
    (
        "image bombs and broken images",
        "8192x8192 16-bit RGB PNG, header bombs (PNG 30000^2, JPEG 65500^2), truncated, "
        "text/HTML/empty as .png, 404/500 from Label Studio, the fuzz corpus reproducers",
    ),
    (
        "missing/wrong auth and webhook secret",
        "no/invalid basic auth on every route; missing, wrong, partial "
        "webhook secrets (and the valid forms, which must pass)",
    ),
    (
        "wrong methods and unknown routes",
        "GET/PUT/DELETE/PATCH/OPTIONS/HEAD/TRACE/FOO on every route, unknown "
        "and traversal paths, 100 KB query strings, HTTP/0.9, TLS bytes",
    ),
]


# -- running ------------------------------------------------------------------------------------------
@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    cases: int = 0
    skipped: int = 0
    seconds: float = 0.0
    examples: dict[str, str] = field(default_factory=dict)


class Bench:
    def __init__(self, tmp: Path, keep: bool) -> None:
        self.tmp = tmp
        self.keep = keep
        self.ls_seen, self.evil_seen = Recorder(), Recorder()
        self.secret = secrets.token_urlsafe(24)
        self.password = secrets.token_urlsafe(18)
        self.api_key = secrets.token_hex(20)  # a legacy Label Studio token (40 hex characters)
        self.data_dir = tmp / "data"
        self.local_root = tmp / "local"
        self.server: subprocess.Popen[bytes] | None = None
        self.refused_webhooks: list[tuple[str, str]] = []  # (event key, label) of non-2xx webhook cases
        self.hostile_tasks: dict[int, str] = {}
        self.results: dict[str, Tally] = {}
        self.verbose = False

    # set-up
    def files(self) -> tuple[dict[str, bytes], list[str]]:
        files = {
            "ok.png": grey_png(),
            "one-pixel.png": grey_png(1),
            "bomb-rgb16-8192.png": bomb_png_rgb16(),
            "bomb-header-30000.png": header_bomb_png(),
            "truncated.png": grey_png()[:-30],
            "text.png": b"this is a text file, not a PNG\n" * 4,
            "empty.png": b"",
            "tiff-mixed-subfiles.tif": multipage_tiff([0, 2, 2]),
            "tiff-thumbnail-first.tif": multipage_tiff([1, 2, 2]),
        }
        jpeg = jpeg_header_bomb()
        if jpeg is not None:
            files["bomb-jpeg-65500.jpg"] = jpeg
        corpus = sorted(
            p for p in (ROOT / "fuzz" / "corpus" / "image_readers").glob("*") if not p.name.startswith("seed-")
        )
        for path in corpus:
            files[path.name] = path.read_bytes()
        return files, [p.name for p in corpus]

    def make_local_root(self) -> None:
        root = self.local_root
        (root / "subdir").mkdir(parents=True)
        (root / "ok.png").write_bytes(grey_png(seed=5))
        os.symlink("loop-b", root / "loop-a")
        os.symlink("loop-a", root / "loop-b")
        os.symlink(".", root / "dirloop")
        os.symlink("/etc/passwd", root / "out.png")
        os.symlink("..", root / "updir")
        os.symlink("/dev/zero", root / "zero.png")
        os.mkfifo(root / "fifo.png")
        with open(root / "sparse.png", "wb") as f:
            f.truncate(300 * 1024 * 1024)

    def start(self) -> World:
        files, corpus = self.files()
        self.corpus = corpus
        evil_png = grey_png(seed=666)
        self.evil = serve_in_thread(evil_listener(self.evil_seen, evil_png))
        evil_base = f"http://127.0.0.1:{self.evil.server_address[1]}"
        self.ls = serve_in_thread(standin_label_studio(self.ls_seen, files, evil_base))
        self.make_local_root()
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SONOSEG_", "LABEL_STUDIO_"))}
        env.update(
            {
                "SONOSEG_DATA_DIR": str(self.data_dir),
                "SONOSEG_HOST": "127.0.0.1",
                "SONOSEG_PORT": str(port),
                "SONOSEG_BASIC_AUTH_USER": "bench",
                "SONOSEG_BASIC_AUTH_PASSWORD": self.password,
                "SONOSEG_WEBHOOK_SECRET": self.secret,
                "LABEL_STUDIO_URL": f"http://127.0.0.1:{self.ls.server_address[1]}",
                "LABEL_STUDIO_API_KEY": self.api_key,
                "SONOSEG_LOCAL_FILES_ROOT": str(self.local_root),
                "SONOSEG_DEVICE": "cpu",
                "SONOSEG_LOG_LEVEL": "WARNING",
                "OMP_WAIT_POLICY": "PASSIVE",
            }
        )
        self.data_dir.mkdir(parents=True)
        command = _sonoseg()
        subprocess.run([*command, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=300)
        self.log_path = self.tmp / "server.log"
        self.server_log = open(self.log_path, "wb")  # noqa: SIM115
        self.server = subprocess.Popen([*command, "serve"], env=env, stdout=self.server_log, stderr=subprocess.STDOUT)
        self.port = port
        auth = "Basic " + base64.b64encode(f"bench:{self.password}".encode()).decode()
        world = World(self.ls.server_address[1], self.evil.server_address[1], auth, self.secret)
        world.mask_rle = mask_to_rle(_disc(IMAGE_SIDE))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise SystemExit(
                    f"sonoseg serve exited ({self.server.returncode}):\n{self.log_path.read_text()[-3000:]}"
                )
            answer = http_call(port, "GET", "/health", {"Authorization": auth}, timeout=2)
            if answer.status == 200:
                return world
            time.sleep(0.5)
        raise SystemExit("sonoseg serve did not answer /health within 180 s")

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(10)
        self.server_log.close()
        self.ls.shutdown()
        self.evil.shutdown()

    # the run
    def stored_task(self, task_id: int) -> bool:
        with self.db() as db:
            return (
                db.execute("SELECT 1 FROM image_source WHERE ls_task_id = ? LIMIT 1", (task_id,)).fetchone() is not None
            )

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.data_dir / 'sonoseg.db'}?mode=ro", uri=True, timeout=30)

    def classify(self, case: Case, answer: Answer) -> str:
        if answer.error == "timeout":
            return "hang"
        if answer.error == "http/0.9 body" and case.raw_head is not None:
            body = answer.json()  # HTTP/0.9 has no status: a JSON error body is the 4xx, any other JSON a 200
            if isinstance(body, dict):
                return "clean_4xx" if body.get("error") else "ok"
            return "other"
        if answer.status is None:
            return "conn"
        if 500 <= answer.status < 600:
            return "5xx"
        if 400 <= answer.status < 500:
            if case.method == "HEAD":
                return "clean_4xx"
            body = answer.json()
            return (
                "clean_4xx"
                if isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]
                else "other"
            )
        if answer.status != 200:
            return "other"
        if case.target.startswith("/predict") and case.tasks is not None:
            body = answer.json()
            results = body.get("results") if isinstance(body, dict) else None
            if not isinstance(results, list) or len(results) != len(case.tasks):
                return "other"
            failed = False
            for task_id, item in zip(case.tasks, results, strict=True):
                if not isinstance(item, dict) or not isinstance(item.get("model_version"), str):
                    return "other"
                if not item.get("result") and (task_id is None or not self.stored_task(task_id)):
                    failed = True
            return "task_failure" if failed else "ok"
        return "ok"

    def run_case(self, world: World, case: Case) -> tuple[str, Answer]:
        headers = dict(case.headers) if case.headers is not None else world.default_headers(case)
        headers.update(case.extra_headers)
        limit = PREDICT_HANG_SECONDS if case.target.startswith("/predict") else HANG_SECONDS
        answer = http_call(
            self.port,
            case.method,
            case.target,
            headers,
            case.body,
            chunks=case.chunks() if case.chunks else None,
            raw_head=case.raw_head,
            timeout=limit,
        )
        outcome = self.classify(case, answer)
        if case.webhook is not None and not (answer.status is not None and 200 <= answer.status < 300):
            with _suppress():
                self.refused_webhooks.append((event_key(scrub_webhook(case.webhook)), case.label))
        for task_id in case.hostile_tasks:
            self.hostile_tasks[task_id] = case.label
        return outcome, answer

    def wait_responsive(self, limit: float = 300.0) -> None:
        """After a hang, let the server finish what it was doing (CPU idle, /health answers) before going on."""
        deadline = time.monotonic() + limit
        ticks = os.sysconf("SC_CLK_TCK")
        while time.monotonic() < deadline and self.server is not None and self.server.poll() is None:
            before = _cpu_ticks(self.server.pid)
            time.sleep(1)
            busy = _cpu_ticks(self.server.pid) - before
            if (
                busy < 0.1 * ticks
                and http_call(self.port, "GET", "/health", {"Authorization": self._auth()}, timeout=2).status == 200
            ):
                return

    def _auth(self) -> str:
        return "Basic " + base64.b64encode(f"bench:{self.password}".encode()).decode()

    def run(self, world: World, run_deadline: float, only: list[str] | None = None) -> None:
        makers: dict[str, Callable[[], Iterator[Case]]] = {
            "valid requests (control)": lambda: class_control(world),
            "malformed JSON": lambda: class_malformed_json(world),
            "deeply nested JSON": lambda: class_deep_json(world),
            "wrong types for every field": lambda: class_wrong_types(world),
            "ids beyond 64 bits, <= 0, bool, float": lambda: class_bad_ids(world),
            "oversized bodies": lambda: class_oversized(world),
            "huge annotation results": lambda: class_huge_results(world),
            "unknown labels and label configs": lambda: class_unknown_labels(world),
            "bad RLE": lambda: class_bad_rle(world),
            "hostile image URLs": lambda: class_hostile_urls(world),
            "image bombs and broken images": lambda: class_bombs(world, self.corpus),
            "missing/wrong auth and webhook secret": lambda: class_auth(world),
            "wrong methods and unknown routes": lambda: class_methods_routes(world),
        }
        for name, _ in CLASSES:
            if only and name != CLASSES[0][0] and not any(text in name for text in only):
                continue
            tally = self.results.setdefault(name, Tally())
            started = time.monotonic()
            deadline = min(started + CLASS_BUDGET_SECONDS, run_deadline)
            for case in makers[name]():
                if time.monotonic() > deadline or (self.server is not None and self.server.poll() is not None):
                    tally.skipped += 1
                    continue
                outcome, answer = self.run_case(world, case)
                if self.verbose:
                    print(
                        f"    {HEADINGS[outcome]:>16} {answer.status} {answer.seconds:6.2f}s {case.label[:100]}",
                        flush=True,
                    )
                tally.cases += 1
                tally.counts[outcome] += 1
                if outcome in ("5xx", "hang", "conn", "other") and outcome not in tally.examples:
                    detail = answer.error or f"{answer.status} {answer.body[:120]!r}"
                    tally.examples[outcome] = f"{case.label[:110]} -> {detail}"
                if outcome == "hang":
                    self.wait_responsive()
            tally.seconds = time.monotonic() - started
            row = ", ".join(f"{HEADINGS[o]} {tally.counts[o]}" for o in OUTCOMES if tally.counts[o])
            print(
                f"  {name}: {tally.cases} cases in {tally.seconds:.0f} s ({row})"
                + (f", {tally.skipped} skipped" if tally.skipped else ""),
                flush=True,
            )

    # the checks afterwards
    def checks(self) -> list[tuple[str, bool | None, str]]:
        out: list[tuple[str, bool | None, str]] = []
        deadline = time.monotonic() + 120
        pending = -1
        while time.monotonic() < deadline:  # let the background drainer apply what was recorded
            with self.db() as db:
                pending = db.execute("SELECT COUNT(*) FROM webhook_event WHERE status = 'pending'").fetchone()[0]
            if pending == 0:
                break
            time.sleep(1)
        with self.db() as db:
            keys = {row[0] for row in db.execute("SELECT event_key FROM webhook_event")}
            statuses = dict(db.execute("SELECT status, COUNT(*) FROM webhook_event GROUP BY status").fetchall())
            stored_hostile = sorted(
                {
                    label
                    for task_id, label in self.hostile_tasks.items()
                    if db.execute("SELECT 1 FROM image_source WHERE ls_task_id = ?", (task_id,)).fetchone()
                }
            )
        leaked = [label for key, label in self.refused_webhooks if key in keys]
        out.append(
            (
                "no webhook_event row for a refused (non-2xx) webhook",
                not leaked,
                f"{len(self.refused_webhooks)} refused, {len(leaked)} stored"
                + (f" (e.g. {leaked[0]})" if leaked else ""),
            )
        )
        out.append(
            (
                "webhook events after processing",
                None,
                ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) + f" (pending left: {pending})",
            )
        )
        out.append(
            (
                "no image stored from a hostile URL",
                not stored_hostile,
                f"{len(self.hostile_tasks)} hostile tasks, {len(stored_hostile)} stored"
                + (": " + "; ".join(stored_hostile[:4]) if stored_hostile else ""),
            )
        )
        secrets_ = (
            self.api_key,
            self.password,
            self.secret,
            base64.b64encode(f"bench:{self.password}".encode()).decode(),
        )
        evil_creds = [
            s
            for s in self.evil_seen.seen
            if any(k.lower() in ("authorization", "cookie", "x-sonoseg-webhook-secret") for k in s.headers)
            or any(secret in v for v in s.headers.values() for secret in secrets_)
        ]
        out.append(
            (
                "the evil listener never saw a credential",
                not evil_creds,
                f"{len(self.evil_seen.seen)} requests reached it, {len(evil_creds)} with credentials"
                + (f" (e.g. {evil_creds[0].path[:60]} {sorted(evil_creds[0].headers)})" if evil_creds else ""),
            )
        )
        ls_auth = [s.headers.get("Authorization", "") for s in self.ls_seen.seen]
        wrong = [a for a in ls_auth if a and a != f"Token {self.api_key}"]
        leaked_to_ls = [s for s in self.ls_seen.seen if any(x in v for v in s.headers.values() for x in secrets_[1:])]
        out.append(
            (
                "Label Studio received only its API token",
                not wrong and not leaked_to_ls,
                f"{len(self.ls_seen.seen)} requests, {sum(1 for a in ls_auth if a)} with Authorization, "
                f"{len(wrong)} other credentials, {len(leaked_to_ls)} carrying sonoseg's own secrets",
            )
        )
        alive = self.server is not None and self.server.poll() is None
        peak = _peak_rss_mb(self.server.pid) if alive and self.server is not None else None
        out.append(
            (
                "the server is still alive",
                alive,
                "yes" + (f", peak RSS {peak} MB" if peak else "")
                if alive
                else f"exited {self.server.returncode if self.server else '?'}",
            )
        )
        log = self.log_path.read_text(errors="replace")
        out.append(("tracebacks in the server log", None, str(log.count("Traceback (most recent call last)"))))
        return out


def _disc(side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side]
    return (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3) ** 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sonoseg() -> list[str]:
    script = Path(sys.executable).with_name("sonoseg")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _peak_rss_mb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], Exception)  # type: ignore[arg-type]


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            check=False,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def report(bench: Bench, checks: list[tuple[str, bool | None, str]], command: str, seconds: float) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        "# Reliability under hostile input",
        "",
        "How a real `sonoseg serve` answers classes of bad input. Generated by `bench/adversarial_inputs.py`; "
        "every number below comes from the run, nothing is hard-coded.",
        "",
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}, {seconds:.0f} s",
        f"- machine: {cores} cores, {platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; code at {_git_commit()}",
        f"- server: `sonoseg serve` (development server, threaded), SQLite, no trained model (predictions are "
        f'empty "untrained" items, but images are still fetched, decoded and stored), basic auth and webhook '
        f"secret on; stand-in Label Studio and evil listener on 127.0.0.1; a hang is no answer in {HANG_SECONDS:.0f} s "
        f"({PREDICT_HANG_SECONDS:.0f} s for /predict: Label Studio's own timeout there)",
        "",
        "| class | cases | clean 4xx | per-task failure | 200 ok | 500 | hang | conn. error | other |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total = Tally()
    for name, _ in CLASSES:
        tally = bench.results.get(name, Tally())
        total.cases += tally.cases
        total.skipped += tally.skipped
        for o in OUTCOMES:
            total.counts[o] += tally.counts[o]
        cells = [str(tally.counts[o]) for o in OUTCOMES]
        skipped = f" (+{tally.skipped} skipped: time budget)" if tally.skipped else ""
        lines.append(f"| {name} | {tally.cases}{skipped} | " + " | ".join(cells) + " |")
    lines.append(f"| **all** | **{total.cases}** | " + " | ".join(f"**{total.counts[o]}**" for o in OUTCOMES) + " |")
    lines += ["", "## Checks afterwards", ""]
    for what, ok, detail in checks:
        mark = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"- {mark}: {what}: {detail}")
    examples = [
        (name, outcome, text)
        for name, _ in CLASSES
        for outcome, text in bench.results.get(name, Tally()).examples.items()
    ]
    lines += ["", "## One example per class and bad outcome", ""]
    if examples:
        for name, outcome, text in examples:
            shown = text.replace("`", "'")
            lines.append(f"- {name}, {HEADINGS[outcome]}: `{shown}`")
    else:
        lines.append("- none: every case ended in a clean 4xx, a per-task failure or a 200")
    lines += ["", "## What each class means", ""]
    for name, meaning in CLASSES:
        lines.append(f"- **{name}**: {meaning}.")
    lines += [
        "",
        "Outcomes: **clean 4xx** a 4xx whose JSON body carries an `error` message (HEAD: any 4xx); **per-task "
        "failure** /predict answered 200 with one item per task, but the task's result is empty and no image was "
        "stored for it; **200 ok** any other 200 (for /predict: the image was fetched and stored); **500** any 5xx; "
        f"**hang** no complete answer within {HANG_SECONDS:.0f} s, {PREDICT_HANG_SECONDS:.0f} s for /predict (the bench then waits for /health before going on); "
        "**conn. error** the connection closed or reset without an HTTP answer; **other** anything else (a 4xx without "
        "a JSON message, a 3xx, a /predict answer with the wrong number of items).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--out", type=Path, help="write the Markdown report here (e.g. docs/reliability.md)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory (printed)")
    parser.add_argument("--verbose", action="store_true", help="print every case and its outcome")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="run only the classes whose name contains TEXT (repeatable; the control always runs)",
    )
    args = parser.parse_args()
    command = (
        "python bench/adversarial_inputs.py"
        + (f" --out {args.out}" if args.out else "")
        + "".join(f" --only {text!r}" for text in args.only)
    )
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="sonoseg-adversarial-"))
    bench = Bench(tmp, args.keep)
    bench.verbose = args.verbose
    try:
        print(f"starting sonoseg serve in {tmp} ...", flush=True)
        world = bench.start()
        bench.run(world, started + RUN_BUDGET_SECONDS, only=args.only)
        checks = bench.checks()
    finally:
        bench.stop()
    text = report(bench, checks, command, time.monotonic() - started)
    print()
    print(text)
    if args.out:
        args.out.write_text(text)
        print(f"written to {args.out}")
    if args.keep:
        print(f"data directory kept: {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
