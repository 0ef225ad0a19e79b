from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


# -- Settings.to_env: the inverse of from_env ------------------------------------------------------
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
_word = _text.filter(bool)
_host = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,10}[a-z0-9])?(:[0-9]{1,5})?", fullmatch=True)
_float = st.floats(allow_nan=False, allow_infinity=True)
_int = st.integers(min_value=-(2**63), max_value=2**63)


@st.composite
def any_settings(draw: st.DrawFn) -> Settings:
    """Settings with every field varied, within what an environment variable can say (see to_env)."""
    user, password = draw(st.one_of(st.just(("", "")), st.tuples(_word, _word)))  # both or neither
    return Settings(
        data_dir=draw(st.builds(Path, _text)),
        database_url=draw(_text),  # "" -> derived from data_dir
        broker_url=draw(_text),
        result_backend=draw(_text),
        broker_namespace=draw(_text),
        host=draw(_word),
        port=draw(st.integers(1, 65535)),
        log_level=draw(_word),
        label_studio_url=draw(_text.filter(lambda s: not s.endswith("/"))),
        label_studio_api_key=draw(_text),
        local_files_root=draw(st.none() | st.builds(Path, _text)),
        allowed_image_hosts=tuple(draw(st.lists(_host, max_size=3))),
        basic_auth_user=user,
        basic_auth_password=password,
        webhook_secret=draw(_text),
        max_request_bytes=draw(_int),
        max_image_side=draw(_int),
        max_image_bytes=draw(_int),
        decode_memory_bytes=draw(_int),
        device=draw(st.sampled_from(["auto", "cpu", "cuda"])),
        model_preset=draw(_word),
        train_max_minutes=draw(_float),
        retrain_after=draw(_int),
        retrain_debounce_seconds=draw(_float),
        gate_margin=draw(_float),
        gate_min_dice=draw(st.floats(0.0, 1.0)),
        repredict_after_promotion=draw(st.booleans()),
        model_poll_seconds=draw(_float),
        gate_metric=draw(_word),
        retrain_cron=draw(
            st.sampled_from(["0 2 * * *", "30 1 * * 1-5", "off"]) | _word.filter(lambda s: s == s.strip())
        ),
        dispatch_interval_seconds=draw(_float),
        train_heartbeat_seconds=draw(_float),
        train_stale_after_seconds=draw(_float),
        train_max_attempts=draw(_int),
    )


@given(any_settings())
def test_to_env_reads_back_as_equal_settings(settings: Settings) -> None:
    env = settings.to_env()
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in env.items())
    assert all(k.startswith(("SONOSEG_", "LABEL_STUDIO_")) for k in env)
    assert Settings.from_env(env) == settings


def test_to_env_writes_every_field_as_its_own_variable(tmp_path: Path) -> None:
    full = Settings(
        data_dir=tmp_path,
        label_studio_url="http://ls:8080",
        label_studio_api_key="key",
        local_files_root=tmp_path / "files",
        allowed_image_hosts=("a.org", "b.org:8443"),
        basic_auth_user="u",
        basic_auth_password="p",
        webhook_secret="s",
        broker_namespace="staging",
    )
    env = full.to_env()
    assert len(env) == len(dataclasses.fields(Settings))  # nothing left out, no two fields share a variable
    assert (
        env["SONOSEG_REPREDICT_AFTER_PROMOTION"] == "true" and env["SONOSEG_ALLOWED_IMAGE_HOSTS"] == "a.org,b.org:8443"
    )
    assert Settings.from_env(env) == full
    assert (
        Settings()
        .to_env()
        .keys()
        .isdisjoint({"LABEL_STUDIO_URL", "SONOSEG_LOCAL_FILES_ROOT", "SONOSEG_WEBHOOK_SECRET"})
    )


def test_to_env_round_trips_through_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    settings = Settings(
        data_dir=tmp_path, port=9191, train_max_minutes=0.1 + 0.2, retrain_cron="off", repredict_after_promotion=False
    )
    for name in os.environ:
        if name.startswith(("SONOSEG_", "LABEL_STUDIO_")):
            monkeypatch.delenv(name)
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings.from_env() == settings


def test_a_workers_environment_is_the_servers_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.processes import worker_environment

    monkeypatch.setenv("SONOSEG_GATE_MARGIN", "0.5")  # the test's own environment does not leak through
    settings = Settings(data_dir=tmp_path, gate_margin=0.0, label_studio_url="http://ls:8080", train_max_attempts=5)
    env = worker_environment(settings)
    assert Settings.from_env(env) == settings and env["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize(
    ("changes", "variable"),
    [
        ({"retrain_cron": ""}, "SONOSEG_RETRAIN_CRON"),  # "" reads as unset: the default schedule
        ({"retrain_cron": " 0 2 * * *"}, "SONOSEG_RETRAIN_CRON"),  # from_env strips
        ({"host": ""}, "SONOSEG_HOST"),
        ({"label_studio_url": "http://ls:8080/"}, "LABEL_STUDIO_URL"),  # from_env drops the slash
        ({"allowed_image_hosts": ("a.org,b.org",)}, "SONOSEG_ALLOWED_IMAGE_HOSTS"),
        ({"allowed_image_hosts": (" a.org",)}, "SONOSEG_ALLOWED_IMAGE_HOSTS"),
        ({"allowed_image_hosts": ("a.org", "")}, "SONOSEG_ALLOWED_IMAGE_HOSTS"),
        ({"gate_margin": float("nan")}, "SONOSEG_GATE_MARGIN"),
    ],
)
def test_to_env_refuses_settings_it_cannot_write(changes: dict[str, object], variable: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=variable):
        Settings(data_dir=tmp_path).replace(**changes).to_env()


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
