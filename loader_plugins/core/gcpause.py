"""Pausing Python's cyclic garbage collector around work that makes many objects and no cycles."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def paused_gc():
    """The cyclic collector off for the block (as it was after it). Parsing a 91,000-tensor
    checkpoint, or placing its tensors into an engine's model, makes hundreds of thousands of
    objects and no cycles; in a process holding an engine, each automatic collection walks every
    object it has (docs/measurements.md, "Header parsing")."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
