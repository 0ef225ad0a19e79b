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

Anything else is refused with a reason; the caller turns that into an empty prediction.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import requests

from backend.errors import InvalidInput, NotFound, NotReady, PayloadTooLarge
from backend.labelstudio.client import (
    DEFAULT_TIMEOUT,
    MAX_REDIRECTS,
    LabelStudioClient,
    fetch_without_credentials,
    read_limited,
    redact_url,
)
from backend.settings import Settings

log = logging.getLogger(__name__)

LOCAL_FILES_PATH = "/data/local-files/"


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    name: str  # a file name for error messages and format hints; never a credential


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
        self._allowed_hosts = frozenset(h.strip().lower() for h in settings.allowed_image_hosts if h.strip())

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
        parts = urlsplit(url)
        name = posixpath.basename(unquote(parts.path)) or "image"
        scheme = parts.scheme.lower()
        if scheme == "" and not url.startswith("/"):
            raise InvalidInput(f"expected an absolute path on Label Studio or a URL, got {redact_url(url)!r}")
        if scheme in ("", "http", "https"):
            if self._is_local_files(url):
                local = self._read_local(url)
                if local is not None:
                    return local
            if scheme == "" or (self._client is not None and self._client.is_label_studio_url(url)):
                return FetchedImage(self._need_client(url).download(url, max_bytes=self._max_bytes), name)
            return FetchedImage(self._fetch_foreign(url), name)
        if scheme == "data":
            raise InvalidInput("inline data: image URLs are not supported; upload the file to Label Studio")
        # A cloud storage URI (s3://, gs://, azure-blob://, ...): Label Studio presigns it.
        if task_id is None:
            raise InvalidInput(f"a {scheme}:// image needs its task id to be presigned by Label Studio")
        client = self._need_client(url)
        return FetchedImage(client.download(client.presign_path(task_id, url), max_bytes=self._max_bytes), name)

    # -- the rules -------------------------------------------------------------------------------
    def _need_client(self, url: str) -> LabelStudioClient:
        if self._client is None:
            raise NotReady(
                f"cannot fetch {redact_url(url)}: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY so sonoseg can "
                "download task images from Label Studio"
            )
        return self._client

    def _is_local_files(self, url: str) -> bool:
        parts = urlsplit(url)
        if parts.path.rstrip("/") + "/" != LOCAL_FILES_PATH:
            return False
        return parts.scheme == "" or (self._client is not None and self._client.is_label_studio_url(url))

    def _read_local(self, url: str) -> FetchedImage | None:
        """Read ``?d=`` under the local files root; None when no root is configured."""
        if self._local_root is None:
            return None
        values = parse_qs(urlsplit(url).query).get("d")
        if not values or not values[0]:
            raise InvalidInput("a /data/local-files/ URL without its ?d= path")
        relative = values[0]
        # As Label Studio does (os.path.join): relative to the root, or an absolute path that must lie in it.
        candidate = (self._local_root / relative).resolve()
        if not candidate.is_relative_to(self._local_root):
            raise InvalidInput(f"local file {relative!r} is outside the local files root; refused")
        if not candidate.is_file():
            raise NotFound(f"local file {relative!r} does not exist under the local files root")
        size = candidate.stat().st_size
        if size > self._max_bytes:
            raise PayloadTooLarge(f"local file {relative!r} is {size} bytes, over the {self._max_bytes}-byte limit")
        return FetchedImage(candidate.read_bytes(), candidate.name)

    def _host_allowed(self, url: str) -> bool:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        host = parts.hostname.lower()
        if self._client is not None and self._client.is_label_studio_url(url):
            return True
        return host in self._allowed_hosts or (parts.port is not None and f"{host}:{parts.port}" in self._allowed_hosts)

    def _fetch_foreign(self, url: str) -> bytes:
        """A plain http(s) image from an allowed host, without credentials; redirects re-checked."""
        for _ in range(MAX_REDIRECTS + 1):
            if not self._host_allowed(url):
                raise InvalidInput(
                    f"image host of {redact_url(url)} is not allowed; add it to SONOSEG_ALLOWED_IMAGE_HOSTS "
                    "or serve the image through Label Studio"
                )
            if self._client is not None and self._client.is_label_studio_url(url):
                return self._client.download(url, max_bytes=self._max_bytes)
            resp = fetch_without_credentials(self._http, url, timeout=DEFAULT_TIMEOUT)
            if not resp.is_redirect:
                return read_limited(resp, self._max_bytes, redact_url(url))
            location = resp.headers.get("Location", "")
            resp.close()
            url = urljoin(url, location)
        raise InvalidInput(f"too many redirects fetching {redact_url(url)}")
