"""The production processes (`signgate api`, `worker`, `migrate`) and the checks they share.

Every check here turns a bad configuration into a `ConfigurationError` with one sentence a
person can act on; the command line prints that sentence and exits with status 2.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import socket
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from core.config import ConfigurationError, Settings

log = logging.getLogger("signgate.cli")

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
TEMPORAL_CONNECT_TIMEOUT = 10.0


def logging_config(level: str = "INFO") -> dict[str, Any]:
    """One dictConfig for the CLI, the embedded dev stack and every uvicorn worker process."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"format": LOG_FORMAT}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            # uvicorn's own loggers propagate to the root handler instead of printing twice.
            "uvicorn": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.access": {"level": level.upper(), "handlers": [], "propagate": True},
            # httpx logs every request URL at INFO and alembic its set-up on every start;
            # run_migrations says what changed instead.
            "httpx": {"level": "WARNING"},
            "alembic": {"level": "WARNING"},
        },
    }


def configure_logging(level: str = "INFO") -> None:
    try:
        logging.config.dictConfig(logging_config(level))
    except ValueError as exc:
        raise ConfigurationError(f"SIGNGATE_LOG_LEVEL={level!r} is not a logging level") from exc


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and command-line overrides), one line on a bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise ConfigurationError(f"invalid SIGNGATE_{field.upper()}: {first['msg']}") from exc


def require_master_key(settings: Settings) -> None:
    """Fail at start-up, not on the first signing call, when the key-encryption key is unusable."""
    _ = settings.master_key_bytes


def redacted_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def _first_line(exc: BaseException) -> str:
    cause: BaseException = exc
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        cause = orig
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


def open_database(settings: Settings) -> Engine:
    """An engine whose database answers; ConfigurationError for a bad or unreachable URL."""
    from store.db import check_database, make_engine

    url = settings.effective_database_url
    try:
        engine = make_engine(url)
    except (ArgumentError, ValueError, ImportError) as exc:
        raise ConfigurationError(
            f"SIGNGATE_DATABASE_URL {redacted_url(url)!r} is not a usable database URL: {_first_line(exc)}"
        ) from exc
    try:
        check_database(engine)
    except (SQLAlchemyError, OSError) as exc:
        engine.dispose()
        raise ConfigurationError(f"database {redacted_url(url)} is unreachable: {_first_line(exc)}") from exc
    return engine


def schema_revisions(engine: Engine, url: str) -> tuple[set[str], set[str]]:
    """(the revisions the database is at, the revisions this code expects)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from store.db import alembic_config

    heads = set(ScriptDirectory.from_config(alembic_config(url)).get_heads())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
        conn.rollback()
    return current, heads


def schema_is_current(engine: Engine, url: str) -> bool:
    current, heads = schema_revisions(engine, url)
    return current == heads


def require_current_schema(engine: Engine, settings: Settings) -> None:
    if not schema_is_current(engine, settings.effective_database_url):
        raise ConfigurationError(
            f"database {redacted_url(settings.effective_database_url)} is not migrated: "
            "run `signgate migrate` first"
        )


def run_migrations(settings: Settings) -> None:
    from store.db import migrate

    url = settings.effective_database_url
    engine = open_database(settings)
    try:
        before, _ = schema_revisions(engine, url)
        try:
            migrate(url)
        except SQLAlchemyError as exc:
            raise ConfigurationError(f"migrating {redacted_url(url)} failed: {_first_line(exc)}") from exc
        after, _ = schema_revisions(engine, url)
    finally:
        engine.dispose()
    if before == after:
        log.info("database %s is up to date (revision %s)", redacted_url(url), _revisions(after))
    else:
        log.info(
            "database %s migrated from revision %s to %s",
            redacted_url(url),
            _revisions(before),
            _revisions(after),
        )


def _revisions(revisions: set[str]) -> str:
    return ", ".join(sorted(revisions)) or "none"


async def check_temporal(settings: Settings, *, within: float = TEMPORAL_CONNECT_TIMEOUT) -> None:
    """Connect once, so an unreachable cluster is one clear line instead of a Rust traceback."""
    from core.temporal import connect

    try:
        await asyncio.wait_for(connect(settings), timeout=within)
    except (TimeoutError, RuntimeError, OSError) as exc:
        detail = connect_failure(exc)
        raise ConfigurationError(
            f"Temporal is unreachable at {settings.temporal_address} "
            f"(namespace {settings.temporal_namespace}): {detail}"
        ) from exc


def connect_failure(exc: BaseException) -> str:
    """The Rust core's connect errors are one long line of nested debug output; say what matters."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = _first_line(exc)
    for marker, meaning in (
        ("ConnectionRefused", "connection refused"),
        ("dns error", "unknown host"),
    ):
        if marker in text:
            return meaning
    return text[:200]


