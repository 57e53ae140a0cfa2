"""The `signgate` command line.

Server-side commands live here; the CI client (`signgate sign`, `requests`, `verify`) registers
its own commands on `app` from `cli/client.py`, imported at the bottom of this module.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from core.config import ConfigurationError

CONFIGURATION_EXIT_CODE = 2

app = typer.Typer(
    name="signgate",
    help="Code signing with server-held keys, approval policies and an audit trail.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
admin_app = typer.Typer(help="Administration of a signgate installation.", no_args_is_help=True)
app.add_typer(admin_app, name="admin")


@contextmanager
def configuration_errors() -> Iterator[None]:
    """Bad configuration ends the command with one line on stderr and status 2, no traceback."""
    try:
        yield
    except ConfigurationError as exc:
        typer.echo(f"signgate: error: {exc}", err=True)
        raise typer.Exit(CONFIGURATION_EXIT_CODE) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def dev(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="State directory (database, Temporal db, keys, admin token). [default: ./.signgate]"
        ),
    ] = None,
    api_port: Annotated[int, typer.Option(help="Port of the API.")] = 8000,
    temporal_port: Annotated[int, typer.Option(help="gRPC port of the Temporal dev server.")] = 7233,
    ui_port: Annotated[int, typer.Option(help="Port of the Temporal web UI.")] = 8233,
    headless: Annotated[bool, typer.Option(help="Run Temporal without its web UI.")] = False,
) -> None:
    """Run Temporal, the worker and the API on 127.0.0.1 for development; Ctrl-C stops it all."""
    from cli.dev import DevOptions, run_dev

    options = DevOptions(
        data_dir=data_dir,
        api_port=api_port,
        temporal_port=temporal_port,
        ui_port=ui_port,
        headless=headless,
    )
    with configuration_errors():
        status = run_dev(options)
    raise typer.Exit(status)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Address to bind [default: SIGNGATE_API_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind [default: SIGNGATE_API_PORT]")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Number of uvicorn worker processes.")] = 1,
    forwarded_allow_ips: Annotated[
        str | None,
        typer.Option(help="Proxies whose X-Forwarded-For is trusted (comma-separated, or '*')."),
    ] = None,
) -> None:
    """Serve the API (production): settings from SIGNGATE_* variables."""
    from cli.server import configure_logging, load_settings, serve_api

    with configuration_errors():
        settings = load_settings()
        configure_logging(settings.log_level)
        serve_api(
            settings,
            host=host or settings.api_host,
            port=port if port is not None else settings.api_port,
            workers=workers,
            forwarded_allow_ips=forwarded_allow_ips,
        )


@app.command()
def worker() -> None:
    """Run the Temporal worker (production); the same as `python worker.py`."""
    from cli.server import configure_logging, load_settings, serve_worker

    with configuration_errors():
        settings = load_settings()
        configure_logging(settings.log_level)
        serve_worker(settings)


@app.command()
def migrate() -> None:
    """Apply the database migrations (idempotent)."""
    from cli.server import configure_logging, load_settings, run_migrations

    with configuration_errors():
        settings = load_settings()
        configure_logging(settings.log_level)
        run_migrations(settings)


@app.command()
def keygen() -> None:
    """Print a new random master key (32 bytes, base64) for SIGNGATE_MASTER_KEY."""
    from core.config import new_master_key_text

    typer.echo(new_master_key_text())


@admin_app.command("bootstrap")
def admin_bootstrap(
    name: Annotated[str, typer.Option(help="Name of the admin identity.")] = "admin",
) -> None:
    """Create the first admin identity and print its token once; refuses if it exists."""
    from cli.server import (
        configure_logging,
        load_settings,
        open_database,
        require_current_schema,
    )
    from store.identities import bootstrap_admin

    with configuration_errors():
        settings = load_settings()
        configure_logging(settings.log_level)
        engine = open_database(settings)
        try:
            require_current_schema(engine, settings)
            token = bootstrap_admin(engine, name=name)
        finally:
            engine.dispose()
    if token is None:
        typer.echo(f"signgate: error: an identity named {name!r} exists already; no token issued", err=True)
        raise typer.Exit(1)
    typer.echo(f"Admin identity {name!r} created. Its token, shown only this once:", err=True)
    typer.echo(token)


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        _exit(exc.code)
    _exit(0)


def _exit(code: str | int | None) -> None:
    """Leave without interpreter finalisation once Temporal's Rust core is loaded.

    Its runtime threads can crash a finalising interpreter (seen as SIGSEGV after a refused
    connect, and as aborts after a worker stop, FACTS.md); every part has been shut down
    explicitly by now, so only buffered output remains to be flushed.
    """
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    status = 0 if code is None else code
    if "temporalio.bridge.temporal_sdk_bridge" not in sys.modules:
        sys.exit(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _register_client_commands() -> None:
    """cli/client.py adds the CI client's commands to `app` when it is imported."""
    import importlib

    try:
        importlib.import_module("cli.client")
    except ModuleNotFoundError as exc:
        if exc.name != "cli.client":
            raise


_register_client_commands()


def _register_audit_commands() -> None:
    """`signgate audit export`: the audit trail as JSON lines."""
    from cli import audit

    app.add_typer(audit.app, name="audit", help="Export the tamper-evident audit trail.")


_register_audit_commands()


if __name__ == "__main__":
    # `python -m cli.main`: run the imported module's app, which carries the client's commands.
    from cli.main import main as _main

    _main()
