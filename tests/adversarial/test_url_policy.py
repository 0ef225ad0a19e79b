"""The URL policy against parser differentials, and credentials against real loopback listeners.

Why: the Label Studio key once went to any host because the origin check read URLs with
``urllib.parse`` while ``requests`` connects where urllib3 reads the host
(``http://evil\\@label-studio/x``). These tests hold the policy to its promise: (a) a URL that
two parsers read differently is refused, (b) an accepted URL has one origin under every parser,
(c) with real HTTP listeners, generated hostile URLs and redirects never bring the key to
another host, nor any request at all to a host that is not allowed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from urllib3.util import parse_url

from backend.errors import InvalidInput, SonosegError
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.images import TaskImageFetcher
from backend.labelstudio.urls import check_redirect, check_url, redact_url
from backend.settings import Settings

TOKEN = "0123456789abcdef0123456789abcdef01234567"
PNG = b"\x89PNG\r\n\x1a\n-fake"
DEFAULT = {"http": 80, "https": 443}

# -- three readings of a URL ---------------------------------------------------------------------


def _norm(scheme: str | None, host: str | None, port: int | None) -> tuple[str, str, int | None]:
    scheme = (scheme or "").lower()
    return scheme, (host or "").lower().strip("[]"), port or DEFAULT.get(scheme)


def read_urllib(url: str) -> tuple[str, str, int | None] | str:
    try:
        parts = urlsplit(url)
        return _norm(parts.scheme, parts.hostname, parts.port)
    except ValueError:
        return "error"


def read_urllib3(url: str) -> tuple[str, str, int | None] | str:
    try:
        parts = parse_url(url)
    except Exception:
        return "error"
    return _norm(parts.scheme, parts.host, parts.port)


def read_requests(url: str) -> tuple[str, str, int | None] | str:
    """Where requests connects: its prepared URL, re-read as its adapter does (urlparse)."""
    try:
        prepared = requests.PreparedRequest()
        prepared.prepare_url(url, None)
        parts = urlsplit(prepared.url or "")
        return _norm(parts.scheme, parts.hostname, parts.port)
    except Exception:
        return "error"


def readings(url: str) -> set[Any]:
    return {read_urllib(url), read_urllib3(url), read_requests(url)}


def policy(url: str) -> Any:
    try:
        return check_url(url)
    except InvalidInput:
        return None


# -- generated URLs ------------------------------------------------------------------------------
PIECES = [
    "evil.test",
    "ls.test",
    "127.0.0.1",
    "localhost",
    "LS.Test",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[",
    "]",
    "@",
    ":",
    "::",
    "\\",
    "\\\\",
    "/",
    "//",
    "?",
    "#",
    ";",
    "&",
    "%5c",
    "%5C",
    "%40",
    "%2e",
    "%00",
    "%",
    "\t",
    "\n",
    "\r",
    " ",
    "\x00",
    "\x0b",
    "\u3000",
    "\u00a0",
    "\u200b",
    "ü",
    "ａ",
    "＠",
    "／",
    "\uff0e",
    "8080",
    "80",
    "0",
    "080",
    "65536",
    "99999",
    "-1",
    "user",
    "user:pw",
    "*",
    ".",
    "..",
    "x.png",
    "a=b",
]
SCHEMES = ["http", "HTTP", "hTtPs", "https", "ftp", "file", "", "ht\ttp", "http ", " http", "javascript"]
SEPARATORS = ["://", ":/", ":", ":\\\\", "://\\", ":\\/", ":///", "//", ":/\\"]

urls = st.one_of(
    st.builds(
        lambda scheme, sep, pieces: f"{scheme}{sep}{''.join(pieces)}",
        st.sampled_from(SCHEMES),
        st.sampled_from(SEPARATORS),
        st.lists(st.sampled_from(PIECES), max_size=8),
    ),
    st.builds(
        lambda scheme, rest: f"{scheme}://{rest}",
        st.sampled_from(SCHEMES),
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30),
    ),
)

# Each pretends to be on ls.test; the HTTP client would connect elsewhere (or read it otherwise).
KNOWN_TRICKS = [
    "http://127.0.0.1:9\\@ls.test/data/upload/x.png",
    "http://evil.test\\@ls.test/x.png",
    "http://evil.test%5c@ls.test/x.png",
    "http://evil.test\t@ls.test/x.png",
    "http://evil.test@ls.test/x.png",
    "http://evil.test%2e/x",
    "http://ls.test:080/x",
    "http://ls.test\uff0e/x",
]


@settings(max_examples=200, deadline=None)
@given(urls)
@example("http://127.0.0.1:9\\@ls.test/data/upload/x.png")
@example("http://evil.test%2e/x")
@example("http://a\\@b/")
@example("http://h\t.test/")
@example("http://[::1%25eth0]/")
def test_a_url_parsers_read_differently_is_refused(url: str) -> None:
    if len(readings(url)) > 1:
        assert policy(url) is None, f"{url!r} is read as {readings(url)} but the policy accepted it"


@settings(max_examples=200, deadline=None)
@given(urls)
@example("HTTP://LS.Test:8080/x?y=1#z")
@example("http://[::1]:80/x")
@example("https://ls.test/a b.png")
def test_b_an_accepted_url_has_one_origin_under_every_parser(url: str) -> None:
    checked = policy(url)
    if checked is None:
        return
    origin = (checked.origin.scheme, checked.origin.host, checked.origin.port)
    for candidate in (url, checked.url):
        assert readings(candidate) == {origin}, (candidate, readings(candidate), origin)
    # What is logged names the same origin and never the query string.
    assert redact_url(url).startswith(str(checked.origin)) and "?" not in redact_url(url)


@pytest.mark.parametrize("url", KNOWN_TRICKS)
def test_known_tricks_are_refused_and_redaction_is_not_fooled(url: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_url(url)
    assert "ls.test/" not in info.value.message  # never shown as a URL on the host it pretends to be
    assert "ls.test/" not in redact_url(url)


def test_redaction_never_shows_user_info_or_query() -> None:
    for url in (
        "http://user:secret@ls.test/x?token=abc",
        "http://user:secret\\@ls.test/x?token=abc",
        "http://ls.test/x?X-Amz-Signature=abc",
        "s3://bucket/k?sig=abc",
        "/data/upload/x.png?token=abc",
    ):
        shown = redact_url(url)
        assert "secret" not in shown and "abc" not in shown, shown
        try:
            check_url(url)
        except InvalidInput as exc:
            assert "secret" not in exc.message and "abc" not in exc.message


# -- (c) real listeners on loopback ----------------------------------------------------------------
@dataclass
class Listener:
    """A threading HTTP server on 127.0.0.1 recording every request's path and Authorization header."""

    name: str
    token: str | None = None  # when set, /data/... needs "Token <token>"
    location: str = ""  # where /r (and /tasks/<id>/presign/) redirect to
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def start(self) -> Listener:
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                listener.seen.append((self.path, auth))
                if self.path.startswith("/r") or "/presign/" in self.path:
                    self.send_response(302)
                    self.send_header("Location", listener.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if listener.token is not None and auth != f"Token {listener.token}":
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def close(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@dataclass
class World:
    ls: Listener  # Label Studio, http://127.0.0.1:<port>
    evil: Listener  # the attacker, http://127.0.0.1:<port> (never allowed)
    allowed: Listener  # an allowed image host, reached as http://localhost:<port>
    fetcher: TaskImageFetcher
    client: LabelStudioClient

    @property
    def netlocs(self) -> dict[str, str]:
        return {
            "E": f"127.0.0.1:{self.evil.port}",
            "L": f"127.0.0.1:{self.ls.port}",
            "A": f"localhost:{self.allowed.port}",
        }

    def reset(self) -> None:
        for listener in (self.ls, self.evil, self.allowed):
            listener.seen.clear()
            listener.location = ""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    ls, evil, allowed = Listener("ls", TOKEN).start(), Listener("evil").start(), Listener("allowed").start()
    settings_ = Settings(data_dir=tmp_path_factory.mktemp("data")).replace(allowed_image_hosts=("localhost",))
    client = LabelStudioClient(f"http://127.0.0.1:{ls.port}", TOKEN, timeout=(1.0, 5.0))
    yield World(ls, evil, allowed, TaskImageFetcher(settings_, client), client)
    for listener in (ls, evil, allowed):
        listener.close()


TRICKS = [
    "\\@",
    "\\\\@",
    "%5c@",
    "%5C@",
    "\t@",
    "\n@",
    "\r\n@",
    " @",
    "@",
    "\\",
    "#@",
    "?@",
    "/@",
    "\\/@",
    ";@",
    "\x00@",
    "\u3000@",
    ":@",
    "%40",
    "@@",
    "\\@\\@",
]
HOSTILE_SCHEMES = ["http", "HTTP", "Http", "hTTp", "https"]
PATHS = ["/data/upload/x.png", "/x.png", "", "/r", "/data/local-files/?d=x.png"]


def _fill(template: str, world: World) -> str:
    for key, value in world.netlocs.items():
        template = template.replace("{" + key + "}", value)
    return template


hostile_templates = st.one_of(
    st.builds(
        lambda s, a, t, b, p: f"{s}://{{{a}}}{t}{{{b}}}{p}",
        st.sampled_from(HOSTILE_SCHEMES),
        st.sampled_from("ELA"),
        st.sampled_from(TRICKS),
        st.sampled_from("ELA"),
        st.sampled_from(PATHS),
    ),
    st.builds(
        lambda s, sep, a, p: f"{s}{sep}{{{a}}}{p}",
        st.sampled_from(HOSTILE_SCHEMES),
        st.sampled_from(SEPARATORS),
        st.sampled_from("ELA"),
        st.sampled_from(PATHS),
    ),
    st.sampled_from(
        [
            "http://[::1]:{E}/x.png",
            "http://[::ffff:127.0.0.1]/x.png",
            "HTTP://127.0.0.1/x.png",
            "http://{E}/x.png",
            "//{E}/x.png",
            "/\\{E}/x.png",
            "\\\\{E}/x.png",
            "http:{E}/x.png",
            "http://{E}%2f@{L}/x.png",
            "http://{L}.@{E}/x.png",
            "http://{E}\u2100@{L}/x",
        ]
    ).map(lambda t: t.replace("[::1]:{E}", "[::1]:{Eport}")),
)


def _hostile(template: str, world: World) -> str:
    return _fill(template.replace("{Eport}", str(world.evil.port)), world)


def _try(call: Any) -> None:
    try:
        call()
    except SonosegError:
        pass  # refused, or the hop failed: either way with a reason, never a leak


def _assert_no_leak(world: World, *, evil_may_be_reached: bool) -> None:
    assert all(auth is None for _, auth in world.evil.seen), world.evil.seen
    assert all(auth is None for _, auth in world.allowed.seen), world.allowed.seen
    if not evil_may_be_reached:
        assert world.evil.seen == [], world.evil.seen


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile_templates)
def test_c_hostile_task_urls_never_bring_the_key_or_a_request_to_the_evil_host(world: World, template: str) -> None:
    world.reset()
    url = _hostile(template, world)
    _try(lambda: world.fetcher.fetch(url, task_id=1))
    _try(lambda: world.client.download(url, max_bytes=1024))
    # Nothing redirects here, and evil is not an allowed host: it must not be asked anything at all.
    _assert_no_leak(world, evil_may_be_reached=False)


LOCATIONS = st.one_of(
    hostile_templates,
    st.sampled_from(
        [
            "http://{E}/x.png",
            "//{E}/x.png",
            "HTTP://{E}/x.png",
            "/\\{E}/x.png",
            "\\\\{E}/x.png",
            "\t//{E}/x.png",
            "http://{E}\\@{A}/x.png",
            "http://{E}\\@{L}/x.png",
            "http:\\\\{E}/x.png",
            "/x.png",
            "http://{A}/x.png",
            "http://{L}/data/upload/x.png",
        ]
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(LOCATIONS)
def test_c_redirects_from_label_studio_go_elsewhere_without_the_key(world: World, template: str) -> None:
    world.reset()
    world.ls.location = _hostile(template, world)
    _try(lambda: world.fetcher.fetch("/r/x.png", task_id=1))
    _try(lambda: world.fetcher.fetch("s3://bucket/x.png", task_id=1))  # presign -> Location
    _try(lambda: world.client.download("/r/x.png", max_bytes=1024))
    # Label Studio may send us to a presigned host (even evil), but never with the key.
    _assert_no_leak(world, evil_may_be_reached=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(LOCATIONS)
def test_c_redirects_from_an_allowed_host_never_reach_a_host_that_is_not_allowed(world: World, template: str) -> None:
    world.reset()
    world.allowed.location = _hostile(template, world)
    _try(lambda: world.fetcher.fetch(f"http://localhost:{world.allowed.port}/r/x.png"))
    _assert_no_leak(world, evil_may_be_reached=False)
    # A hop from the allowed host to Label Studio goes without the key too.
    assert all(auth is None for _, auth in world.ls.seen), world.ls.seen


def test_a_foreign_hop_back_to_label_studio_carries_no_key(world: World) -> None:
    """Once a redirect left Label Studio, the next hop back to it is not authenticated (confused deputy)."""
    world.reset()
    world.ls.location = f"http://localhost:{world.allowed.port}/r/hop"
    world.allowed.location = f"http://127.0.0.1:{world.ls.port}/data/upload/x.png"
    with pytest.raises(SonosegError):
        world.client.download("/r/start", max_bytes=1024)
    assert world.ls.seen[0] == ("/r/start", f"Token {TOKEN}")
    assert world.ls.seen[1:] == [("/data/upload/x.png", None)]


def test_the_presign_flow_and_plain_uploads_still_work(world: World) -> None:
    world.reset()
    assert world.fetcher.fetch("/data/upload/1/a b.png").data == PNG
    assert world.ls.seen[-1] == ("/data/upload/1/a%20b.png", f"Token {TOKEN}")
    world.ls.location = f"http://localhost:{world.allowed.port}/bucket/x.png?X-Amz-Signature=s"
    assert world.fetcher.fetch("s3://bucket/x.png", task_id=3).data == PNG
    assert world.allowed.seen[-1] == ("/bucket/x.png?X-Amz-Signature=s", None)


def test_check_redirect_rechecks_the_raw_location() -> None:
    here = check_url("http://ls.test/a/b")
    assert check_redirect(here, "../c.png").url == "http://ls.test/c.png"
    assert check_redirect(here, "//cdn.test/x").origin.host == "cdn.test"
    for location in ("\t//evil.test/x", "http://evil.test\\@ls.test/", "/\\evil.test/x", "", "http://a@b/"):
        with pytest.raises(InvalidInput):
            check_redirect(here, location)