def serve_api(
    settings: Settings, *, host: str, port: int, workers: int, forwarded_allow_ips: str | None
) -> None:
    """uvicorn over `api.main:create_app`, in `workers` processes; each reads its settings from the env.

    Each process gets a listening socket of its own on the same port (SO_REUSEPORT), so the
    kernel spreads connections over them; `uvicorn --workers` shares one socket, on which
    keep-alive clients often all land in one process, and loses TCP_NODELAY (every answer then
    waits for a delayed ACK). The sockets are bound here, so a taken port is one clear line.
    """
    require_master_key(settings)
    engine = open_database(settings)
    try:
        require_current_schema(engine, settings)
    finally:
        engine.dispose()
    sockets = listening_sockets(host, port, workers)
    port = sockets[0].getsockname()[1]
    log.info("serving the API on http://%s:%d with %d worker(s)", host, port, workers)
    options = ApiProcess(log_level=settings.log_level, forwarded_allow_ips=forwarded_allow_ips)
    if workers == 1:
        options.serve(sockets[0])
        return
    supervise_api(options, sockets)


def listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets on one address, with TCP_NODELAY inherited by every connection."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:
        raise ConfigurationError(f"cannot serve on {host!r}: {exc.strerror or exc}") from exc
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if count > 1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(address)
            sock.listen(2048)
            sock.set_inheritable(True)
            # Port 0 picks a port once; the other sockets join it.
            address = sock.getsockname()
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server on that port?)"
        ) from exc
    return sockets


@dataclass(frozen=True)
class ApiProcess:
    """What one API process needs besides its socket; picklable for spawned processes."""

    log_level: str
    forwarded_allow_ips: str | None

    def serve(self, sock: socket.socket) -> None:
        import uvicorn

        configure_logging(self.log_level)
        config = uvicorn.Config(
            "api.main:create_app",
            factory=True,
            loop="uvloop",
            http="httptools",
            log_config=logging_config(self.log_level),
            forwarded_allow_ips=self.forwarded_allow_ips,
            timeout_graceful_shutdown=10,
        )
        uvicorn.Server(config).run(sockets=[sock])


def supervise_api(options: ApiProcess, sockets: list[socket.socket]) -> None:
    """Run one spawned process per socket; stop them all on SIGINT/SIGTERM or when one dies."""
    import multiprocessing
    import signal
    import time

    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=options.serve, args=(sock,), name=f"signgate-api-{n}")
        for n, sock in enumerate(sockets, start=1)
    ]
    for process in processes:
        process.start()
    for sock in sockets:
        sock.close()
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    failed: multiprocessing.process.BaseProcess | None = None
    try:
        while not stopping and failed is None:
            for process in processes:
                process.join(timeout=0.2)
                if process.exitcode is not None:
                    failed = process
                    break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for process in processes:
            if process.exitcode is None:
                process.terminate()
        deadline = time.monotonic() + 15
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 0.1))
            if process.exitcode is None:
                process.kill()
                process.join()
    if failed is not None and not stopping:
        log.error("API process %s exited with status %s; stopped the others", failed.name, failed.exitcode)
        raise SystemExit(1)


def serve_worker(settings: Settings) -> None:
    """The same worker as `python worker.py`, after checking what it needs."""
    from worker import run_worker

    require_master_key(settings)
    engine = open_database(settings)
    try:
        require_current_schema(engine, settings)
    finally:
        engine.dispose()
    asyncio.run(check_temporal(settings))
    asyncio.run(run_worker(settings))
