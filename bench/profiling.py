"""Optional sampling profiles of the servers during a measured window (`--profile DIR`).

Uses py-spy when it is installed in the venv (`pip install py-spy`; not a signgate dependency).
Profiles are written as collapsed stacks, and `summarize` turns one into the share of samples
spent under each function, which is what the report quotes.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

from bench.procs import BIN_DIR


def available() -> bool:
    return (BIN_DIR / "py-spy").exists()


def start(
    pid: int, out: Path, seconds: float, *, subprocesses: bool = True
) -> subprocess.Popen[bytes] | None:
    if not available():
        return None
    args = [str(BIN_DIR / "py-spy"), "record", "--pid", str(pid), "--duration", str(max(int(seconds), 1)),
            "--rate", "250", "--gil", "--format", "raw", "--output", str(out), "--nonblocking"]  # fmt: skip
    if subprocesses:
        args.append("--subprocesses")
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(path: Path, top: int = 40) -> list[tuple[float, str]]:
    """(share of samples, frame) for the frames most often on the stack (inclusive)."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        for frame in set(stack.split(";")):
            inclusive[frame] += count
    if not total:
        return []
    return [(n / total, frame) for frame, n in inclusive.most_common(top)]
