"""Identifiers."""

from __future__ import annotations

import os
import threading
import time

_RANDOM_BYTES = 10  # the random part of a time-ordered id (74 bits used)
_POOL_IDS = 256  # ids' worth of random bytes read from the OS at once
_VERSION_VARIANT = (0x7 << 76) | (0x2 << 62)
_KEEP = ~((0xF << 76) | (0x3 << 62))


class _Pool(threading.local):
    """Random bytes read from the OS a few kilobytes at a time, one pool per thread (a getrandom
    call per id cost more than the rest of the id). A forked child starts with a new pool."""

    data = b""
    position = 0


_pool = _Pool()


def _reset_pool() -> None:
    global _pool
    _pool = _Pool()


os.register_at_fork(after_in_child=_reset_pool)


def time_ordered_id() -> str:
    """A UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    For rows written at a high rate (signing operations and their audit events): ids that grow
    with time are appended to the primary-key index instead of landing on a random page of it,
    so a commit writes a few pages instead of one per row.
    """
    pool = _pool
    position = pool.position
    if position + _RANDOM_BYTES > len(pool.data):
        pool.data, position = os.urandom(_RANDOM_BYTES * _POOL_IDS), 0
    pool.position = position + _RANDOM_BYTES
    random = int.from_bytes(pool.data[position : position + _RANDOM_BYTES], "big")
    value = ((time.time_ns() // 1_000_000) << 80 | random) & _KEEP | _VERSION_VARIANT
    text = value.to_bytes(16, "big").hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
