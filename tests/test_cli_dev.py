"""The `signgate` command as a user runs it: the real `signgate dev` stack in a subprocess, and
the one-line refusals of a badly configured production process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client, WorkflowExecutionStatus

from core.temporal import SEARCH_ATTRIBUTE_KEYS
from tests.conftest import create_pg_database, db_backend

SIGNGATE = Path(sys.executable).parent / "signgate"
START_TIMEOUT = 45.0
STOP_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNGATE_")}
    env.update(extra)
    return env


def temporal_pids(data_dir: Path) -> set[int]:
    """Temporal servers whose db file is under data_dir, read from /proc (no psutil here)."""
    marker = str(data_dir / "temporal.db").encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"start-dev" in cmdline and marker in cmdline:
            pids.add(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class DevStack:
    data_dir: Path
    api_port: int
    temporal_port: int
    env: dict[str, str]
    runs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    seen_temporal: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def output(self) -> Path:
        return self.data_dir.parent / f"dev-{len(self.runs)}.out"

    async def start(self) -> subprocess.Popen[bytes]:
        with open(self.output, "wb") as out:
            proc = subprocess.Popen(
                [
                    str(SIGNGATE),
                    "dev",
                    "--data-dir",
                    str(self.data_dir),
                    "--api-port",
                    str(self.api_port),
                    "--temporal-port",
                    str(self.temporal_port),
                    "--headless",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        self.runs.append(proc)
        await self.wait_ready(proc)
        self.seen_temporal |= temporal_pids(self.data_dir)
        return proc

    def log(self, index: int = -1) -> str:
        return (self.data_dir.parent / f"dev-{len(self.runs) + index}.out").read_text(errors="replace")

    async def wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"signgate dev exited with {proc.returncode}:\n{self.log()}")
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    pytest.fail(f"/readyz not 200 within {START_TIMEOUT} s:\n{self.log()}")
                await asyncio.sleep(0.1)

    async def terminate(self, proc: subprocess.Popen[bytes]) -> int:
        proc.send_signal(signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + STOP_TIMEOUT
        while proc.poll() is None:
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"signgate dev still running {STOP_TIMEOUT} s after SIGTERM:\n{self.log()}")
            await asyncio.sleep(0.05)
        return proc.returncode

    def kill_leftovers(self) -> None:
        """Clean up after a failed test: only the processes this test started."""
        for proc in self.runs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in self.seen_temporal | temporal_pids(self.data_dir):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def dev_stack(tmp_path: Path) -> AsyncIterator[DevStack]:
    env = clean_env()
    drop = None
    if db_backend() == "postgresql":
        url, drop = create_pg_database()
        env["SIGNGATE_DATABASE_URL"] = url
    stack = DevStack(tmp_path / "state", free_port(), free_port(), env)
    try:
        yield stack
    finally:
        stack.kill_leftovers()
        if drop is not None:
            drop()


async def assert_stopped_cleanly(stack: DevStack, proc: subprocess.Popen[bytes]) -> None:
    servers = temporal_pids(stack.data_dir)
    assert len(servers) == 1, servers
    assert await stack.terminate(proc) == 0, stack.log()
    assert not group_alive(proc.pid)
    deadline = asyncio.get_running_loop().time() + 5
    while any(alive(pid) for pid in servers):
        assert asyncio.get_running_loop().time() < deadline, f"Temporal left running: {servers}"
        await asyncio.sleep(0.05)
    assert temporal_pids(stack.data_dir) == set()
    assert "Temporal dev server stopped" in stack.log()


async def test_dev_stack_runs_stops_cleanly_and_restarts_with_its_state(dev_stack: DevStack) -> None:
    proc = await dev_stack.start()
    token_file = dev_stack.data_dir / "admin.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((dev_stack.data_dir / "master.key").stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    first_log = dev_stack.log()
    assert f"{dev_stack.url}/docs" in first_log
    assert str(token_file) in first_log
    assert token not in first_log

    headers = {"Authorization": f"Bearer {token}"}
    name = f"persisted-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=dev_stack.url, headers=headers, timeout=10) as http:
        me = await http.get("/api/v1/me")
        assert me.status_code == 200, me.text
        assert "admin" in me.json()["scopes"]
        created = await http.post("/api/v1/identities", json={"name": name, "kind": "machine"})
        assert created.status_code == 201, created.text
        identity_id = created.json()["id"]
        assert (await http.get("/docs")).status_code == 200

    temporal = await Client.connect(f"127.0.0.1:{dev_stack.temporal_port}")
    registered = await temporal.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace="default")
    )
    for key in SEARCH_ATTRIBUTE_KEYS:
        assert key.name in registered.custom_attributes
    # A workflow no worker serves stays running: it must be there after the restart.
    parked_id = f"dev-restart-{uuid.uuid4().hex[:8]}"
    await temporal.start_workflow("ParkedForRestartCheck", id=parked_id, task_queue=f"parked-{parked_id}")

    await assert_stopped_cleanly(dev_stack, proc)

    proc = await dev_stack.start()
    assert token_file.read_text().strip() == token
    assert "(new)" not in dev_stack.log()
    async with httpx.AsyncClient(base_url=dev_stack.url, headers=headers, timeout=10) as http:
        assert (await http.get("/api/v1/me")).status_code == 200
        again = await http.get(f"/api/v1/identities/{identity_id}")
        assert again.status_code == 200, again.text
        assert again.json()["name"] == name
    temporal = await Client.connect(f"127.0.0.1:{dev_stack.temporal_port}")
    description = await temporal.get_workflow_handle(parked_id).describe()
    assert description.status == WorkflowExecutionStatus.RUNNING

    await assert_stopped_cleanly(dev_stack, proc)


def run_signgate(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SIGNGATE), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("signgate: error: ")
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in lines[0]


@pytest.fixture
def migrated_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    key = run_signgate("keygen", env=clean_env()).stdout.strip()
    env = clean_env(SIGNGATE_DATA_DIR=str(tmp_path / "prod"), SIGNGATE_MASTER_KEY=key)
    migrated = run_signgate("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    yield env


def test_api_without_master_key_refuses_in_one_line(tmp_path: Path) -> None:
    result = run_signgate("api", env=clean_env(SIGNGATE_DATA_DIR=str(tmp_path)))
    assert_one_line_refusal(result, "SIGNGATE_MASTER_KEY")


def test_api_with_unreachable_database_refuses_in_one_line(migrated_env: dict[str, str]) -> None:
    env = {**migrated_env, "SIGNGATE_DATABASE_URL": f"postgresql://signgate:s3cret@127.0.0.1:{free_port()}/x"}
    result = run_signgate("api", env=env)
    assert_one_line_refusal(result, "unreachable")
    assert "s3cret" not in result.stderr


def test_api_with_invalid_database_url_refuses_in_one_line(migrated_env: dict[str, str]) -> None:
    result = run_signgate("api", env={**migrated_env, "SIGNGATE_DATABASE_URL": "not a url"})
    assert_one_line_refusal(result, "SIGNGATE_DATABASE_URL")


def test_worker_without_temporal_refuses_in_one_line(migrated_env: dict[str, str]) -> None:
    env = {**migrated_env, "SIGNGATE_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"}
    result = run_signgate("worker", env=env)
    assert_one_line_refusal(result, "Temporal is unreachable")


def test_dev_with_its_api_port_taken_refuses_in_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_signgate(
            "dev",
            "--data-dir",
            str(tmp_path / "state"),
            "--api-port",
            str(port),
            "--temporal-port",
            str(free_port()),
            "--headless",
            env=clean_env(SIGNGATE_LOG_LEVEL="WARNING"),
        )
    assert_one_line_refusal(result, "--api-port")
    assert temporal_pids(tmp_path / "state") == set()


def test_keygen_and_admin_bootstrap_once(migrated_env: dict[str, str]) -> None:
    from core.config import decode_master_key

    assert len(decode_master_key(run_signgate("keygen", env=clean_env()).stdout.strip())) == 32

    first = run_signgate("admin", "bootstrap", env=migrated_env)
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip()
    assert token.startswith("sgt_")
    assert token not in first.stderr

    second = run_signgate("admin", "bootstrap", env=migrated_env)
    assert second.returncode == 1
    assert second.stdout == ""
    assert "exists" in second.stderr
