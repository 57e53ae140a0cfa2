"""The physical limit: `cryptography` signing prehashed SHA-256 digests in this process (one
thread, then one thread per core: it releases the GIL), and `openssl speed` for the same
algorithms. Run while no server is busy."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import threading
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

ALGORITHMS = ("ec", "rsa")


def _signer(alg: str) -> Any:
    prehashed = Prehashed(hashes.SHA256())
    if alg == "ec":
        ec_key = ec.generate_private_key(ec.SECP256R1())
        return lambda d: ec_key.sign(d, ec.ECDSA(prehashed))
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return lambda d: rsa_key.sign(d, padding.PKCS1v15(), prehashed)


def in_process_rate(alg: str, threads: int, duration: float) -> float:
    """Signatures per second over `threads` threads, each with its own key object (a key shared
    between threads contends on OpenSSL's per-key state: RSA blinding, measured at half the rate)."""
    signers = [_signer(alg) for _ in range(threads)]
    digests = [secrets.token_bytes(32) for _ in range(256)]
    counts = [0] * threads
    start = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def loop(k: int) -> None:
        sign = signers[k]
        start.wait()
        n = 0
        i = k
        end = stop_at[0]
        while True:
            for _ in range(32):
                sign(digests[i & 255])
                i += 1
            n += 32
            if time.perf_counter() >= end:
                break
        counts[k] = n

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    start.wait()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - t0)


_OPENSSL_PATTERNS = {
    "rsa": re.compile(r"^rsa 2048 bits\s+\S+\s+\S+\s+([\d.]+)", re.M),
    "ec": re.compile(r"256 bits ecdsa \(nistp256\)\s+\S+\s+\S+\s+([\d.]+)", re.M),
}


def openssl_speed(seconds: int, multi: int = 1) -> dict[str, float]:
    args = ["openssl", "speed", "-seconds", str(seconds)]
    if multi > 1:
        args += ["-multi", str(multi)]
    done = subprocess.run([*args, "ecdsap256", "rsa2048"], capture_output=True, text=True, timeout=600)
    found: dict[str, float] = {}
    for alg, pattern in _OPENSSL_PATTERNS.items():
        match = pattern.search(done.stdout)
        if match:
            found[alg] = float(match.group(1))
    return found


def measure(quick: bool) -> dict[str, Any]:
    duration = 1.0 if quick else 3.0
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {"cores": cores, "cryptography_1": {}, "cryptography_all": {}}
    for alg in ALGORITHMS:
        result["cryptography_1"][alg] = in_process_rate(alg, 1, duration)
        result["cryptography_all"][alg] = in_process_rate(alg, cores, duration)
    seconds = 1 if quick else 3
    result["openssl_1"] = openssl_speed(seconds)
    result["openssl_all"] = openssl_speed(seconds, multi=cores) if cores > 1 else result["openssl_1"]
    return result
