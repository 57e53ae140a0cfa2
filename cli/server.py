"""The production processes (`signgate api`, `worker`, `migrate`) and the checks they share.

Every check here turns a bad configuration into a `ConfigurationError` with one sentence a
person can act on; the command line prints that sentence and exits with status 2.
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import socket
import threading
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

    With several processes, this one accepts every connection and hands it to the processes in
    turn (`Acceptor`), so keep-alive clients are spread evenly: on one shared socket
    (`uvicorn --workers`) they often all land in one process, and that socket loses TCP_NODELAY
    (every answer then waits for a delayed ACK); with a socket per process (SO_REUSEPORT) the
    kernel's hash of the addresses decides, and 8 clients split 4/4 only about one time in
    four. The socket is bound here, so a taken port is one clear line.
    """
    require_master_key(settings)
    engine = open_database(settings)
    try:
        require_current_schema(engine, settings)
    finally:
        engine.dispose()
    listener = listening_socket(host, port)
    port = listener.getsockname()[1]
    log.info("serving the API on http://%s:%d with %d worker(s)", host, port, workers)
    options = ApiProcess(log_level=settings.log_level, forwarded_allow_ips=forwarded_allow_ips)
    if workers == 1:
        options.serve(listener)
        return
    supervise_api(options, listener, workers)


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening socket, with TCP_NODELAY inherited by every connection it accepts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:
        raise ConfigurationError(f"cannot serve on {host!r}: {exc.strerror or exc}") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server on that port?)"
        ) from exc
    return sock


class Acceptor:
    """Accepts connections on the listening socket and hands each to the next API process, in
    turn, over a Unix socket of that process's own (SCM_RIGHTS). A process that is gone is
    skipped; with none left a connection is closed."""

    def __init__(self, listener: socket.socket, channels: list[socket.socket]) -> None:
        self.listener = listener
        self.channels = channels
        self.handed = [0] * len(channels)
        self._next = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="signgate-acceptor", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # the listener was closed: stopping
            with conn:
                self.hand_over(conn)

    def hand_over(self, conn: socket.socket) -> bool:
        for _ in range(len(self.channels)):
            index = self._next
            self._next = (index + 1) % len(self.channels)
            try:
                socket.send_fds(self.channels[index], [b"c"], [conn.fileno()])
            except OSError:
                continue
            self.handed[index] += 1
            return True
        return False

    def stop_accepting(self) -> None:
        """No new connections: the accepting thread is woken (a close alone leaves it blocked
        in accept) and ends; connections already handed over stay with their processes."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stop(self) -> None:
        self.stop_accepting()
        for channel in self.channels:
            channel.close()


@dataclass(frozen=True)
class ApiProcess:
    """What one API process needs besides its socket; picklable for spawned processes."""

    log_level: str
    forwarded_allow_ips: str | None

    def serve(self, sock: socket.socket, *, handed: bool = False) -> None:
        """Serve the listening socket `sock`, or (`handed`) the connections an `Acceptor`
        sends over the Unix socket `sock`."""
        import uvicorn

        from api.http import SigngateHttpProtocol

        configure_logging(self.log_level)
        config = uvicorn.Config(
            "api.main:create_app",
            factory=True,
            loop="uvloop",
            http=SigngateHttpProtocol,
            log_config=logging_config(self.log_level),
            forwarded_allow_ips=self.forwarded_allow_ips,
            timeout_graceful_shutdown=10,
        )
        if handed:
            handed_connections_server(config, sock).run()
        else:
            uvicorn.Server(config).run(sockets=[sock])


def _handed_server_class() -> type[Any]:
    import uvicorn

    class Handed(uvicorn.Server):
        """uvicorn serving connections received over a Unix socket instead of accepting them."""

        def __init__(self, config: Any, channel: socket.socket) -> None:
            super().__init__(config)
            self.channel = channel

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=[])
            loop = asyncio.get_running_loop()
            config = self.config

            def create_protocol() -> asyncio.Protocol:
                return config.http_protocol_class(  # type: ignore[call-arg]
                    config=config, server_state=self.server_state, app_state=self.lifespan.state
                )

            self.channel.setblocking(False)
            loop.add_reader(self.channel.fileno(), self._receive, loop, create_protocol)

        def _receive(self, loop: asyncio.AbstractEventLoop, create_protocol: Any) -> None:
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(self.channel, 16, 16)
                except BlockingIOError:
                    return
                except OSError:
                    data, fds = b"", []
                if not data and not fds:  # the acceptor is gone: stop like on SIGTERM
                    loop.remove_reader(self.channel.fileno())
                    self.should_exit = True
                    return
                for fd in fds:
                    conn = socket.socket(fileno=fd)
                    conn.setblocking(False)
                    loop.create_task(loop.connect_accepted_socket(create_protocol, conn))

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                asyncio.get_running_loop().remove_reader(self.channel.fileno())
            except (ValueError, OSError):
                pass
            await super().shutdown(sockets=sockets)

    return Handed


def handed_connections_server(config: Any, channel: socket.socket) -> Any:
    """The uvicorn server of an API process fed by an `Acceptor` (uvicorn imported lazily)."""
    return _handed_server_class()(config, channel)


def supervise_api(options: ApiProcess, listener: socket.socket, workers: int) -> None:
    """Run `workers` spawned processes fed by an `Acceptor`; stop them all on SIGINT/SIGTERM or
    when one dies."""
    import multiprocessing
    import signal
    import time

    context = multiprocessing.get_context("spawn")
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(workers)]
    processes = [
        context.Process(
            target=options.serve, args=(theirs,), kwargs={"handed": True}, name=f"signgate-api-{n}"
        )
        for n, (_, theirs) in enumerate(pairs, start=1)
    ]
    for process in processes:
        process.start()
    for _, theirs in pairs:
        theirs.close()
    acceptor = Acceptor(listener, [ours for ours, _ in pairs])
    acceptor.start()
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
        acceptor.stop_accepting()  # the processes finish the connections they have
        for process in processes:
            if process.exitcode is None:
                process.terminate()
        deadline = time.monotonic() + 15
        for process in processes:
            process.join(timeout=max(deadline - time.monotonic(), 0.1))
            if process.exitcode is None:
                process.kill()
                process.join()
        acceptor.stop()
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
