"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import ContextDep
from api.errors import error_response
from store.db import check_database

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(ctx: ContextDep) -> JSONResponse:
    problems = []
    try:
        await run_in_threadpool(check_database, ctx.engine)
    except Exception:
        problems.append("database unreachable")
    if ctx.temporal is None:
        problems.append("Temporal unreachable")
    else:
        try:
            await asyncio.wait_for(ctx.temporal.service_client.check_health(), timeout=3)
        except Exception:
            problems.append("Temporal unreachable")
    if problems:
        return error_response(503, "not_ready", "; ".join(problems))
    return JSONResponse({"status": "ready", "database": "ok", "temporal": "ok"})


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
