"""Task image URL -> bytes, under the rules that keep credentials and files where they belong.

What a task's ``data`` may hold, and where its bytes come from:

- ``/data/upload/...`` and any other path or URL on the Label Studio origin: downloaded from
  Label Studio with the API key;
- ``/data/local-files/?d=<path>``: read from ``SONOSEG_LOCAL_FILES_ROOT`` when it is set (the
  same folder as Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT``), never from outside it;
  otherwise downloaded from Label Studio like an upload;
- ``s3://``, ``gs://``, ``azure-blob://`` ...: Label Studio's presign endpoint for the task,
  which redirects to a short-lived URL fetched without our credentials;
- plain ``http(s)://`` on another host: only when the host is in ``SONOSEG_ALLOWED_IMAGE_HOSTS``,
  without credentials, and every redirect must stay on allowed hosts.

Every http(s) URL, and every redirect hop, goes through the one URL policy
(:mod:`backend.labelstudio.urls`): a URL two parsers could read differently is refused, so the
origin and allow-list checks see the host the HTTP client really connects to.

Anything else is refused with a reason (a :class:`~backend.errors.SonosegError`, never a bare
``OSError``/``ValueError``); the caller turns that into an empty prediction for that task alone.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote

import requests

from backend.errors import InvalidInput, NotFound, NotReady, PayloadTooLarge
from backend.labelstudio.client import (
    DEFAULT_TIMEOUT,
    MAX_REDIRECTS,
    LabelStudioClient,
    fetch_without_credentials,
    read_limited,
)
from backend.labelstudio.urls import CheckedUrl, check_redirect, check_url, has_bad_characters, redact_url
from backend.settings import Settings

log = logging.getLogger(__name__)

LOCAL_FILES_PATH = "/data/local-files/"
_READ_CHUNK = 1024 * 1024
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    name: str  # a file name for error messages and format hints; never a credential


# -- the local-files path policy ------------------------------------------------------------------
def local_files_value(query: str) -> str:
    """The ``d`` parameter of a ``/data/local-files/`` query string, decoded once (as Django does).

    Refused: no ``d``, an empty one, more than one (Label Studio reads the last, a naive reader the
    first: the two could name different files), or one that is not valid UTF-8 once decoded.
    """
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise InvalidInput("the ?d= path of a /data/local-files/ URL is not valid UTF-8 once decoded") from exc
    values = [value for key, value in pairs if key == "d"]
    if len(values) > 1:
        raise InvalidInput("a /data/local-files/ URL with more than one ?d= path is ambiguous; refused")
    if not values or not values[0]:
        raise InvalidInput("a /data/local-files/ URL without its ?d= path")
    return values[0]


def _shown(relative: str) -> str:
    """The requested path for a message: quoted, control characters escaped, long ones shortened."""
    text = relative if len(relative) <= 120 else relative[:60] + "…" + relative[-40:]
    return repr(text)


def _limits(root: Path) -> tuple[int, int]:
    """(longest path, longest file name) in bytes on the root's file system."""

    def conf(name: str, default: int) -> int:
        try:
            value = os.pathconf(root, name)
        except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or unknown name
            return default
        return value if value > 0 else default

    return conf("PC_PATH_MAX", 4096), conf("PC_NAME_MAX", 255)


def resolve_local_file(root: Path, relative: str) -> Path:
    """Where ``relative`` (a ``?d=`` value) lies under ``root`` (already resolved), or why it may not be read.

    Label Studio joins the value to ``LOCAL_FILES_DOCUMENT_ROOT`` (``os.path.join``: an absolute
    value replaces the root) and serves it only if it stays inside; we do the same, and refuse,
    with :class:`InvalidInput` saying why, a NUL byte, a path or name longer than the OS allows,
    and anything that leaves the root, lexically (``..``, an absolute path elsewhere) or through
    a symlink. Whether the file exists is :func:`read_local_file`'s business, so that nothing
    outside the root can be probed for existence.
    """
    if "\x00" in relative:
        raise InvalidInput("the local file path contains a NUL byte; refused")
    try:
        encoded = os.fsencode(relative)
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"the local file path {_shown(relative)} cannot be encoded for the file system") from exc
    path_max, name_max = _limits(root)
    joined = os.path.join(os.fsencode(root), encoded)
    if len(joined) >= path_max:
        raise InvalidInput(f"the local file path is too long ({len(joined)} bytes; the OS allows {path_max - 1})")
    if any(len(part) > name_max for part in encoded.split(b"/")):
        raise InvalidInput(f"a name in the local file path {_shown(relative)} is longer than {name_max} bytes")
    lexical = Path(os.path.normpath(os.fsdecode(joined)))
    if not lexical.is_relative_to(root):
        raise InvalidInput(f"local file {_shown(relative)} is outside the local files root; refused")
    # Non-strict realpath never raises for loops or missing parts; a loop is caught when opening.
    resolved = Path(os.path.realpath(lexical))
    if not resolved.is_relative_to(root):
        raise InvalidInput(
            f"local file {_shown(relative)} is outside the local files root (a symlink leads out); refused"
        )
    return resolved


