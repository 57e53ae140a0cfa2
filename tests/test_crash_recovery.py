"""Kill the worker and the Temporal server mid-request: once they restart, nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client

from api.main import create_app
from core.config import Settings
from core.temporal import DATA_CONVERTER, SEARCH_ATTRIBUTE_KEYS
from tests.conftest import CLIENT_IP, DEV_SERVER_ARGS, TEMPORAL_BIN, Api, assert_eventually

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """A Temporal server on a db file and a worker process, each killable with SIGKILL."""

    def __init__(self, tmp: Path, settings: Settings) -> None:
        self.tmp = tmp
        self.port = _free_port()
        self.settings = settings.model_copy(
            update={
                "temporal_address": f"127.0.0.1:{self.port}",
                "task_queue": f"crash-{uuid.uuid4().hex[:8]}",
                "update_rpc_timeout_seconds": 2.0,
            }
        )
        self.temporal: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None

    async def start_temporal(self) -> None:
        args = [
            str(TEMPORAL_BIN),
            "server",
            "start-dev",
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--headless",
            "--db-filename",
            str(self.tmp / "temporal.db"),
            "--log-level",
            "error",
            *DEV_SERVER_ARGS,
        ]
        for key in SEARCH_ATTRIBUTE_KEYS:
            args += ["--search-attribute", f"{key.name}=Keyword"]
        self.temporal = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        async def up() -> bool:
            try:
                client = await Client.connect(self.settings.temporal_address)
                await client.service_client.check_health()
                return True
            except Exception:
                return False

        await assert_eventually(up, timeout=30, interval=0.2)

    def start_worker(self) -> None:
        env = {
            **os.environ,
            "SIGNGATE_DATABASE_URL": self.settings.effective_database_url,
            "SIGNGATE_MASTER_KEY": self.settings.master_key or "",
            "SIGNGATE_TEMPORAL_ADDRESS": self.settings.temporal_address,
            "SIGNGATE_TASK_QUEUE": self.settings.task_queue,
        }
        self.worker = subprocess.Popen(
            [sys.executable, str(ROOT / "worker.py")],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @staticmethod
    def kill(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        self.kill(self.worker)
        self.kill(self.temporal)


@pytest.fixture
async def stack(tmp_path: Path, settings: Settings) -> AsyncIterator[Stack]:
    s = Stack(tmp_path, settings)
    await s.start_temporal()
    s.start_worker()
    try:
        yield s
    finally:
        s.stop()


async def test_worker_and_server_killed_mid_request(stack: Stack, api: Api, engine) -> None:
    client = await Client.connect(stack.settings.temporal_address, data_converter=DATA_CONVERTER)
    app = create_app(stack.settings, engine=engine, temporal=client)
    transport = httpx.ASGITransport(app=app, client=(CLIENT_IP, 40001))
    async with httpx.AsyncClient(transport=transport, base_url="http://signgate.test") as http:
        crash_api = Api(http, api.admin)
        requester = await api.identity()
        first, second = await api.identity(), await api.identity()
        policy = await api.policy([([first], 1), ([second], 1)])
        signer = await api.signer(members=[requester], policy_id=policy["id"])

        req = await crash_api.open_request(requester, signer["id"])
        r = await crash_api.call(
            "POST", f"/pki/signing-requests/{req['id']}/approve", first, json={}, expect=200
        )
        assert r.json()["currentStep"] == 1

        # No worker: the approve call cannot be confirmed and says so instead of hanging.
        stack.kill(stack.worker)
        r = await crash_api.call("POST", f"/pki/signing-requests/{req['id']}/approve", second, json={})
        assert r.status_code == 503
        assert r.json()["error"] == "unavailable"

        # The Temporal server dies too, then both come back on the same state.
        stack.kill(stack.temporal)
        await stack.start_temporal()
        stack.start_worker()

        async def decided() -> bool:
            r = await crash_api.call("POST", f"/pki/signing-requests/{req['id']}/approve", second, json={})
            # 200: applied now; 403/409: the earlier, unconfirmed call was applied after all.
            return r.status_code in (200, 403, 409)

        await assert_eventually(decided, timeout=60, interval=0.5)
        result = (
            await crash_api.call(
                "GET", f"/pki/signing-requests/{req['id']}/result?waitSeconds=30", requester, expect=200
            )
        ).json()
        assert result["status"] == "approved"
        assert result["grantId"]
        assert [s["status"] for s in result["steps"]] == ["completed", "completed"]
        # The first approval, acknowledged before the crash, is still there.
        assert result["steps"][0]["approvals"][0]["approverId"] == first.id
        grant = (
            await crash_api.call("GET", f"/pki/grants/{result['grantId']}", requester, expect=200)
        ).json()
        assert grant["status"] == "active"
        assert grant["requestId"] == req["id"]
    await asyncio.sleep(0)


async def test_readyz_reports_unreachable_temporal(settings: Settings, engine) -> None:
    dead = settings.model_copy(update={"temporal_address": f"127.0.0.1:{_free_port()}"})
    from core.temporal import connect

    app = create_app(dead, engine=engine, temporal=await connect(dead, lazy=True))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://signgate.test") as http:
        r = await http.get("/readyz")
    assert r.status_code == 503
    assert r.json()["error"] == "not_ready"
    assert "Temporal" in r.json()["error_description"]
