"""Settings: the master key is required outside dev mode and must be 32 bytes of base64."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from core.config import (
    ConfigurationError,
    Settings,
    decode_master_key,
    ensure_dev_master_key,
    new_master_key_text,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what a test sets reaches Settings; the working dir holds no .signgate of ours."""
    for name in list(os.environ):
        if name.startswith("SIGNGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_missing_master_key_outside_dev_mode_is_a_configuration_error(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    with pytest.raises(ConfigurationError, match="SIGNGATE_MASTER_KEY is not set"):
        _ = settings.master_key_bytes


def test_dev_mode_without_a_key_file_points_at_signgate_dev(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", dev_mode=True)
    with pytest.raises(ConfigurationError, match="signgate dev"):
        _ = settings.master_key_bytes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not base64!", "not valid base64"),
        ("", "exactly 32 bytes"),
        (base64.b64encode(b"\x01" * 16).decode(), "exactly 32 bytes"),
        (base64.b64encode(b"\x01" * 33).decode(), "exactly 32 bytes"),
        (base64.b64encode(b"\x01" * 32).decode()[:-2], "not valid base64"),
    ],
)
def test_bad_master_keys_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        decode_master_key(text)


def test_bad_master_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIGNGATE_MASTER_KEY", base64.b64encode(b"short").decode())
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="32 bytes"):
        _ = settings.master_key_bytes


def test_master_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = os.urandom(32)
    monkeypatch.setenv("SIGNGATE_MASTER_KEY", base64.b64encode(key).decode())
    assert Settings(data_dir=tmp_path).master_key_bytes == key


def test_master_key_is_kept_out_of_repr() -> None:
    text = new_master_key_text()
    settings = Settings(master_key=text)
    assert text not in repr(settings)
    assert text not in str(settings)


def test_new_master_keys_are_random_and_32_bytes() -> None:
    first, second = new_master_key_text(), new_master_key_text()
    assert first != second
    assert len(decode_master_key(first)) == 32


def test_dev_key_is_generated_owner_only_and_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh" / "data"
    ensure_dev_master_key(data_dir)
    key_file = data_dir / "master.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = Settings(data_dir=data_dir, dev_mode=True).master_key_bytes
    assert len(key) == 32

    ensure_dev_master_key(data_dir)
    assert Settings(data_dir=data_dir, dev_mode=True).master_key_bytes == key


def test_dev_key_file_mode_ignores_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        ensure_dev_master_key(tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "master.key").stat().st_mode) == 0o600


def test_environment_prefix_and_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIGNGATE_API_PORT", "9100")
    monkeypatch.setenv("SIGNGATE_TEMPORAL_ADDRESS", "temporal.internal:7233")
    monkeypatch.setenv("SIGNGATE_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.api_port == 9100
    assert settings.temporal_address == "temporal.internal:7233"
    assert settings.task_queue == "signgate"
    assert settings.dev_mode is False
    assert settings.effective_database_url == f"sqlite:///{(tmp_path / 'signgate.db').resolve()}"


def test_explicit_database_url_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNGATE_DATABASE_URL", "postgresql://signgate@db/signgate")
    assert Settings().effective_database_url == "postgresql://signgate@db/signgate"


def test_load_settings_turns_a_bad_value_into_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.server import load_settings

    monkeypatch.setenv("SIGNGATE_API_PORT", "eighty")
    with pytest.raises(ConfigurationError, match="SIGNGATE_API_PORT") as caught:
        load_settings()
    assert "\n" not in str(caught.value)
