from __future__ import annotations

from pathlib import Path

import pytest

from backend.errors import InvalidInput
from backend.services.pseudonyms import load_or_create_key, pseudonymise
from backend.services.splits import SplitFractions, assign_split
from backend.settings import Settings


def test_defaults_are_the_embedded_setup() -> None:
    s = Settings.from_env({})
    assert s.port == 9090 and s.data_dir == Path("sonoseg-data")
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("sonoseg-data/sonoseg.db")
    assert s.broker_url.startswith("sqla+sqlite:///")


def test_env_overrides_and_errors() -> None:
    s = Settings.from_env(
        {
            "SONOSEG_PORT": "9191",
            "SONOSEG_DATABASE_URL": "postgresql+psycopg://x/y",
            "LABEL_STUDIO_URL": "http://ls:8080/",
            "SONOSEG_ALLOWED_IMAGE_HOSTS": "a.org, b.org",
        }
    )
    assert s.port == 9191 and s.database_url == "postgresql+psycopg://x/y"
    assert s.label_studio_url == "http://ls:8080" and s.allowed_image_hosts == ("a.org", "b.org")
    with pytest.raises(InvalidInput, match="SONOSEG_PORT"):
        Settings.from_env({"SONOSEG_PORT": "ninety"})
    with pytest.raises(InvalidInput, match="SONOSEG_DEVICE"):
        Settings.from_env({"SONOSEG_DEVICE": "tpu"})


def test_secrets_are_not_in_repr() -> None:
    s = Settings(
        label_studio_api_key="sekrit-key", basic_auth_user="u", basic_auth_password="pw-123", webhook_secret="hook-456"
    )
    assert "sekrit-key" not in repr(s) and "pw-123" not in repr(s) and "hook-456" not in repr(s)


def test_split_is_a_stable_function_of_subject() -> None:
    subjects = [f"subj-{i}" for i in range(2000)]
    splits = [assign_split(s, salt="1") for s in subjects]
    assert splits == [assign_split(s, salt="1") for s in subjects]
    frac = {k: splits.count(k) / len(splits) for k in ("train", "val", "test")}
    assert 0.65 < frac["train"] < 0.75 and 0.11 < frac["val"] < 0.19 and 0.11 < frac["test"] < 0.19
    with pytest.raises(InvalidInput):
        SplitFractions(0.5, 0.5, 0.5)


def test_pseudonyms_are_keyed_and_stable(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    assert load_or_create_key(tmp_path) == key
    assert (tmp_path / "pseudonym.key").stat().st_mode & 0o777 == 0o600
    p = pseudonymise("Jane Doe 12345", key)
    assert p == pseudonymise("Jane Doe 12345", key) and p.startswith("subj-") and "Jane" not in p
    assert pseudonymise("Jane Doe 12345", b"another-key") != p


def test_pseudonym_key_creation_races_to_one_key(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: load_or_create_key(tmp_path), range(32)))
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert not list(tmp_path.glob(".tmp-key-*"))
