"""One Settings object for every signgate process (API, worker, CLI)."""

from __future__ import annotations

import base64
import binascii
from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigurationError(Exception):
    """Bad configuration: start-up stops with one clear line."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIGNGATE_", extra="ignore")

    data_dir: Path = Path(".signgate")
    database_url: str | None = None
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    task_queue: str = "signgate"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    master_key: str | None = Field(default=None, repr=False)
    master_key_id: str = "default"
    dev_mode: bool = False
    default_validity_days: int = 365
    update_rpc_timeout_seconds: float = 10.0
    audit_filing_seconds: float = 1.0
    log_level: str = "INFO"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'signgate.db').resolve()}"

    @cached_property
    def master_key_bytes(self) -> bytes:
        """The 32-byte key-encryption key.

        In dev mode it is read from (or generated into) the data dir; elsewhere it must be
        configured, because a silent default would leave every signing key readable.
        """
        if self.master_key:
            return decode_master_key(self.master_key)
        key_file = self.data_dir / "master.key"
        if key_file.exists():
            return decode_master_key(key_file.read_text().strip())
        if not self.dev_mode:
            raise ConfigurationError(
                "SIGNGATE_MASTER_KEY is not set: generate one with `signgate keygen` "
                "(32 bytes, base64) and set it before starting outside dev mode"
            )
        raise ConfigurationError(f"no master key in {key_file}; run `signgate dev` to create one")


def decode_master_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigurationError("SIGNGATE_MASTER_KEY is not valid base64") from exc
    if len(key) != 32:
        raise ConfigurationError("SIGNGATE_MASTER_KEY must decode to exactly 32 bytes")
    return key


def new_master_key_text() -> str:
    import secrets

    return base64.b64encode(secrets.token_bytes(32)).decode()


def ensure_dev_master_key(data_dir: Path) -> None:
    """Create DIR/master.key (0600) on the first `signgate dev` start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    key_file = data_dir / "master.key"
    if key_file.exists():
        return
    key_file.touch(mode=0o600)
    key_file.write_text(new_master_key_text() + "\n")
