"""The FastAPI application: create_app and its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine
from temporalio.client import Client

from api.context import AppContext
from api.errors import install_error_handlers
from core.config import Settings
from store.db import make_engine

log = logging.getLogger(__name__)


def build_key_store(settings: Settings) -> object:
    from pki.keys import KeyEncryptor, SoftwareKeyStore

    return SoftwareKeyStore(KeyEncryptor(settings.master_key_bytes, settings.master_key_id))


class LazyKeyStore:
    """The key store, opened on first use.

    Building the app (for its OpenAPI document, say) needs no master key; serving does: the
    lifespan opens the store at start-up, so a server without a master key refuses to start.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._store: object | None = None

    def open(self) -> object:
        if self._store is None:
            self._store = build_key_store(self._settings)
        return self._store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.open(), name)


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    temporal: Client | None = None,
) -> FastAPI:
    """Build the app; tests pass their own engine and Temporal client, servers let lifespan connect."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx: AppContext = app.state.ctx
        ctx.key_store.open()  # type: ignore[attr-defined]  # no master key: refuse to start
        if ctx.temporal is None:
            from core.temporal import connect

            ctx.temporal = await connect(settings, lazy=True)
            ctx.owns_temporal = True
        yield
        batcher = ctx.extra.pop("sign_batcher", None)
        if batcher is not None:
            batcher.close()  # type: ignore[attr-defined]
        if ctx.owns_engine:
            ctx.engine.dispose()

    app = FastAPI(
        title="signgate",
        version="0.1.0",
        description="Code signing with server-held keys, approval policies and an audit trail.",
        lifespan=lifespan,
    )
    owns_engine = engine is None
    app.state.ctx = AppContext(
        settings=settings,
        engine=engine or make_engine(settings.effective_database_url),
        key_store=LazyKeyStore(settings),  # type: ignore[arg-type]
        temporal=temporal,
        owns_engine=owns_engine,
    )
    install_error_handlers(app)

    from api.routes import health, identities

    app.include_router(health.router)
    for module in (identities,):
        app.include_router(module.router, prefix="/api/v1")
    _include_optional_routes(app)
    return app


def _include_optional_routes(app: FastAPI) -> None:
    import importlib

    for name in (
        "certificates",
        "signers",
        "policies",
        "signing_requests",
        "grants",
        "pre_approvals",
        "audit",
    ):
        try:
            module = importlib.import_module(f"api.routes.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"api.routes.{name}":
                raise
            continue
        app.include_router(module.router, prefix="/api/v1")
        install = getattr(module, "install_fast_sign", None)
        if install is not None:
            install(app, prefix="/api/v1")
