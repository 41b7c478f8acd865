"""How one load divides ``StreamerConfig.memory_limit``: the reader's rule, in one place.

::

    memory_limit
    |- ring     at most a quarter: the CUDA sink's pinned slots (only with CUDA destinations)
    |- staging  at most a quarter: aligned staging buffers for O_DIRECT reads, two per worker
    `- held     the rest (at least one chunk): tensors the reader allocated and has not handed
                out yet; it admits windows of at most half of that, so one window is read while
                the consumer takes the last one's tensors

Caller-owned destinations cost nothing under ``held``; a single tensor larger than ``held`` is
still loaded, alone. What a load really used is in its reader's :attr:`MemoryBudget.report`
(``model-streamer load --json`` prints it).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """The split of ``limit`` bytes for one load whose reads are at most ``chunk_bytes``."""

    limit: int
    chunk_bytes: int

    #: the fraction of the limit each of the ring and the staging buffers may take (a quarter)
    SHARE = 4

    @property
    def ring_bytes(self) -> int:
        """What the CUDA sink's pinned ring may take."""
        return self.limit // self.SHARE

    @property
    def staging_bytes(self) -> int:
        """What the staging buffers may take."""
        return self.limit // self.SHARE

    def staging_buffers(self, buffer_bytes: int, workers: int) -> int:
        """How many staging buffers of ``buffer_bytes``: two per worker (one read into while the
        other's bytes are copied out), within :attr:`staging_bytes`, at least one."""
        return max(1, min(2 * workers, self.staging_bytes // buffer_bytes))

    def held_bytes(self, staging_used: int) -> int:
        """What the reader may hold in tensors once staging and the ring took ``staging_used``."""
        return max(self.chunk_bytes, self.limit - staging_used)

    def window_bytes(self, held: int) -> int:
        """The largest window of tensors admitted at once."""
        return max(self.chunk_bytes, held // 2)

    def report(self, *, ring: int, staging: int, held: int, window: int | None) -> dict[str, int | None]:
        """What one load used: the limit, the ring's and staging's real bytes, the held limit
        and the window size (None when the consumer keeps every tensor: no windows)."""
        return {"limit": self.limit, "ring": ring, "staging": staging, "held": held, "window": window}
