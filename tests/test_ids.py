"""Time-ordered ids (`core.ids`): valid UUIDv7s, unique, in time order, never shared with a
forked child or another thread."""

from __future__ import annotations

import os
import threading
import time
import uuid

from core.ids import time_ordered_id


def test_ids_are_uuid7_unique_and_grow_with_time() -> None:
    first = [time_ordered_id() for _ in range(3000)]  # more than one pool of random bytes
    time.sleep(0.002)
    later = time_ordered_id()
    assert len(set(first)) == len(first)
    for value in (*first[:5], later):
        parsed = uuid.UUID(value)
        assert (parsed.version, parsed.variant, str(parsed)) == (7, uuid.RFC_4122, value)
    # The first 48 bits are Unix milliseconds: now, and later for a later id.
    millis = [int(value.replace("-", "")[:12], 16) for value in (first[0], later)]
    assert abs(millis[0] - time.time_ns() // 1_000_000) < 5_000
    assert millis[1] > millis[0] and later > max(first)


def test_threads_and_a_forked_child_draw_their_own_random_bytes() -> None:
    time_ordered_id()  # this thread's pool is in use
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, "".join(time_ordered_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    child = {text[k : k + 36] for k in range(0, len(text), 36)}
    threads: list[str] = []
    workers = [
        threading.Thread(target=lambda: threads.extend(time_ordered_id() for _ in range(4))) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    mine = {time_ordered_id() for _ in range(4)}
    # Random parts (past the 48 bits of time) never repeat across the child, threads and here.
    randoms = [value.replace("-", "")[12:] for value in (*child, *threads, *mine)]
    assert len(child) == 4 and len(threads) == 16 and len(set(randoms)) == len(randoms) == 24
