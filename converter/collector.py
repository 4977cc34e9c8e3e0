"""Python's cyclic garbage collector during a conversion: what survives a full collection is not scanned again.

A conversion builds its objects once and keeps them to the end: the meta model, megatron-core's sharded state
dict, DCP's plan (for 48 layers x 128 experts about 1.5 million tracked objects). Each full collection scans all of
them again, and there is one each time they grow by a quarter: 15 of them took 8.2 s of a conversion of such a
model and found under 1,000 objects to free (RESULTS.md, session 16). Inside `survivors_frozen` every full
collection ends by freezing what survived it (gc.freeze: later collections skip it), so a full collection scans
each object once. Young garbage is collected as before, and reference counting frees frozen objects as ever: only
a cycle that dies after its freeze waits for the end of the block.
"""
from __future__ import annotations

import contextlib
import gc

from .stopping import exceptions_lost


@exceptions_lost
def _freeze_survivors(phase: str, info: dict) -> None:
    if phase == "stop" and info["generation"] == 2:  # the oldest generation: a full collection
        gc.freeze()


@contextlib.contextmanager
def survivors_frozen():
    """Freeze what survives each full collection inside the block; unfreeze everything at its end. gc.unfreeze is
    process-wide (the interpreter freezes a few hundred objects itself; a library caller may have frozen its own),
    so only the command line, which owns its process, uses this. Ranks it forks inside inherit the callback."""
    gc.callbacks.append(_freeze_survivors)
    try:
        yield
    finally:
        gc.callbacks.remove(_freeze_survivors)
        gc.unfreeze()
