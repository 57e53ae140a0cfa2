"""What one API process holds: settings, engine, Temporal client, key store. Lives in app state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from temporalio.client import Client

from core.config import Settings

if TYPE_CHECKING:
    from pki.keys import SoftwareKeyStore


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    key_store: SoftwareKeyStore
    temporal: Client | None = None
    owns_engine: bool = False
    owns_temporal: bool = False
    extra: dict[str, object] = field(default_factory=dict)