def read_local_file(root: Path, relative: str, max_bytes: int) -> FetchedImage:
    """The bytes of ``relative`` under ``root``: a regular file, at most ``max_bytes``, read once.

    Opened with ``O_NOFOLLOW`` (a final component swapped for a symlink after the check is not
    followed) and ``O_NONBLOCK`` (a FIFO does not hang the request); the type and size come from
    the open descriptor, and the read stops after ``max_bytes + 1`` bytes, so a file that grows
    between ``fstat`` and ``read`` is still refused, never read whole. Every OS failure becomes a
    :class:`NotFound` or :class:`InvalidInput` that names the reason.
    """
    path = resolve_local_file(root, relative)
    shown = _shown(relative)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _local_error(exc, shown) from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InvalidInput(f"local file {shown} is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            kind = (
                "a FIFO"
                if stat.S_ISFIFO(info.st_mode)
                else "a device"
                if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
                else "a socket"
                if stat.S_ISSOCK(info.st_mode)
                else "special"
            )
            raise InvalidInput(f"local file {shown} is {kind}, not a regular file; refused")
        if info.st_size > max_bytes:
            raise PayloadTooLarge(f"local file {shown} is {info.st_size} bytes, over the {max_bytes}-byte limit")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(_READ_CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"local file {shown} grew past the {max_bytes}-byte limit while it was read")
    except OSError as exc:
        raise _local_error(exc, shown) from exc
    finally:
        os.close(fd)
    return FetchedImage(b"".join(chunks), path.name)


def _local_error(exc: OSError, shown: str) -> InvalidInput | NotFound:
    """An OS error opening or reading a local file, as the reason a user can act on."""
    code = exc.errno
    if code in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(f"local file {shown} does not exist under the local files root")
    if code == errno.ELOOP:
        return InvalidInput(f"local file {shown} is a symlink loop (or a link that changed while it was opened)")
    if code == errno.ENAMETOOLONG:
        return InvalidInput(f"local file {shown} has a path longer than the OS allows")
    if code in (errno.EACCES, errno.EPERM):
        return InvalidInput(f"local file {shown} is not readable by sonoseg (permission denied)")
    if code == errno.EISDIR:
        return InvalidInput(f"local file {shown} is a directory, not an image file")
    if code == errno.ENXIO:
        return InvalidInput(f"local file {shown} is a socket or device without a reader; refused")
    return InvalidInput(f"local file {shown} cannot be read: {os.strerror(code) if code else type(exc).__name__}")


