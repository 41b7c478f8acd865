"""Public streaming API: :class:`SafetensorsStreamer` and :func:`load_file`."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Collection, Iterator, Mapping, Sequence, Union

from .config import StreamerConfig
from .core.checkpoint import Checkpoint, merge_headers, open_checkpoint, open_headers, open_sources
from .core.header import FileHeader
from .core.reader import StreamReader, progress_bar
from .core.sources.base import BorrowedSource, Source
from .errors import CancelledError, ConfigError, DestinationError, DeviceError, UsageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PathArg = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def _sources_of(checkpoint: Checkpoint, config: StreamerConfig) -> dict[str, Source]:
    """Sources for a stream of an already opened checkpoint: its own, borrowed (its owner closes
    them), or, when it holds none, new ones (headers are not read again)."""
    if checkpoint.is_open:
        return {f: BorrowedSource(checkpoint.sources[f]) for f in checkpoint.files}
    return open_sources(checkpoint.files, config)


def _config(config: StreamerConfig | Mapping[str, Any] | None, options: Mapping[str, Any]) -> StreamerConfig:
    if config is None:
        return StreamerConfig.from_dict(options, where="option")
    if isinstance(config, Mapping):
        return StreamerConfig.from_dict({**config, **options}, where="option")
    return config.replace(**options) if options else config


#: ``load_file(backend=...)`` values safetensors 0.8 accepts. Both read into memory the result
#: owns here (safetensors' ``"pread"`` semantics); ``"mmap"`` is accepted so calls written for
#: safetensors keep working, but the tensors are never views of the file.
BACKENDS = ("mmap", "pread")

#: device types safetensors accepts by name (``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"npu:0"``...)
_DEVICE_TYPES = ("cpu", "cuda", "musa", "mps", "npu", "xpu", "xla", "mlu", "hpu")


def resolve_device(device: "str | int | torch.device") -> "torch.device":
    """safetensors' device argument as a torch device, checked to exist in this process.

    Accepted as safetensors accepts them: ``"cpu"``, a device type (``"cuda"`` = ``"cuda:0"``),
    ``"type:N"`` (``"mps"`` only with index 0), an int (that index of the default accelerator);
    a ``torch.device`` too. Anything else is a :class:`ConfigError`; a device torch cannot use
    here (no CUDA...) a :class:`DeviceError`, a ``RuntimeError`` as torch and safetensors raise.
    """
    import torch

    if isinstance(device, torch.device):
        target = device
    elif isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        target = torch.device("cuda", device)
    elif isinstance(device, str):
        kind, _, index = device.partition(":")
        valid = kind in _DEVICE_TYPES and (not _ or (kind != "cpu" and index.isdigit()))
        if not valid or (kind == "mps" and index not in ("", "0")):
            raise ConfigError(f"device {device} is invalid: pass \"cpu\", a device type such as \"cuda\", "
                              f"\"cuda:N\" or an int device index")
        target = torch.device("cuda", 0) if device == "cuda" else torch.device(device)
    else:
        raise ConfigError(f"device {device!r} is invalid: pass \"cpu\", \"cuda\", \"cuda:N\" or an int device index")
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {target} was asked for, but torch reports no CUDA device here "
                              f"(torch.cuda.is_available() is False); load to \"cpu\" instead")
        if (target.index or 0) >= torch.cuda.device_count():
            raise DeviceError(f"device {target} does not exist: this process sees {torch.cuda.device_count()} "
                              f"CUDA device(s)")
    elif target.type != "cpu":
        try:
            torch.empty(0, device=target)
        except Exception as exc:   # noqa: BLE001 - torch's own reason, whatever the backend
            raise DeviceError(f"device {target} is not usable in this process: {exc}") from exc
    return target


def _wanted_names(tensor_names, names) -> frozenset[str] | None:
    """Run:ai's ``tensor_names`` rule: None loads everything; a collection of names (a set,
    list...) loads those; a single string or an empty collection is a caller bug."""
    if tensor_names is not None and names is not None:
        raise ConfigError("pass tensor_names or names (its older spelling), not both")
    chosen = tensor_names if tensor_names is not None else names
    if chosen is None:
        return None
    if isinstance(chosen, (str, bytes)):
        raise ConfigError(f"tensor_names must be a collection of names, not a single str ({chosen!r}): "
                          f"write tensor_names=[{chosen!r}]")
    wanted = frozenset(chosen)
    if not wanted:
        raise ConfigError("tensor_names must not be empty - pass None to load every tensor")
    bad = [n for n in wanted if not isinstance(n, str)]
    if bad:
        raise ConfigError(f"tensor_names must hold strings, got {bad[:3]!r}")
    return wanted


def _credentials_options(credentials: Any) -> dict[str, Any]:
    """Config fields from a Run:ai ``S3Credentials`` (or any object with its attributes)."""
    if credentials is None:
        return {}
    fields = {"access_key_id": "s3_access_key_id", "secret_access_key": "s3_secret_access_key",
              "session_token": "s3_session_token", "region_name": "s3_region", "endpoint": "s3_endpoint_url"}
    return {ours: getattr(credentials, theirs) for theirs, ours in fields.items()
            if getattr(credentials, theirs, None) is not None}


def _batches(headers: Sequence[FileHeader]) -> list[list[int]]:
    """Indices of ``headers`` grouped so that no group holds a tensor name twice (one group
    unless several files repeat a name, which Run:ai's streamer allows when nothing is
    filtered: each copy is then yielded)."""
    groups: list[tuple[list[int], set[str]]] = []
    for i, header in enumerate(headers):
        names = {s.name for s in header.tensors}
        for members, seen in groups:
            if seen.isdisjoint(names):
                members.append(i)
                seen |= names
                break
        else:
            groups.append(([i], names))
    return [members for members, _ in groups]


def _check_wanted(wanted: frozenset[str], checkpoints: Sequence[Checkpoint], files: Sequence[str]) -> None:
    """Run:ai's rules: every requested name exists, and in one file only."""
    seen: dict[str, list[str]] = {}
    for checkpoint in checkpoints:
        for name in wanted & checkpoint.tensors.keys():
            seen.setdefault(name, []).append(checkpoint.tensors[name].file)
    missing = sorted(wanted - seen.keys())
    if missing:
        raise UsageError(f"tensor_names not found in checkpoint: {missing[:10]}"
                         f"{f' and {len(missing) - 10} more' if len(missing) > 10 else ''} (files: {list(files)})")
    repeated = sorted(n for n, where in seen.items() if len(where) > 1)
    if repeated:
        raise UsageError(f"tensor_names requested tensors that appear in more than one file: {repeated[:10]} "
                         f"(e.g. {repeated[0]!r} in {seen[repeated[0]]}); ask for names that occur once")


