"""The Label Studio client: both token kinds, refresh-and-retry, credentials only to Label Studio."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from backend.errors import InvalidInput, NotReady, UpstreamError
from backend.labelstudio.client import LabelStudioClient, TokenKind, token_kind
from tests.support.fake_labelstudio import LEGACY_TOKEN, FakeCloud, FakeLabelStudio, fake_jwt
from tests.support.servers import ServedApp


@pytest.fixture
def ls() -> Iterator[tuple[FakeLabelStudio, ServedApp]]:
    fake = FakeLabelStudio()
    served = ServedApp(fake.app())
    yield fake, served
    served.close()


@pytest.fixture
def cloud() -> Iterator[tuple[FakeCloud, ServedApp]]:
    fake = FakeCloud()
    served = ServedApp(fake.app(), host="localhost")  # another host name than 127.0.0.1
    yield fake, served
    served.close()


def test_token_kind_tells_pat_from_legacy() -> None:
    assert token_kind(LEGACY_TOKEN) is TokenKind.LEGACY
    assert token_kind(fake_jwt()) is TokenKind.PERSONAL
    assert token_kind("a.b.c") is TokenKind.LEGACY  # three parts but no JWT header


def test_missing_configuration_says_what_to_set() -> None:
    with pytest.raises(NotReady, match="LABEL_STUDIO_URL"):
        LabelStudioClient("", LEGACY_TOKEN)
    with pytest.raises(NotReady, match="LABEL_STUDIO_API_KEY"):
        LabelStudioClient("http://127.0.0.1:1", "")


def test_legacy_token_is_sent_as_token_header(ls: tuple[FakeLabelStudio, ServedApp]) -> None:
    fake, served = ls
    fake.projects[3] = {"id": 3, "title": "p", "label_config": "<View/>"}
    client = LabelStudioClient(served.url, f"Token {LEGACY_TOKEN}")  # a pasted header value works too
    assert client.get_project(3)["id"] == 3
    assert fake.seen[-1].authorization == f"Token {LEGACY_TOKEN}"
    assert fake.refreshes == 0


def test_pat_is_exchanged_refreshed_on_401_and_retried_once(ls: tuple[FakeLabelStudio, ServedApp]) -> None:
    fake, served = ls
    fake.projects[1] = {"id": 1, "title": "p", "label_config": "<View/>"}
    client = LabelStudioClient(served.url, fake.pat)
    assert client.get_project(1)["id"] == 1
    assert fake.refreshes == 1
    assert fake.seen[-1].authorization is not None and fake.seen[-1].authorization.startswith("Bearer access-1-")
    client.get_project(1)
    assert fake.refreshes == 1  # the access token is reused while it works
    fake.expire_access_tokens()
    assert client.get_project(1)["id"] == 1
    assert fake.refreshes == 2
    statuses = [s.path for s in fake.seen]
    assert statuses.count("/api/token/refresh/") == 2


def test_revoked_pat_and_refused_legacy_token_raise_upstream_errors(ls: tuple[FakeLabelStudio, ServedApp]) -> None:
    _, served = ls
    with pytest.raises(UpstreamError, match="personal access token"):
        LabelStudioClient(served.url, fake_jwt("someone-else")).get_project(1)
    with pytest.raises(UpstreamError, match="legacy tokens are disabled"):
        LabelStudioClient(served.url, "f" * 40).get_project(1)


def test_pat_retries_only_once(ls: tuple[FakeLabelStudio, ServedApp], monkeypatch: pytest.MonkeyPatch) -> None:
    fake, served = ls
    client = LabelStudioClient(served.url, fake.pat)
    # Every access token is rejected: one refresh-and-retry, then a clear error, no loop.
    monkeypatch.setattr(fake, "valid_access", type("Never", (set,), {"__contains__": lambda self, x: False})())
    with pytest.raises(UpstreamError, match="401"):
        client.get_project(1)
    assert fake.refreshes == 2


def test_credentials_never_leave_the_label_studio_origin(
    ls: tuple[FakeLabelStudio, ServedApp], cloud: tuple[FakeCloud, ServedApp]
) -> None:
    fake, served = ls
    fake_cloud, cloud_served = cloud
    client = LabelStudioClient(served.url, LEGACY_TOKEN)
    with pytest.raises(InvalidInput, match="refusing to send Label Studio credentials"):
        client.request("GET", f"{cloud_served.url}/bucket/a.png")
    # Same host, other port: another origin.
    with pytest.raises(InvalidInput):
        client.request("GET", f"http://127.0.0.1:{served.port + 1}/x")
    assert fake_cloud.seen == []
    # A redirect from Label Studio to another host is followed without the Authorization header.
    fake.cloud_url = cloud_served.url
    fake_cloud.files["/bucket/a.png"] = b"\x89PNG-bytes"
    data = client.download(client.presign_path(7, "s3://bucket/a.png"), max_bytes=1024)
    assert data == b"\x89PNG-bytes"
    assert [s.authorization for s in fake_cloud.seen] == [None]
    with pytest.raises(InvalidInput, match="redirected to another host"):
        client.download(client.presign_path(7, "s3://bucket/a.png"), max_bytes=1024, foreign_allowed=False)


def test_iter_tasks_walks_every_page(ls: tuple[FakeLabelStudio, ServedApp]) -> None:
    fake, served = ls
    for i in range(1, 8):
        fake.tasks[i] = {"id": i, "project": 5, "data": {"image": f"/data/upload/5/{i}.png"}, "annotations": []}
    fake.tasks[99] = {"id": 99, "project": 6, "data": {}, "annotations": []}
    client = LabelStudioClient(served.url, LEGACY_TOKEN)
    assert [t["id"] for t in client.iter_tasks(5, page_size=3)] == list(range(1, 8))
    assert all("fields=all" in s.path for s in fake.seen if s.path.startswith("/api/tasks/"))


def test_unreachable_label_studio_is_an_upstream_error() -> None:
    from tests.support.servers import free_port

    client = LabelStudioClient(f"http://127.0.0.1:{free_port()}", LEGACY_TOKEN)
    with pytest.raises(UpstreamError, match="cannot reach Label Studio"):
        client.get_project(1)


def test_repr_and_errors_never_show_the_key(ls: tuple[FakeLabelStudio, ServedApp]) -> None:
    fake, served = ls
    client = LabelStudioClient(served.url, fake.pat)
    assert fake.pat not in repr(client)
    with pytest.raises(UpstreamError) as info:
        LabelStudioClient(served.url, "f" * 40).get_project(1)
    assert "f" * 40 not in str(info.value)


def test_a_backslash_or_user_info_trick_cannot_borrow_the_label_studio_origin(
    ls: tuple[FakeLabelStudio, ServedApp], cloud: tuple[FakeCloud, ServedApp]
) -> None:
    """``http://other\\@label-studio/x``: urllib reads Label Studio's host, requests connects to ``other``."""
    fake, served = ls
    fake_cloud, cloud_served = cloud
    fake.files["/data/upload/1/a.png"] = b"\x89PNG-bytes"
    client = LabelStudioClient(served.url, LEGACY_TOKEN)
    other = f"{cloud_served.host}:{cloud_served.port}"
    here = f"127.0.0.1:{served.port}"
    for url in (
        f"http://{other}\\@{here}/data/upload/1/a.png",
        f"http://{other}%5C@{here}/data/upload/1/a.png",
        f"http://{here}@{other}/data/upload/1/a.png",
        f"http://{other}\t@{here}/data/upload/1/a.png",
    ):
        assert not client.is_label_studio_url(url)
        with pytest.raises(InvalidInput):
            client.download(url, max_bytes=1024)
    assert fake_cloud.seen == []
