"""Label Studio's API, as far as sonoseg calls it, in memory (serve it with :class:`~tests.support.servers.ServedApp`).

:class:`FakeLabelStudio` has the endpoints sonoseg uses (token refresh, uploads, local files,
presign, projects, tasks) with both token kinds, recording every request's Authorization header so
tests can prove where credentials went. :class:`FakeCloud` is the other host a presigned URL (or an
allowed image host) points to.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, abort, jsonify, redirect, request
from werkzeug.wrappers import Response as BaseResponse

# The legacy API token both the fake and the real Label Studio (tests.support.processes) accept.
LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"


def fake_jwt(payload: str = "x") -> str:
    """Something shaped like a JWT (header names an alg), as Label Studio's PATs are."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    return f"{header}.{b64(payload.encode())}.{b64(b'signature')}"


@dataclass
class Seen:
    """One request a fake host received."""

    method: str
    path: str
    authorization: str | None


@dataclass
class FakeLabelStudio:
    """Label Studio's API surface that sonoseg uses, in memory."""

    pat: str = field(default_factory=lambda: fake_jwt(secrets.token_hex(4)))
    legacy_token: str = LEGACY_TOKEN
    files: dict[str, bytes] = field(default_factory=dict)  # "/data/upload/1/a.png" -> bytes
    projects: dict[int, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)  # id -> task (with "annotations")
    cloud_url: str = ""  # where presign redirects to
    seen: list[Seen] = field(default_factory=list)
    valid_access: set[str] = field(default_factory=set)
    refreshes: int = 0

    def expire_access_tokens(self) -> None:
        self.valid_access.clear()

    def app(self) -> Flask:
        app = Flask("fake-label-studio")

        @app.before_request
        def _record_and_check() -> Response | None:
            self.seen.append(Seen(request.method, request.full_path.rstrip("?"), request.headers.get("Authorization")))
            if request.path == "/api/token/refresh/":
                return None
            auth = request.headers.get("Authorization", "")
            ok = auth == f"Token {self.legacy_token}" or (
                auth.startswith("Bearer ") and auth[len("Bearer ") :] in self.valid_access
            )
            if not ok:
                return Response(
                    '{"detail": "Authentication credentials were not provided."}', 401, mimetype="application/json"
                )
            return None

        @app.post("/api/token/refresh/")
        def refresh() -> Response:
            body = request.get_json(silent=True) or {}
            if body.get("refresh") != self.pat:
                return Response('{"detail": "Token is invalid"}', 401, mimetype="application/json")
            self.refreshes += 1
            access = f"access-{self.refreshes}-{secrets.token_hex(4)}"
            self.valid_access.add(access)
            return jsonify({"access": access})

        @app.get("/data/upload/<path:rest>")
        def upload(rest: str) -> Response:
            data = self.files.get(f"/data/upload/{rest}")
            if data is None:
                abort(404)
            return Response(data, mimetype="image/png")

        @app.get("/data/local-files/")
        def local_files() -> Response:
            data = self.files.get(f"/data/local-files/?d={request.args.get('d', '')}")
            if data is None:
                abort(404)
            return Response(data, mimetype="image/png")

        @app.get("/tasks/<int:task_id>/presign/")
        def presign(task_id: int) -> BaseResponse:
            fileuri = base64.urlsafe_b64decode(request.args["fileuri"]).decode()
            name = fileuri.rsplit("/", 1)[-1]
            return redirect(f"{self.cloud_url}/bucket/{name}?X-Amz-Signature=abc", 303)

        @app.get("/api/projects/<int:project_id>/")
        def project(project_id: int) -> Response:
            if project_id not in self.projects:
                abort(404)
            return jsonify(self.projects[project_id])

        @app.get("/api/tasks/")
        def task_list() -> Response:
            project_id = int(request.args["project"])
            page, size = int(request.args.get("page", 1)), int(request.args.get("page_size", 100))
            tasks = [t for t in self.tasks.values() if t["project"] == project_id]
            chunk = tasks[(page - 1) * size : page * size]
            if page > 1 and not chunk:
                abort(404)
            return jsonify({"tasks": chunk, "total": len(tasks)})

        @app.get("/api/tasks/<int:task_id>/")
        def task(task_id: int) -> Response:
            if task_id not in self.tasks:
                abort(404)
            return jsonify(self.tasks[task_id])

        return app


@dataclass
class FakeCloud:
    """The host behind a presigned URL (or an allowed image host): serves bytes, records headers."""

    files: dict[str, bytes] = field(default_factory=dict)  # "/bucket/a.png" -> bytes
    seen: list[Seen] = field(default_factory=list)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> absolute URL

    def app(self) -> Flask:
        app = Flask("fake-cloud")

        @app.get("/<path:rest>")
        def serve(rest: str) -> BaseResponse:
            path = "/" + rest
            self.seen.append(Seen("GET", path, request.headers.get("Authorization")))
            if path in self.redirects:
                return redirect(self.redirects[path], 302)
            data = self.files.get(path)
            if data is None:
                abort(404)
            return Response(data, mimetype="image/png")

        return app