def _device_buffers(checkpoint: Checkpoint, names: Collection[str] | None, device) -> dict[str, "torch.Tensor"]:
    """Empty tensors on ``device`` for the wanted tensors: the reader streams into them."""
    import torch

    return {n: torch.empty(s.shape, dtype=s.torch_dtype(), device=device) for n, s in checkpoint.tensors.items()
            if names is None or n in names}


def _only(by_name: Mapping[str, Any] | None, checkpoint: Checkpoint) -> dict[str, Any] | None:
    """The entries of ``by_name`` for this checkpoint's tensors (all of them unless files repeat names)."""
    if by_name is None:
        return None
    return {n: v for n, v in by_name.items() if n in checkpoint.tensors}


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclasses.dataclass
class _Job:
    """One ``stream_files`` call: its checkpoints (headers already parsed), sources and wishes."""

    checkpoints: list[Checkpoint]
    sources: dict[str, Source]
    names: frozenset[str] | None
    destinations: Mapping[str, Any] | None
    shards: Mapping[str, Any] | None
    device: "torch.device"
    distributed: bool
    paths: Any
    config: StreamerConfig


class SafetensorsStreamer:
    """Stream safetensors checkpoints concurrently, call-compatible with Run:ai Model Streamer's
    ``runai_model_streamer.SafetensorsStreamer`` (0.17).

    >>> with SafetensorsStreamer() as streamer:
    ...     streamer.stream_files(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    ...     for name, tensor in streamer.get_tensors():
    ...         ...

    As Run:ai's: ``stream_file(path, s3_credentials=None, device="cpu", is_distributed=False,
    tensor_names=None, owned=True)`` (``stream_files`` takes a list) parses the headers at once
    and raises there for a bad file or an unknown name; ``get_tensors()`` yields ``(name,
    tensor)`` as tensors complete, in no particular order; a name repeated across files is
    yielded once per file unless ``tensor_names`` asks for it (then it is an error). Tensors are
    always owned by the caller (never views of a file or of a reused buffer), whatever ``owned``
    says. ``is_distributed=True`` splits the reads across the ranks of the initialised
    ``torch.distributed`` group (:func:`~loader_plugins.core.distributed.load_distributed`); every
    rank must then pass the same files and names.

    Ours besides: a path may be a directory (sharded with ``model.safetensors.index.json`` or
    not) or an ``s3://`` prefix; keyword-only ``destinations`` (name -> tensor) fills
    caller-allocated tensors in place and ``shards`` (name ->
    :class:`~loader_plugins.core.tp.ColumnBlock`) says a destination holds one tensor-parallel
    shard; constructor keywords are :class:`StreamerConfig` fields.
    """

    def __init__(self, config: StreamerConfig | Mapping[str, Any] | None = None, **options: Any):
        self.config = _config(config, options)
        self._pending: list[_Job] = []
        self._reader: StreamReader | None = None
        self._sources: dict[str, Source] = {}
        self.checkpoint: Checkpoint | None = None
        self.stats: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = False

    def stream_file(self, path: "str | os.PathLike | Checkpoint", s3_credentials: Any = None, device: Any = "cpu",
                    is_distributed: bool = False, tensor_names: Collection[str] | None = None, owned: bool = True,
                    *, names: Collection[str] | None = None, destinations: Mapping[str, Any] | None = None,
                    shards: Mapping[str, Any] | None = None) -> None:
        """Queue one file (or directory, or ``s3://`` prefix); see :meth:`stream_files`."""
        self.stream_files(path if isinstance(path, Checkpoint) else [path], s3_credentials, device, is_distributed, tensor_names, owned, names=names,
                          destinations=destinations, shards=shards)

    def stream_files(self, paths: "PathArg | Checkpoint", s3_credentials: Any = None, device: Any = "cpu",
                     is_distributed: bool = False, tensor_names: Collection[str] | None = None, owned: bool = True,
                     *, names: Collection[str] | None = None, destinations: Mapping[str, Any] | None = None,
                     shards: Mapping[str, Any] | None = None) -> None:
        """Parse the headers of ``paths`` now (errors are raised here) and queue their tensors
        for :meth:`get_tensors`. ``paths`` may also be a :class:`Checkpoint` opened once
        (``open_checkpoint(..., keep_open=True)``): its headers and open sources are used as
        they are.

        ``s3_credentials``: a Run:ai ``S3Credentials`` (key, secret, token, region, endpoint),
        else boto3's chain. ``device``: where yielded tensors live (``"cuda"`` streams straight
        into device memory). ``tensor_names``: load only these (``names`` is its older spelling).
        ``owned`` is accepted for Run:ai compatibility: tensors are always the caller's.
        """
        if self._closed:
            raise CancelledError("the streamer is closed")
        if not isinstance(owned, bool) or not isinstance(is_distributed, bool):
            raise ConfigError("owned and is_distributed must be True or False")
        wanted = _wanted_names(tensor_names, names)
        target = resolve_device(device)
        config = self.config.replace(**_credentials_options(s3_credentials)) if s3_credentials else self.config
        sources: dict[str, Source] = {}
        if isinstance(paths, Checkpoint):   # opened once by the caller: no listing or header read again
            files, checkpoints = list(paths.files), [paths]
            sources = _sources_of(paths, config)
        else:
            files, headers, weight_map = open_headers(paths, config, sources)
        try:
            if not isinstance(paths, Checkpoint):
                checkpoints = [merge_headers([files[i] for i in group], [headers[i] for i in group],
                                             weight_map if len(files) == len(group) else None)
                               for group in _batches(headers)]
            if wanted is not None:
                _check_wanted(wanted, checkpoints, files)
            known = set().union(*(c.tensors.keys() for c in checkpoints))
            for what, by_name in (("destinations", destinations), ("shards", shards)):
                unknown = sorted(set(by_name or ()) - known)
                if unknown:
                    raise DestinationError(f"{what} given for tensors not in the checkpoint: {unknown[:5]} "
                                           f"(files: {files[:3]}{'...' if len(files) > 3 else ''})")
            for checkpoint in checkpoints:
                for spec in checkpoint.tensors.values():
                    if wanted is None or spec.name in wanted:
                        spec.torch_dtype()   # a dtype torch cannot hold fails here, before any read
        except BaseException:
            for src in sources.values():
                src.close()
            raise
        self._pending.append(_Job(checkpoints, sources, wanted, destinations, shards, target, is_distributed,
                                  paths, config))

    def get_tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Yield ``(name, tensor)`` of every queued stream as tensors complete."""
        if not self._pending:
            raise UsageError("nothing to stream: call stream_file()/stream_files() first")
        pending, self._pending = self._pending, []
        try:
            for job in pending:
                yield from self._run_job(job)
        finally:
            for job in pending:   # the consumer stopped early: release what was never streamed
                for src in job.sources.values():
                    src.close()
                job.sources.clear()

    def _run_job(self, job: _Job) -> Iterator[tuple[str, "torch.Tensor"]]:
        if job.distributed and _world_size() > 1:
            for src in job.sources.values():
                src.close()
            yield from self._run_distributed(job)
            return
        move = job.device.type not in ("cpu", "cuda")
        for checkpoint in job.checkpoints:
            sources = {f: job.sources.pop(f) for f in checkpoint.files}
            names = job.names & checkpoint.tensors.keys() if job.names is not None else None
            if names is not None and not names:
                for src in sources.values():
                    src.close()
                continue
            destinations = _only(job.destinations, checkpoint)
            if job.device.type == "cuda" and destinations is None:
                destinations = _device_buffers(checkpoint, names, job.device)
            stream = self._stream(None, names, destinations, keeps_all=False, shards=_only(job.shards, checkpoint),
                                  checkpoint=checkpoint, sources=sources)
            for name, tensor in stream:
                yield name, (tensor.to(job.device) if move else tensor)

    def _run_distributed(self, job: _Job) -> Iterator[tuple[str, "torch.Tensor"]]:
        from .core.distributed import load_distributed

        names = sorted(job.names) if job.names is not None else None
        device = job.device if job.device.type == "cuda" else None
        paths = list(job.paths.files) if isinstance(job.paths, Checkpoint) else job.paths
        loaded = load_distributed(paths, config=job.config, names=names, device=device)
        for name, tensor in loaded.items():
            yield name, (tensor.to(job.device) if job.device.type not in ("cpu", "cuda") else tensor)

    def open(self, paths: "PathArg | Checkpoint") -> Checkpoint:
        """Resolve and parse a checkpoint once, keeping its sources open for the next stream
        (``_stream(checkpoint=...)``) and for :meth:`read_tensors`. An opened
        :class:`Checkpoint` is taken as it is (its sources borrowed)."""
        if self._closed:
            raise CancelledError("the streamer is closed")
        if isinstance(paths, Checkpoint):
            checkpoint, sources = paths, _sources_of(paths, self.config)
        else:
            sources = {}
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
            raise UsageError("read_tensors() needs open() first")
        specs = [self.checkpoint.tensors[n] for n in names]
        reader = StreamReader(specs, {s.file: self._sources[s.file] for s in specs}, self.config,
                              consumer_keeps_all=True)
        return dict(reader)

    def _stream(self, paths, names, destinations, *, keeps_all: bool, shards=None,
                checkpoint: Checkpoint | None = None, sources: dict[str, Source] | None = None):
        """Start reading now and return the iterator of ``(name, tensor)`` as they complete.
        ``checkpoint``: one :meth:`open` returned (``paths`` is then ignored), or one whose open
        ``sources`` are given (the stream then owns and closes them)."""
        t0 = time.perf_counter()
        if self._closed:
            raise CancelledError("the streamer is closed")
        if checkpoint is None:
            checkpoint = self.open(paths)
        if sources is not None:
            with self._lock:
                self._close_sources()
                self._sources = sources
        specs = list(checkpoint.tensors.values())
        if names is not None:
            missing = sorted(set(names) - checkpoint.tensors.keys())
            if missing:
                self._close_sources()
                raise UsageError(f"tensor_names not found in checkpoint: {missing[:5]} (in {checkpoint.files})")
            wanted = set(names)
            specs = [s for s in specs if s.name in wanted]
        header_s = time.perf_counter() - t0
        total = sum(s.nbytes for s in specs)
        bar = progress_bar(total, "streaming", self.config.progress)
        try:
            reader = StreamReader(specs, self._sources, self.config, destinations=destinations,
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
                      "tensors": count, "memory": reader.memory,
                      "bytes_read": reader.bytes_read}     # asked of the sources: a TP rank, its shards' bytes
        if reader.page_cache is not None:
            self.stats["page_cache"] = reader.page_cache   # refilled after the load, or why not
        if reader.sink_reports:
            self.stats["sinks"] = reader.sink_reports   # a CUDA load: its stages (CudaSink.report)
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


def load_file(filename: "PathArg | Checkpoint", device: "str | int | torch.device" = "cpu", *, backend: str = "mmap",
              config: StreamerConfig | Mapping[str, Any] | None = None, **options: Any) -> dict[str, "torch.Tensor"]:
    """Load every tensor of a checkpoint: the contract of ``safetensors.torch.load_file`` (0.8).

    As safetensors': ``device`` is ``"cpu"``, a device type (``"cuda"``), ``"type:N"`` or an
    int; ``backend`` is ``"mmap"`` or ``"pread"`` (both accepted; the tensors always live in
    memory the result owns, as with ``"pread"``: a file rewritten afterwards never changes
    them); keys come in file order (by offset; shard by shard); the header is validated by
    safetensors' rules; a missing file raises ``FileNotFoundError``; every other error is a
    ``safetensors.SafetensorError`` when safetensors is installed (and a ``ValueError``,
    ``OSError`` or ``RuntimeError`` as fits).

    Ours besides, keyword-only: ``filename`` may also be a list of files, a checkpoint
    directory (sharded with ``model.safetensors.index.json`` or not), an ``s3://`` URI or an opened
    :class:`~loader_plugins.core.checkpoint.Checkpoint` (read through its open sources);
    ``config``/``options`` are :class:`StreamerConfig` fields (``concurrency=16``,
    ``memory_limit="4GiB"``...).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is invalid (expected one of: \"mmap\", \"pread\")")
    target = resolve_device(device)
    streamer = SafetensorsStreamer(config, **options)
    out: dict[str, torch.Tensor] = {}
    with streamer:
        checkpoint = streamer.open(filename)
        for spec in checkpoint.tensors.values():
            spec.torch_dtype()   # a dtype torch cannot hold (F6) fails before any read
        destinations = _device_buffers(checkpoint, None, target) if target.type == "cuda" else None
        for name, tensor in streamer._stream(None, None, destinations, keeps_all=True, checkpoint=checkpoint):
            out[name] = tensor
    order = [spec.name for header in checkpoint.headers for spec in header.tensors]
    if target.type not in ("cpu", "cuda"):
        return {name: out[name].to(target) for name in order}
    return {name: out[name] for name in order}