class TaskImageFetcher:
    """Resolves task image URLs to bytes. Thread-safe; one per process."""

    def __init__(
        self,
        settings: Settings,
        client: LabelStudioClient | None = None,
        *,
        http: requests.Session | None = None,
    ) -> None:
        self._client = client
        self._http = http or requests.Session()
        self._max_bytes = settings.max_image_bytes
        root = settings.local_files_root
        self._local_root = Path(root).resolve() if root is not None else None
        self._allowed_hosts = frozenset(_host_key(h) for h in settings.allowed_image_hosts if h.strip())

    @classmethod
    def from_settings(cls, settings: Settings) -> TaskImageFetcher:
        client = None
        if settings.label_studio_url and settings.label_studio_api_key:
            client = LabelStudioClient.from_settings(settings)
        return cls(settings, client)

    @property
    def client(self) -> LabelStudioClient | None:
        return self._client

    def fetch(self, url: str, *, task_id: int | None = None) -> FetchedImage:
        """The bytes behind a task's image URL (raises a SonosegError saying why not)."""
        if not isinstance(url, str) or not url.strip():
            raise InvalidInput("the task has no image URL")
        url = url.strip()
        if url.startswith("/"):
            return self._fetch_path(url)
        match = _SCHEME.match(url)  # not urlsplit: it drops tabs and newlines before reading the scheme
        if not match:
            raise InvalidInput(f"expected an absolute path on Label Studio or a URL, got {redact_url(url)!r}")
        scheme = match.group(1).lower()
        if scheme in ("http", "https"):
            checked = check_url(url)  # refuses whatever two parsers could read differently
            if self._client is not None and self._client.is_label_studio_url(checked):
                if _is_local_files_path(checked.path):
                    local = self._read_local(checked.query)
                    if local is not None:
                        return local
                return FetchedImage(self._client.download(checked, max_bytes=self._max_bytes), _name(checked.path))
            return FetchedImage(self._fetch_foreign(checked), _name(checked.path))
        if scheme == "data":
            raise InvalidInput("inline data: image URLs are not supported; upload the file to Label Studio")
        # A cloud storage URI (s3://, gs://, azure-blob://, ...): Label Studio presigns it. The URI is
        # only ever sent base64-encoded to Label Studio, never parsed into a request of ours.
        if any(not (ch.isprintable() or ch == " ") for ch in url):
            raise InvalidInput(f"the {scheme}:// image URI contains a control or non-printable character; refused")
        if task_id is None:
            raise InvalidInput(f"a {scheme}:// image needs its task id to be presigned by Label Studio")
        client = self._need_client(url)
        name = posixpath.basename(url.split("?", 1)[0].split("#", 1)[0]) or "image"
        return FetchedImage(client.download(client.presign_path(task_id, url), max_bytes=self._max_bytes), name)

    # -- the rules -------------------------------------------------------------------------------
    def _fetch_path(self, path: str) -> FetchedImage:
        """A path on Label Studio (``/data/upload/...``, ``/data/local-files/?d=...``)."""
        if path.startswith("//"):
            raise InvalidInput(f"{redact_url(path)!r} is a network-path reference ('//'), not a path on Label Studio")
        problem = has_bad_characters(path, allow_space=True)
        if problem:
            raise InvalidInput(f"refused image path {redact_url(path)}: {problem}")
        without_fragment = path.split("#", 1)[0]
        route, _, query = without_fragment.partition("?")
        if _is_local_files_path(route):
            local = self._read_local(query)
            if local is not None:
                return local
        client = self._need_client(path)
        return FetchedImage(client.download(path, max_bytes=self._max_bytes), _name(route))

    def _need_client(self, url: str) -> LabelStudioClient:
        if self._client is None:
            raise NotReady(
                f"cannot fetch {redact_url(url)}: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY so sonoseg can "
                "download task images from Label Studio"
            )
        return self._client

    def _read_local(self, query: str) -> FetchedImage | None:
        """Read ``?d=`` under the local files root; None when no root is configured."""
        if self._local_root is None:
            return None
        return read_local_file(self._local_root, local_files_value(query), self._max_bytes)

    def _host_allowed(self, checked: CheckedUrl) -> bool:
        """Label Studio's own origin, or a host (or ``host:port``) in SONOSEG_ALLOWED_IMAGE_HOSTS.

        ``checked`` has passed the URL policy, so its host is the one the HTTP client connects to.
        """
        if self._client is not None and self._client.is_label_studio_url(checked):
            return True
        origin = checked.origin
        return origin.host in self._allowed_hosts or f"{origin.host}:{origin.port}" in self._allowed_hosts

    def _fetch_foreign(self, checked: CheckedUrl) -> bytes:
        """A plain http(s) image from an allowed host, without credentials; each redirect re-checked.

        Once a hop has left Label Studio, no later hop carries credentials, even one that comes
        back to Label Studio's origin: it is then fetched without them, like any allowed host.
        """
        for _ in range(MAX_REDIRECTS + 1):
            if not self._host_allowed(checked):
                raise InvalidInput(
                    f"image host of {checked.redacted} is not allowed; add it to SONOSEG_ALLOWED_IMAGE_HOSTS "
                    "or serve the image through Label Studio"
                )
            resp = fetch_without_credentials(self._http, checked, timeout=DEFAULT_TIMEOUT)
            if not resp.is_redirect:
                return read_limited(resp, self._max_bytes, checked.redacted)
            location = resp.headers.get("Location", "")
            resp.close()
            checked = check_redirect(checked, location)
        raise InvalidInput(f"too many redirects fetching {checked.redacted}")


def _is_local_files_path(path: str) -> bool:
    return path.rstrip("/") + "/" == LOCAL_FILES_PATH


def _name(path: str) -> str:
    return posixpath.basename(unquote(path)) or "image"


def _host_key(entry: str) -> str:
    """An allow-list entry as origins are compared: lower case, an IPv6 literal without brackets."""
    host = entry.strip().lower()
    if host.startswith("[") and "]" in host:
        inside, _, port = host[1:].partition("]")
        return inside + port
    return host
