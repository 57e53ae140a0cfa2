"""`signgate audit`: export the audit trail as JSON lines, one event per line in chain order."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, TextIO

import httpx
import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(no_args_is_help=True)

API_PREFIX = "/api/v1"
MAX_PAGE = 500


@app.callback()
def audit() -> None:
    """The tamper-evident audit trail."""


class ExportError(Exception):
    """Anything that stops an export, worded for the person running it."""


def api_base(url: str) -> str:
    """The /api/v1 base for SIGNGATE_URL, whether or not it already names the prefix."""
    url = url.rstrip("/")
    return url if url.endswith(API_PREFIX) else url + API_PREFIX


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error_description"), str):
        return f"{body['error_description']} ({body.get('error', response.status_code)})"
    return f"the server answered {response.status_code} {response.reason_phrase}"


def export_events(
    client: httpx.Client,
    out: TextIO,
    *,
    filters: dict[str, str] | None = None,
    page_size: int = MAX_PAGE,
) -> int:
    """Page through GET /audit-events and write each event as one JSON line; return the count.

    `client` carries the base URL (ending in /api/v1) and the token. Offsets are stable because
    the trail is append-only and ordered by seq: events written during the export land after
    the last page, and the export stops at the first short page.
    """
    written = 0
    while True:
        params: dict[str, Any] = {**(filters or {}), "limit": page_size, "offset": written}
        try:
            response = client.get("audit-events", params=params)
        except httpx.HTTPError as exc:
            raise ExportError(f"cannot reach {client.base_url}: {exc}") from exc
        if response.status_code != 200:
            raise ExportError(_error_text(response))
        try:
            items: list[dict[str, Any]] = response.json()["items"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ExportError(f"{client.base_url} did not answer like a signgate API") from exc
        for item in items:
            out.write(json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n")
        written += len(items)
        if len(items) < page_size:
            return written


@app.command("export")
def export(
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="File to write; standard output when omitted.")
    ] = None,
    since: Annotated[str | None, typer.Option(help="Only events at or after this RFC 3339 time.")] = None,
    entity_type: Annotated[str | None, typer.Option(help="Only events about this entity type.")] = None,
    entity_id: Annotated[str | None, typer.Option(help="Only events about this entity.")] = None,
    actor_id: Annotated[str | None, typer.Option(help="Only events by this identity.")] = None,
    action: Annotated[str | None, typer.Option(help="Only events with this action.")] = None,
    request_id: Annotated[str | None, typer.Option(help="Only the history of this signing request.")] = None,
    page_size: Annotated[int, typer.Option(min=1, max=MAX_PAGE, hidden=True)] = MAX_PAGE,
) -> None:
    """Export audit events as JSON lines (needs a token with the audit:read scope)."""
    console = Console(stderr=True)
    url = os.environ.get("SIGNGATE_URL")
    token = os.environ.get("SIGNGATE_TOKEN")
    if not url or not token:
        console.print("[red]error:[/] set SIGNGATE_URL and SIGNGATE_TOKEN", highlight=False)
        raise typer.Exit(2)
    wanted = {
        "since": since,
        "entityType": entity_type,
        "entityId": entity_id,
        "actorId": actor_id,
        "action": action,
        "requestId": request_id,
    }
    filters = {k: v for k, v in wanted.items() if v is not None}
    partial = out.with_name(out.name + ".partial") if out is not None else None
    try:
        with httpx.Client(
            base_url=api_base(url) + "/",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60.0,
        ) as client:
            if out is None or partial is None:
                count = export_events(client, sys.stdout, filters=filters, page_size=page_size)
            else:
                # Written aside and moved into place, so a failed export never looks complete.
                with partial.open("w", encoding="utf-8") as sink:
                    count = export_events(client, sink, filters=filters, page_size=page_size)
                partial.replace(out)
    except (ExportError, OSError) as exc:
        if partial is not None:
            partial.unlink(missing_ok=True)
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"exported {count} audit events" + (f" to {out}" if out else ""), highlight=False)
