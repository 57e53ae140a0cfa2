"""`signgate api --workers N`: one acceptor hands connections to the API processes in turn."""

from __future__ import annotations

import base64
import http.client
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from cli.server import Acceptor, listening_socket

SIGNGATE = str(Path(sys.executable).parent / "signgate")
REPO = Path(__file__).resolve().parent.parent


def _received(channel: socket.socket) -> int:
    """Connections handed over `channel` so far (each closed again here), every one of them
    with TCP_NODELAY kept from the listener (answers must not wait for a delayed ACK)."""
    channel.setblocking(False)
    count = 0
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(channel, 16, 16)
        except BlockingIOError:
            return count
        for fd in fds:
            with socket.socket(fileno=fd) as conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            count += 1


def test_the_acceptor_hands_connections_round_robin_and_skips_a_process_that_is_gone() -> None:
    listener = listening_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
    acceptor = Acceptor(listener, [ours for ours, _ in pairs])
    acceptor.start()
    clients: list[socket.socket] = []
    try:
        for _ in range(9):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        deadline = time.monotonic() + 5
        while sum(acceptor.handed) < 9 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert acceptor.handed == [3, 3, 3]
        assert [_received(theirs) for _, theirs in pairs] == [3, 3, 3]
        pairs[1][1].close()  # the second process is gone
        for _ in range(4):
            clients.append(socket.create_connection(("127.0.0.1", port)))
        deadline = time.monotonic() + 5
        while sum(acceptor.handed) < 13 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert acceptor.handed == [5, 3, 5]
        assert [_received(pairs[0][1]), _received(pairs[2][1])] == [2, 2]
        # Stopping wakes the accepting thread at once, and nothing more is accepted.
        started = time.monotonic()
        acceptor.stop_accepting()
        assert acceptor._thread is not None and not acceptor._thread.is_alive()
        assert time.monotonic() - started < 1
        try:
            refused = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError:
            pass
        else:
            refused.close()
            raise AssertionError("a connection was accepted after stop_accepting")
    finally:
        for client in clients:
            client.close()
        acceptor.stop()
        for _, theirs in pairs:
            theirs.close()


def _connections_on(port: int, pid: int) -> int:
    """Established TCP connections to `port` that process `pid` holds."""
    inodes: set[str] = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as table:
            for line in list(table)[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01":
                    inodes.add(fields[9])
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if parent == pid:
                found.append(int(entry))
    return found


def test_two_api_processes_share_keep_alive_clients_evenly_and_stop_on_sigterm(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SIGNGATE_DATABASE_URL": f"sqlite:///{tmp_path / 'signgate.db'}",
        "SIGNGATE_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "SIGNGATE_DATA_DIR": str(tmp_path),
        "SIGNGATE_TEMPORAL_ADDRESS": "127.0.0.1:1",  # unused by /healthz
        "SIGNGATE_LOG_LEVEL": "WARNING",
    }
    subprocess.run([SIGNGATE, "migrate"], env=env, check=True, capture_output=True, cwd=REPO)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = subprocess.Popen(
        [SIGNGATE, "api", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    clients: list[http.client.HTTPConnection] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                first = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                first.request("GET", "/healthz")
                answer = first.getresponse()
                answer.read()
                break
            except OSError:
                first.close()
                assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
                assert time.monotonic() < deadline, "the API did not start"
                time.sleep(0.2)
        assert answer.status == 200
        clients.append(first)
        for _ in range(7):
            client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            client.request("GET", "/healthz")
            response = client.getresponse()
            response.read()
            assert response.status == 200
            clients.append(client)
        processes = _children(server.pid)
        api_processes = [pid for pid in processes if _connections_on(port, pid) > 0]
        assert sorted(_connections_on(port, pid) for pid in api_processes) == [4, 4]
        # Every connection keeps answering on the process it was handed to.
        for client in clients:
            client.request("GET", "/healthz")
            response = client.getresponse()
            response.read()
            assert response.status == 200
    finally:
        for client in clients:
            client.close()
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0
