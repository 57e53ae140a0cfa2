"""What the long-running processes (API, worker) do once they have started."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Move what start-up allocated (the modules of SQLAlchemy, pydantic, temporalio, ... and
    their objects) out of the garbage collector's reach: they live as long as the process. A
    full collection then walks only what requests left behind, instead of taking ~90 ms on
    this machine that land on whichever call or approval is in flight."""
    gc.collect()
    gc.freeze()
