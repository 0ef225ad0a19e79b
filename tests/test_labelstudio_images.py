"""Task image URLs -> bytes: uploads, local files, cloud URIs, allowed hosts, limits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.errors import InvalidInput, NotFound, NotReady, PayloadTooLarge
from backend.labelstudio.client import LabelStudioClient
from backend.labelstudio.images import TaskImageFetcher
from backend.settings import Settings
from tests.support.fake_labelstudio import LEGACY_TOKEN, FakeCloud, FakeLabelStudio
from tests.support.servers import ServedApp

PNG = b"\x89PNG\r\n\x1a\n-fake-image-bytes"


@pytest.fixture
def servers() -> Iterator[tuple[FakeLabelStudio, ServedApp, FakeCloud, ServedApp]]:
    ls, cloud = FakeLabelStudio(), FakeCloud()
    ls_served, cloud_served = ServedApp(ls.app()), ServedApp(cloud.app(), host="localhost")
    ls.cloud_url = cloud_served.url
    yield ls, ls_served, cloud, cloud_served
    ls_served.close()
    cloud_served.close()


def make_fetcher(tmp_path: Path, ls_url: str | None, **changes: object) -> TaskImageFetcher:
    settings = Settings(data_dir=tmp_path / "data").replace(**changes)
    client = LabelStudioClient(ls_url, LEGACY_TOKEN) if ls_url else None
    return TaskImageFetcher(settings, client)


def test_upload_path_is_downloaded_from_label_studio_with_the_token(servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ls, ls_served, _, _ = servers
    ls.files["/data/upload/1/abc-frame.png"] = PNG
    fetcher = make_fetcher(tmp_path, ls_served.url)
    fetched = fetcher.fetch("/data/upload/1/abc-frame.png", task_id=1)
    assert fetched.data == PNG and fetched.name == "abc-frame.png"
    assert ls.seen[-1].authorization == f"Token {LEGACY_TOKEN}"
    # The same file by absolute URL on the Label Studio origin.
    assert fetcher.fetch(f"{ls_served.url}/data/upload/1/abc-frame.png").data == PNG


def test_relative_url_without_label_studio_configured_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(NotReady, match="LABEL_STUDIO_URL"):
        make_fetcher(tmp_path, None).fetch("/data/upload/1/a.png", task_id=1)


def test_local_files_are_read_under_the_root_and_never_outside(servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ls, ls_served, _, _ = servers
    root = tmp_path / "docroot"
    (root / "scans").mkdir(parents=True)
    (root / "scans" / "a b.png").write_bytes(PNG)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"do not read")
    (root / "link.png").symlink_to(secret)
    fetcher = make_fetcher(tmp_path, ls_served.url, local_files_root=root)
    before = len(ls.seen)
    assert fetcher.fetch("/data/local-files/?d=scans/a%20b.png").data == PNG
    assert len(ls.seen) == before  # read from disk, Label Studio not asked
    for bad in ("../secret.png", "scans/../../secret.png", "/etc/passwd", "link.png"):
        with pytest.raises(InvalidInput, match="outside the local files root"):
            fetcher.fetch(f"/data/local-files/?d={bad}")
    with pytest.raises(NotFound):
        fetcher.fetch("/data/local-files/?d=scans/missing.png")
    with pytest.raises(InvalidInput, match="without its"):
        fetcher.fetch("/data/local-files/")


def test_local_files_without_a_root_come_from_label_studio(servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ls, ls_served, _, _ = servers
    ls.files["/data/local-files/?d=scans/a.png"] = PNG
    assert make_fetcher(tmp_path, ls_served.url).fetch("/data/local-files/?d=scans/a.png").data == PNG
    assert ls.seen[-1].authorization == f"Token {LEGACY_TOKEN}"


def test_cloud_uri_is_presigned_by_label_studio_and_fetched_without_credentials(servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ls, ls_served, cloud, _ = servers
    cloud.files["/bucket/frame7.png"] = PNG
    fetcher = make_fetcher(tmp_path, ls_served.url)
    assert fetcher.fetch("s3://bucket/frame7.png", task_id=7).data == PNG
    assert ls.seen[-1].path.startswith("/tasks/7/presign/?fileuri=")
    assert cloud.seen[-1].authorization is None
    with pytest.raises(InvalidInput, match="task id"):
        fetcher.fetch("gs://bucket/frame7.png", task_id=None)


def test_plain_urls_only_from_allowed_hosts_and_without_credentials(servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, ls_served, cloud, cloud_served = servers
    cloud.files["/img/a.png"] = PNG
    url = f"{cloud_served.url}/img/a.png"
    with pytest.raises(InvalidInput, match="not allowed"):
        make_fetcher(tmp_path, ls_served.url).fetch(url)
    assert cloud.seen == []
    allowed = make_fetcher(tmp_path, ls_served.url, allowed_image_hosts=("localhost",))
    assert allowed.fetch(url).data == PNG
    assert cloud.seen[-1].authorization is None
    # A redirect from an allowed host to one that is not allowed is refused before it is followed.
    cloud.redirects["/img/moved.png"] = "http://example.invalid/evil.png"
    with pytest.raises(InvalidInput, match="not allowed"):
        allowed.fetch(f"{cloud_served.url}/img/moved.png")


def test_size_limit_applies_to_downloads_and_local_files(servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ls, ls_served, _, _ = servers
    ls.files["/data/upload/1/big.png"] = b"x" * 5000
    root = tmp_path / "root"
    root.mkdir()
    (root / "big.png").write_bytes(b"x" * 5000)
    fetcher = make_fetcher(tmp_path, ls_served.url, max_image_bytes=4096, local_files_root=root)
    with pytest.raises(PayloadTooLarge):
        fetcher.fetch("/data/upload/1/big.png")
    with pytest.raises(PayloadTooLarge):
        fetcher.fetch("/data/local-files/?d=big.png")


def test_unusable_urls_are_refused_with_a_reason(tmp_path: Path) -> None:
    fetcher = make_fetcher(tmp_path, None)
    for url, reason in (
        ("", "no image URL"),
        ("data:image/png;base64,AAAA", "inline data"),
        ("relative/path.png", "absolute path"),
    ):
        with pytest.raises(InvalidInput, match=reason):
            fetcher.fetch(url)
