"""The FastAPI application: create_app and its lifespan."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import FastAPI
from sqlalchemy import Engine
from starlette.types import ASGIApp, Receive, Scope, Send
from temporalio.client import Client

from api.context import AppContext
from api.errors import install_error_handlers, internal_error_response
from core.config import Settings
from core.runtime import freeze_startup_objects
from store import deferred
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


class SigngateApp(FastAPI):
    """FastAPI, with a few hot calls served before the middleware stack.

    A fast route is a bare ASGI endpoint for one method and path pattern (the sign call): it
    skips the exception, body-limit and routing layers, which cost more than its signature.
    It answers every error itself; anything unexpected still gets the contract's 500 body.
    The FastAPI route of the same path stays registered for the OpenAPI document.
    """

    fast_routes: tuple[tuple[str, re.Pattern[str], ASGIApp], ...] = ()

    def add_fast_route(self, method: str, path: str, endpoint: ASGIApp) -> None:
        pattern = re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(path)))
        self.fast_routes = (*self.fast_routes, (method, pattern, endpoint))

    def match_bare(self, method: str, path: str, root_path: str = "") -> tuple[Any, dict[str, str]] | None:
        """The fast route for this method and path, with its path parameters; else None."""
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        for route_method, pattern, endpoint in self.fast_routes:
            if method == route_method:
                found = pattern.fullmatch(path)
                if found is not None:
                    return endpoint, found.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.fast_routes:
            found = self.match_bare(scope["method"], scope["path"], scope.get("root_path", ""))
            if found is not None:
                scope["app"] = self
                scope["path_params"] = found[1]
                await _guarded(found[0], scope, receive, send)
                return
        await super().__call__(scope, receive, send)


async def _guarded(endpoint: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    started = False

    async def tracking_send(message: dict[str, object]) -> None:
        nonlocal started
        started = True
        await send(message)

    try:
        await endpoint(scope, receive, cast(Send, tracking_send))
    except Exception:
        log.exception("unexpected error on %s %s", scope["method"], scope["path"])
        if started:
            raise
        await internal_error_response()(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    temporal: Client | None = None,
) -> SigngateApp:
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
        # SQLite: the sign path's audit events, filed into the filter indexes once a second.
        filer = deferred.start_filer(ctx.engine, settings.audit_filing_seconds)
        freeze_startup_objects()
        yield
        if filer is not None:
            await asyncio.to_thread(filer.close)
        batcher = ctx.extra.pop("sign_batcher", None)
        if batcher is not None:
            await batcher.aclose()  # type: ignore[attr-defined]
        if ctx.owns_engine:
            ctx.engine.dispose()

    app = SigngateApp(
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


def _include_optional_routes(app: SigngateApp) -> None:
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
