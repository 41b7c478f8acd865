"""The one contract between the reader and where bytes land.

The reader holds an ordered list of sinks. For each destination the caller gives, the first
sink that :meth:`Sink.takes` it owns that tensor: it validates the destination before any byte
moves (:meth:`Sink.check`) and lands each read item of it (:meth:`Sink.land`). Tensors the
caller gave no destination for (and destinations that are filled through a staged copy) go to
the sink that ``allocates``: :class:`~.cpu.CpuSink`, always last. A ``deferred`` sink's tensors
are complete only after :meth:`Sink.finish` (CUDA: asynchronous copies), so the reader hands
them out after it. The reader never asks what kind of sink it has.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..header import TensorSpec
    from ..plan import ReadItem
    from ..sources.base import BufferPool, Source
    from ..tp import ColumnBlock


@runtime_checkable
class Sink(Protocol):
    #: allocates the tensors the caller gave no destination for (the CPU sink)
    allocates: bool
    #: its tensors are complete only after :meth:`finish`
    deferred: bool

    def takes(self, spec: "TensorSpec", dest: Any) -> bool:
        """Whether this sink fills ``dest`` (a caller's tensor) for ``spec``."""

    def check(self, spec: "TensorSpec", dest: Any, block: "ColumnBlock | None") -> bool:
        """Raise :class:`~loader_plugins.errors.DestinationError` unless ``dest`` can take
        ``spec`` (or its tensor-parallel ``block``); True when bytes land in ``dest`` directly,
        False when they are staged in memory the allocating sink gives and copied once."""

    def wrap(self, dest: Any) -> Any:
        """What a job that lands straight in ``dest`` keeps as its allocation (or None)."""

    def buffer_for(self, target: Any) -> memoryview | None:
        """The bytes of ``target`` the sink's :meth:`land` writes to (None: the sink addresses
        the tensor itself)."""

    def land(self, job: Any, item: "ReadItem", source: "Source", *, pool: "BufferPool | None",
             cancelled: threading.Event) -> None:
        """Read ``item`` from ``source`` into ``job``'s memory (the reader's worker call)."""

    def reserved_bytes(self) -> int:
        """Memory the sink holds for itself during a load (counted against ``memory_limit``)."""

    def attach(self, cancelled: threading.Event) -> None:
        """Use the load's cancel event (waits inside the sink abort when it is set)."""

    def finish(self) -> None:
        """Make every landed byte visible (the one device synchronisation); no-op on the CPU."""

    def report(self) -> dict | None:
        """Where this load's time went in the sink (CUDA: stage by stage), after :meth:`finish`;
        None when the sink has nothing to say (the CPU sink: the reader's own numbers say it)."""

    def close(self) -> None:
        """Release what :meth:`reserved_bytes` counted."""
