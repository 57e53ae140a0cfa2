"""Shared fixtures: keys generated once per session (RSA-4096 takes a while) and an openssl runner."""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pki import PrivateKey, generate_private_key, public_key_pem


@functools.cache
def _key(key_algorithm: str) -> PrivateKey:
    return generate_private_key(key_algorithm)


@pytest.fixture(scope="session")
def key_of() -> Callable[[str], PrivateKey]:
    """Lazily generated, cached keys, so only the key types a run needs are paid for."""
    return _key


def openssl(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False)


def write_public_key(private_key: PrivateKey, path: Path) -> Path:
    path.write_text(public_key_pem(private_key))
    return path
