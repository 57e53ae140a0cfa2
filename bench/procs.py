"""Child processes of the benchmark, and what /proc says about them (RSS, CPU time).

Every server is started here on 127.0.0.1 in its own session and stopped by its own pid
(process group of a child we started), never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
BIN_DIR = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout}s")


@dataclass
class Child:
    """A server process we started, with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        return [self.pid, *descendants(self.pid)] if self.alive() else []

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start(
    name: str,
    args: list[str],
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Child:
    log_path = log_dir / f"{name}.log"
    log_file = open(log_path, "ab")
    proc = subprocess.Popen(
        args,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    log_file.close()
    return Child(name, proc, log_path)


# ---------------------------------------------------------------------- /proc readings


def descendants(pid: int) -> list[int]:
    """All descendants of pid (uvicorn --workers children, multiprocessing helpers)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2 :].split()
        children.setdefault(int(rest[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pids_by_comm(prefix: str) -> list[int]:
    """Processes whose command name starts with prefix (read only: e.g. the PostgreSQL server)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as f:
                if f.read().startswith(prefix):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    rest = stat[stat.rfind(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def total_rss_mb(pids: Iterable[int]) -> float:
    return sum(rss_mb(p) for p in pids)


def system_cpu() -> tuple[float, float]:
    """(busy seconds, total seconds) summed over every core since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


@dataclass
class CpuWindow:
    """CPU time per group of processes between `begin` and `end`, in cores (seconds per second)."""

    groups: Mapping[str, Iterable[int]]
    _start: dict[str, dict[int, float]] = field(default_factory=dict)
    _t0: float = 0.0
    _sys0: tuple[float, float] = (0.0, 0.0)
    cores: dict[str, float] = field(default_factory=dict)

    def begin(self) -> None:
        self._start = {g: {p: cpu_seconds(p) for p in pids} for g, pids in self.groups.items()}
        self._t0 = time.monotonic()
        self._sys0 = system_cpu()

    def end(self, extra: Mapping[str, float] | None = None) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        for group, start in self._start.items():
            used = sum(max(cpu_seconds(p) - s, 0.0) for p, s in start.items())
            self.cores[group] = used / elapsed
        for group, seconds in (extra or {}).items():
            self.cores[group] = seconds / elapsed
        busy1, total1 = system_cpu()
        busy = busy1 - self._sys0[0]
        total = total1 - self._sys0[1]
        ncpu = os.cpu_count() or 1
        ours = sum(self.cores.values())
        self.cores["machine busy"] = busy / max(total, 1e-6) * ncpu
        # Whatever else runs on this shared machine (other people's tests, say) in the same window.
        self.cores["others"] = max(self.cores["machine busy"] - ours, 0.0)
        return dict(self.cores)

    def add(self, group: str, cores: float) -> None:
        """Cores measured elsewhere (the generator processes report their own CPU time)."""
        self.cores[group] = cores
        if "others" in self.cores:
            self.cores["others"] = max(self.cores["others"] - cores, 0.0)


def format_cores(cores: Mapping[str, float]) -> str:
    parts = [f"{k} {v:.2f}" for k, v in cores.items() if v >= 0.01 and k not in ("machine busy", "others")]
    if "others" in cores:
        parts.append(f"not ours {cores['others']:.2f}")
    busy = cores.get("machine busy")
    if busy is not None:
        parts.append(f"(busy {busy:.2f}/{os.cpu_count()})")
    return ", ".join(parts)
