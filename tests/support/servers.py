"""Serving a WSGI app over real HTTP on loopback, so code is exercised as Label Studio calls it."""

from __future__ import annotations

import socket
import threading
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process that binds it itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServedApp:
    """A WSGI app served on 127.0.0.1 (or ``host``) in a daemon thread (werkzeug, threaded)."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        self.server: BaseWSGIServer = make_server(host, 0, app, threaded=True)
        self.host = host
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
