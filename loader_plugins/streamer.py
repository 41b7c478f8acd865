"""Public streaming API: :class:`SafetensorsStreamer` and :func:`load_file`."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence, Union

from .config import StreamerConfig
from .core.checkpoint import Checkpoint, open_checkpoint
from .core.reader import StreamReader, progress_bar
from .core.sources.base import Source
from .errors import CancelledError, StreamerError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PathArg = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def _config(config: StreamerConfig | Mapping[str, Any] | None, options: Mapping[str, Any]) -> StreamerConfig:
    if config is None:
        return StreamerConfig.from_dict(options, where="option")
    if isinstance(config, Mapping):
        return StreamerConfig.from_dict({**config, **options}, where="option")
    return config.replace(**options) if options else config


class SafetensorsStreamer:
    """Stream safetensors checkpoints concurrently; the names follow Run:ai Model Streamer.

    >>> with SafetensorsStreamer() as streamer:
    ...     streamer.stream_files(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    ...     for name, tensor in streamer.get_tensors():
    ...         ...

    Tensors are yielded as they complete, in no particular order, and are owned by the caller
    (never views of a file). ``destinations`` (name -> tensor) fills caller-allocated tensors in
    place; ``names`` restricts the load to a subset.
    """

    def __init__(self, config: StreamerConfig | Mapping[str, Any] | None = None, **options: Any):
        self.config = _config(config, options)
        self._pending: list[tuple[PathArg, Any, Any]] = []
        self._reader: StreamReader | None = None
        self._sources: dict[str, Source] = {}
        self.checkpoint: Checkpoint | None = None
        self.stats: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closed = False

    # Run:ai-compatible names
    def stream_file(self, path: str | os.PathLike, *, names=None, destinations=None, shards=None) -> None:
        self.stream_files([path], names=names, destinations=destinations, shards=shards)

    def stream_files(self, paths: PathArg, *, names=None, destinations=None, shards=None) -> None:
        """Queue a checkpoint (file, list of files, directory, s3:// prefix) for :meth:`get_tensors`.

        ``shards`` (name -> :class:`~loader_plugins.core.tp.ColumnBlock`) says that a destination
        holds only this rank's tensor-parallel shard: a dim-0 shard is read alone (its byte range),
        others are read whole and cut once complete (on the GPU by the CUDA sink, else by torch).
        """
        self._pending.append((paths, names, destinations, shards))

    def get_tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        if not self._pending:
            raise StreamerError("nothing to stream: call stream_file()/stream_files() first")
        pending, self._pending = self._pending, []
        for paths, names, destinations, shards in pending:
            yield from self._stream(paths, names, destinations, keeps_all=False, shards=shards)

    def open(self, paths: PathArg) -> Checkpoint:
        """Resolve and parse a checkpoint once, keeping its sources open for the next stream
        (``_stream(checkpoint=...)``) and for :meth:`read_tensors`."""
        if self._closed:
            raise CancelledError("the streamer is closed")
        sources: dict[str, Source] = {}
        checkpoint = open_checkpoint(paths, self.config, sources=sources)
        with self._lock:
            self._close_sources()
            self._sources = sources
        self.checkpoint = checkpoint
        return checkpoint

    def read_tensors(self, names: Sequence[str]) -> dict[str, "torch.Tensor"]:
        """Read these tensors of the checkpoint :meth:`open` resolved, whole, into new CPU tensors
        (a side read: it may run while a stream of the same checkpoint is going on)."""
        if self.checkpoint is None:
            raise StreamerError("read_tensors() needs open() first")
        specs = [self.checkpoint.tensors[n] for n in names]
        reader = StreamReader(specs, {s.file: self._sources[s.file] for s in specs}, self.config,
                              consumer_keeps_all=True)
        return dict(reader)

    def _stream(self, paths, names, destinations, *, keeps_all: bool, shards=None,
                checkpoint: Checkpoint | None = None):
        """Start reading now and return the iterator of ``(name, tensor)`` as they complete.
        ``checkpoint``: one :meth:`open` returned (``paths`` is then ignored)."""
        t0 = time.perf_counter()
        if self._closed:
            raise CancelledError("the streamer is closed")
        if checkpoint is None:
            checkpoint = self.open(paths)
        sources = self._sources
        specs = list(checkpoint.tensors.values())
        if names is not None:
            wanted = set(names)
            missing = sorted(wanted - checkpoint.tensors.keys())
            if missing:
                self._close_sources()
                raise StreamerError(f"tensor(s) {missing[:5]} not found in {checkpoint.files}")
            specs = [s for s in specs if s.name in wanted]
        header_s = time.perf_counter() - t0
        total = sum(s.nbytes for s in specs)
        bar = progress_bar(total, "streaming", self.config.progress)
        try:
            reader = StreamReader(specs, sources, self.config, destinations=destinations,
                                  consumer_keeps_all=keeps_all, shards=shards,
                                  on_bytes=bar.update if bar is not None else None)
            with self._lock:
                if self._closed:
                    raise CancelledError("the streamer was closed before streaming started")
                self._reader = reader
            reader.start()
        except BaseException:
            self._end(bar)
            raise
        return self._drain(reader, bar, t0, header_s, total, checkpoint, len(specs))

    def _drain(self, reader: StreamReader, bar, t0: float, header_s: float, total: int, checkpoint: Checkpoint,
               count: int):
        try:
            yield from reader
        finally:
            self._end(bar)
            reader.close()
        seconds = time.perf_counter() - t0
        self.stats = {"bytes": total, "seconds": seconds, "header_seconds": header_s, "workers": reader.workers,
                      "gbps": total / seconds / 1e9 if seconds > 0 else 0.0, "files": len(checkpoint.files),
                      "tensors": count}
        log.info("Streamed %d tensors (%.2f GB) from %d file(s) in %.2f s (%.2f GB/s)", count, total / 1e9,
                 len(checkpoint.files), seconds, self.stats["gbps"])

    def _end(self, bar) -> None:
        if bar is not None:
            bar.close()
        with self._lock:
            self._reader = None
            self._close_sources()

    def _close_sources(self) -> None:
        for src in self._sources.values():
            src.close()
        self._sources = {}

    def close(self) -> None:
        """Stop streaming and release threads, files and buffers; safe from any thread."""
        with self._lock:
            self._closed = True
            reader = self._reader
        if reader is not None:
            reader.close()   # joins the workers before any source is closed
        with self._lock:
            self._reader = None
            self._close_sources()
            self._pending.clear()

    def __enter__(self) -> "SafetensorsStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_file(path: PathArg, device: "str | int | torch.device" = "cpu", *,
              config: StreamerConfig | Mapping[str, Any] | None = None, **options: Any) -> dict[str, "torch.Tensor"]:
    """Load every tensor of a checkpoint, like ``safetensors.torch.load_file``.

    ``path`` may be a file, a list of files, a checkpoint directory (sharded with
    ``model.safetensors.index.json`` or not) or an ``s3://`` URI. The tensors live in memory the
    result owns: a file changed afterwards never changes them. ``options`` are
    :class:`StreamerConfig` fields (``concurrency=16``, ``memory_limit="4GiB"``...).
    """
    import torch

    streamer = SafetensorsStreamer(config, **options)
    out: dict[str, torch.Tensor] = {}
    target = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    destinations = None
    if target.type == "cuda":   # straight into CUDA tensors (the CUDA sink when CuPy is installed)
        specs = open_checkpoint(path, streamer.config).tensors
        destinations = {n: torch.empty(s.shape, dtype=s.torch_dtype(), device=target) for n, s in specs.items()}
    with streamer:
        for name, tensor in streamer._stream(path, None, destinations, keeps_all=True):
            out[name] = tensor
    result = {name: out[name] for name in sorted(out)}
    if target.type not in ("cpu", "cuda"):
        result = {name: t.to(target) for name, t in result.items()}
    return result
