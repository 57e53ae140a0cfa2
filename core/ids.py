"""Identifiers."""

from __future__ import annotations

import os
import time


def time_ordered_id() -> str:
    """A UUID version 7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    For rows written at a high rate (signing operations and their audit events): ids that grow
    with time are appended to the primary-key index instead of landing on a random page of it,
    so a commit writes a few pages instead of one per row.
    """
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant 10
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
