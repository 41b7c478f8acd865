"""A drop-in for TGI's ``text_generation_server.utils.weights.Weights`` whose bytes come from the
streaming core instead of one ``safe_open`` mmap per file.

TGI builds one ``Weights(filenames, device, dtype, process_group, weights_loader, aliases=None,
prefix=None)`` per model and its model code pulls tensors from it by name. Its constructor opens
every file with ``safe_open``, one after another, to build ``routing`` (tensor -> file); every
``get_*`` then reads through the mmap, tensor by tensor, on one thread.

:class:`StreamedWeightsMixin` instead

1. parses all headers concurrently with the core's header parser (no mmap) to build ``routing``;
2. starts streaming every tensor of those files with :class:`~loader_plugins.SafetensorsStreamer`
   in the background (the core's threads, bounded memory), so I/O overlaps model construction;
3. serves ``get_tensor``, ``get_sharded``, ``get_partial_sharded``, ``get_packed_sharded``,
   ``_get_slice``, ``get_shape`` and ``has_tensor`` with TGI 3.0-3.3's semantics, slicing the
   streamed CPU tensor, then moving and casting in the order each TGI method does. A request
   waits only for its own tensor.

Each streamed tensor is handed out once and then forgotten, so host memory drains as the model
is built and a tensor given to the model never aliases memory the adapter still serves from; a
second request for the same tensor (tied embeddings) re-reads it from storage. Files that TGI
code adds to ``routing`` later (Medusa / MLP speculators) are served by the base class.

Nothing here imports TGI: :func:`streamer_weights_class` builds ``StreamerWeights`` on top of
TGI's own ``Weights`` when TGI is importable, and :class:`StandaloneStreamerWeights` runs the same
code without TGI (tests, benchmarks).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Union

from ..config import StreamerConfig
from ..core.tp import ceil_block
from ..core.sources.base import scheme_of
from ..errors import CancelledError, InternalError, UsageError
from .settings import TGIStreamerSettings, settings_from_env

if TYPE_CHECKING:
    import torch

    from ..core.checkpoint import Checkpoint
    from ..core.header import TensorSpec
    from ..core.sources.base import Source

log = logging.getLogger(__name__)

TGI_WEIGHTS_MODULE = "text_generation_server.utils.weights"

# Dtypes each TGI method leaves uncast ("GPTQ packs u4 into int32, exl2 uses int16, FP8 ...").
# TGI 3.0-3.3 list int64 for get_tensor and get_packed_sharded but not for get_partial_sharded;
# this difference is TGI's and is kept. Names, resolved lazily: float8 needs torch >= 2.1.
_KEEP_GET_TENSOR = ("float8_e4m3fn", "int8", "int16", "int32", "int64")
_KEEP_PARTIAL_SHARDED = ("float8_e4m3fn", "int8", "int16", "int32")
_KEEP_PACKED_SHARDED = ("float8_e4m3fn", "int8", "int16", "int32", "int64")


def _keeps_dtype(dtype: "torch.dtype", names: Sequence[str]) -> bool:
    import torch

    return any(getattr(torch, n, None) == dtype for n in names)


def block_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """TGI's per-rank block along a dimension: ``block = ceil(size / world)``; rank r takes
    ``[r*block, (r+1)*block)``. ``stop`` may run past ``size`` (slicing clamps it), so the last
    ranks can get a shorter or empty block."""
    return ceil_block(size, rank, world_size, clamp=False)


def blocks_to_block_sizes(total_size: int, blocks: Union[int, List[int]]) -> List[int]:
    """Block sizes of a packed tensor, as TGI computes them: an int ``n`` splits ``total_size``
    into ``n`` equal blocks; a list gives proportions (``[2, 1, 1]`` of 1024 -> 512, 256, 256)."""
    if isinstance(blocks, list):
        parts = sum(blocks)
        assert total_size % parts == 0, f"Cannot split {total_size} in proportional blocks: {blocks}"
        unit = total_size // parts
        return [unit * b for b in blocks]
    assert total_size % blocks == 0, f"Prepacked is not divisible by {blocks}"
    return [total_size // blocks] * blocks


def _owning(tensor: "torch.Tensor") -> "torch.Tensor":
    """``tensor`` itself when it uses all of its storage; else a contiguous copy, so that a shard
    handed to the model does not keep the whole streamed tensor alive."""
    import torch

    if tensor.device.type != "cpu":
        return tensor
    used = tensor.numel() * tensor.element_size()
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == used:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class _TensorStore:
    """Tensors streamed by the core on a background thread; each is taken at most once."""

    def __init__(self, checkpoint: "Checkpoint", config: StreamerConfig):
        from ..streamer import SafetensorsStreamer

        self._config = config
        specs = checkpoint.tensors
        self._specs = specs
        self._cond = threading.Condition()
        self._ready: Dict[str, "torch.Tensor"] = {}
        self._taken: set = set()
        self._error: Optional[BaseException] = None
        self._done = not specs
        self._closed = False
        self._sources: Dict[str, "Source"] = dict(checkpoint.sources)   # the stream borrows them; closed here
        self._storages: list = []
        self.stats: Dict[str, float] = {}
        self.started = time.perf_counter()
        self.finished: Optional[float] = None
        self._streamer = SafetensorsStreamer(config)
        if specs:
            self._streamer.stream_files(checkpoint)
            self._thread: Optional[threading.Thread] = threading.Thread(
                target=self._run, name="tgi-streamer", daemon=True)
            self._thread.start()
        else:
            self._thread = None

    def _run(self) -> None:
        try:
            for name, tensor in self._streamer.get_tensors():
                with self._cond:
                    if self._closed:
                        break
                    if name in self._specs:
                        self._ready[name] = tensor
                        self._cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that asks for a tensor
            with self._cond:
                if not self._closed:
                    log.error("streaming the weights failed: %s", exc)
                    self._error = exc
        finally:
            self._streamer.close()
            with self._cond:
                self._done = True
                self.finished = time.perf_counter()
                self.stats = dict(self._streamer.stats)
                self._cond.notify_all()

    def take(self, spec: "TensorSpec") -> "torch.Tensor":
        """The streamed tensor for ``spec`` (waiting for it), or a fresh read when it was taken."""
        name = spec.name
        with self._cond:
            while name not in self._ready and name not in self._taken and not self._done \
                    and self._error is None and not self._closed:
                self._cond.wait()
            if self._error is not None:
                raise CancelledError(f"streaming the weights failed, so {spec.describe()} cannot be served: "
                                    f"{self._error}") from self._error
            tensor = self._ready.pop(name, None)
            if tensor is not None:
                self._taken.add(name)
                return tensor
            if name not in self._taken and not self._closed:
                raise InternalError(f"internal error: streaming finished without {spec.describe()}")
        return self.read_again(spec)

    def read_again(self, spec: "TensorSpec") -> "torch.Tensor":
        """Read one tensor from storage on this thread (for tensors already handed out)."""
        import torch

        from ..core.sinks.cpu import tensor_buffer
        from ..core.sources.base import storage_for

        log.debug("reading %s again", spec.describe())
        tensor = torch.empty(spec.shape, dtype=spec.torch_dtype())
        if not spec.nbytes:
            return tensor
        with self._cond:
            source = None if self._closed else self._sources.get(spec.file)
            if source is None:
                storage = storage_for(spec.file, self._config)
                source = storage.open(spec.file)
                if self._closed:  # after close(): nothing may stay open
                    try:
                        source.read_into(spec.offset, tensor_buffer(tensor))
                    finally:
                        source.close()
                        storage.close()
                    return tensor
                self._storages.append(storage)
                self._sources[spec.file] = source
        source.read_into(spec.offset, tensor_buffer(tensor))
        return tensor

    def wait(self) -> None:
        """Block until streaming has finished; raise its error, if any."""
        with self._cond:
            while not self._done:
                self._cond.wait()
            if self._error is not None:
                raise CancelledError(f"streaming the weights failed: {self._error}") from self._error

    def close(self) -> None:
        """Stop streaming (at the next completed tensor), join, drop what was not taken."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            sources, self._sources = self._sources, {}
            storages, self._storages = self._storages, []
            self._cond.notify_all()
        # The streaming thread sees the flag when its next tensor completes and closes the streamer
        # itself (SafetensorsStreamer is not closed from another thread while it is iterated).
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=60)
        with self._cond:
            self._ready.clear()
        for source in sources.values():
            source.close()
        for storage in storages:
            storage.close()


class _StreamedSlice:
    """What ``Weights._get_slice`` returns: ``get_shape()``, ``get_dtype()`` and indexing, like
    safetensors' ``PySafeSlice``. The streamed tensor is taken on first indexing (not by
    ``get_shape``), and indexing follows torch's rules, as safetensors >= 0.6 does."""

    def __init__(self, store: _TensorStore, spec: "TensorSpec"):
        self._store = store
        self._spec = spec
        self._tensor: Optional["torch.Tensor"] = None

    def get_shape(self) -> List[int]:
        return list(self._spec.shape)

    def get_dtype(self) -> str:
        return self._spec.dtype

    def __getitem__(self, key: Any) -> "torch.Tensor":
        if self._tensor is None:
            self._tensor = self._store.take(self._spec)
        return self._tensor[key]

    def __repr__(self) -> str:
        return f"<streamed slice {self._spec.name!r} {self._spec.dtype} {list(self._spec.shape)}>"


def _open_checkpoint(files: Sequence[str], filenames: Sequence[Any], config: StreamerConfig) -> "Checkpoint":
    """Open every file once (one HEAD and one header read per S3 object) and keep the sources
    open for the stream and for reads of tensors taken twice; TGI's rule for a name in two files."""
    from ..core.checkpoint import Checkpoint, open_sources, read_header_from

    sources = open_sources(files, config)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(files))), thread_name_prefix="tgi-header") as pool:
            headers = list(pool.map(lambda f: read_header_from(sources[f], config.max_header_bytes), files))
        routing: Dict[str, Any] = {}
        specs: Dict[str, "TensorSpec"] = {}
        for filename, header in zip(filenames, headers):
            for spec in sorted(header.tensors, key=lambda s: s.name):
                if spec.name in routing:
                    raise RuntimeError(
                        f"Key {spec.name} was found in multiple files: {filename} and {routing[spec.name]}")
                routing[spec.name] = filename
                specs[spec.name] = spec
    except BaseException:
        for source in sources.values():
            source.close()
        raise
    return Checkpoint(files=list(files), headers=headers, tensors=specs, sources=sources)


class StreamedWeightsMixin:
    """The streaming half of ``StreamerWeights``; put it before TGI's ``Weights`` in the bases.

    The constructor takes TGI's arguments. ``settings`` (keyword only) overrides the ``TGI_STREAMER_*``
    environment, which is otherwise read once here.
    """

    def __init__(
        self,
        filenames: Sequence[Any],
        device,
        dtype,
        process_group,
        weights_loader,
        aliases: Optional[Dict[str, List[str]]] = None,
        prefix: Optional[str] = None,
        *,
        settings: Optional[TGIStreamerSettings] = None,
    ):
        # TGI's Weights.__init__ is not called: it would safe_open every file, one after another.
        # These are all the attributes it sets (3.0-3.3).
        t0 = time.perf_counter()
        settings = settings if settings is not None else settings_from_env()
        config = settings.config
        world_size = process_group.size()
        if world_size > 1 and "direct_io" not in settings.explicit and config.direct_io != "off":
            # Every rank of a node streams the same files: buffered reads let the page cache serve
            # the ranks that come second instead of each rank reading the disk with O_DIRECT.
            config = config.replace(direct_io="off")
        files = [os.fspath(f) for f in filenames]
        checkpoint = _open_checkpoint(files, filenames, config)
        specs = checkpoint.tensors
        filename_of = dict(zip(files, filenames))
        routing = {name: filename_of[spec.file] for name, spec in specs.items()}
        self.aliases = {} if aliases is None else aliases
        self.routing = routing
        self.device = device
        self.dtype = dtype
        self.process_group = process_group
        self.prefix = prefix
        self.weights_loader = weights_loader
        self._handles = {}
        self._streamed_specs = specs
        self.header_seconds = time.perf_counter() - t0
        self._store = _TensorStore(checkpoint, config)
        self._finalizer = weakref.finalize(self, self._store.close)
        log.info("StreamerWeights: %d tensors in %d file(s), headers parsed in %.3f s; streaming %.2f GB with "
                 "%d threads (rank %d of %d)", len(specs), len(files), self.header_seconds,
                 sum(s.nbytes for s in specs.values()) / 1e9, config.workers(any(scheme_of(f) != "file" for f in files)),
                 process_group.rank(), world_size)

    # ---- lookup ---------------------------------------------------------------------------
    def _streamed_spec(self, filename: str, name: str) -> Optional["TensorSpec"]:
        """The spec when ``name`` in ``filename`` is one we stream (not a file added to routing later)."""
        spec = self._streamed_specs.get(name)
        if spec is not None and spec.file == filename:
            return spec
        return None

    def _lookup(self, tensor_name: str):
        filename, name = self.get_filename(tensor_name)
        return name, self._streamed_spec(filename, name)

    # ---- TGI's data methods ---------------------------------------------------------------
    def _get_slice(self, tensor_name: str):
        _, spec = self._lookup(tensor_name)
        if spec is None:
            return super()._get_slice(tensor_name)
        return _StreamedSlice(self._store, spec)

    def get_shape(self, tensor_name: str):
        _, spec = self._lookup(tensor_name)
        if spec is None:
            return super().get_shape(tensor_name)
        return list(spec.shape)

    def get_tensor(self, tensor_name: str, to_device: bool = True, to_dtype: bool = True) -> "torch.Tensor":
        _, spec = self._lookup(tensor_name)
        if spec is None:
            return super().get_tensor(tensor_name, to_device=to_device, to_dtype=to_dtype)
        tensor = self._store.take(spec)
        # TGI: cast first (unless a packed/quantized dtype), then move.
        if to_dtype and not _keeps_dtype(tensor.dtype, _KEEP_GET_TENSOR):
            tensor = tensor.to(dtype=self.dtype)
        if to_device:
            tensor = tensor.to(device=self.device)
        return tensor

    def get_partial_sharded(self, tensor_name: str, dim: int, to_device=True, to_dtype=True):
        name, spec = self._lookup(tensor_name)
        if spec is None:
            return super().get_partial_sharded(tensor_name, dim, to_device=to_device, to_dtype=to_dtype)
        world_size = self.process_group.size()
        rank = self.process_group.rank()
        start, stop = block_bounds(list(spec.shape)[dim], rank, world_size)
        if dim not in (0, 1):
            raise NotImplementedError("Let's make that generic when needed")
        full = self._store.take(spec)
        tensor = full[start:stop] if dim == 0 else full[:, start:stop]
        del full
        # TGI: cast first (its list here omits int64), then move.
        if to_dtype and not _keeps_dtype(tensor.dtype, _KEEP_PARTIAL_SHARDED):
            tensor = tensor.to(dtype=self.dtype)
        if to_device:
            tensor = tensor.to(device=self.device)
        return _owning(tensor)

    def get_sharded(self, tensor_name: str, dim: int, to_device=True, to_dtype=True):
        name, spec = self._lookup(tensor_name)
        if spec is None:
            return super().get_sharded(tensor_name, dim, to_device=to_device, to_dtype=to_dtype)
        world_size = self.process_group.size()
        size = list(spec.shape)[dim]  # a list, as safetensors' get_shape(): same IndexError text
        assert size % world_size == 0, \
            f"The choosen size {size} is not compatible with sharding on {world_size} shards"
        return self.get_partial_sharded(name, dim, to_device=to_device, to_dtype=to_dtype)

    def get_packed_sharded(self, tensor_name: str, dim: int, block_sizes: Union[int, List[int]],
                           to_dtype=True) -> "torch.Tensor":
        import torch

        _, spec = self._lookup(tensor_name)
        if spec is None:
            return super().get_packed_sharded(tensor_name, dim, block_sizes, to_dtype=to_dtype)
        slice_ = _StreamedSlice(self._store, spec)
        sizes = blocks_to_block_sizes(total_size=list(spec.shape)[dim], blocks=block_sizes)
        world_size = self.process_group.size()
        rank = self.process_group.rank()
        pieces = []
        offset = 0
        for size in sizes:
            assert size % world_size == 0, f"Prepacked tensor cannot be sharded across {world_size} shards"
            shard = size // world_size
            start, stop = offset + rank * shard, offset + (rank + 1) * shard
            if dim == 0:
                pieces.append(slice_[start:stop])
            elif dim == 1:
                pieces.append(slice_[:, start:stop])
            else:
                raise NotImplementedError("Currently only dim=0 or dim=1 is supported")
            offset += size
        tensor = torch.cat(pieces, dim=dim)
        del pieces, slice_
        # TGI: move first, then cast (unless a packed/quantized dtype).
        tensor = tensor.to(device=self.device)
        if to_dtype and not _keeps_dtype(tensor.dtype, _KEEP_PACKED_SHARDED):
            tensor = tensor.to(dtype=self.dtype)
        return tensor

    # ---- streaming control ----------------------------------------------------------------
    def wait_streamed(self) -> None:
        """Block until every tensor has been streamed; raise the streaming error, if any."""
        self._store.wait()

    @property
    def stream_stats(self) -> Dict[str, float]:
        """The core's numbers once streaming has finished (bytes, seconds, gbps, ...)."""
        return dict(self._store.stats)

    def close(self) -> None:
        """Stop streaming and drop every tensor not handed out yet."""
        self._finalizer()


class _RoutingWeights:
    """TGI's name resolution (``get_filename``, ``has_tensor``) without TGI, as a base for
    :class:`StandaloneStreamerWeights`. Semantics of TGI 3.0-3.3: the name, then
    ``f"{prefix}.{name}"`` when a prefix is set; for each, the name itself, then its aliases in
    order; the first present in ``routing`` wins."""

    routing: Dict[str, Any]
    aliases: Dict[str, List[str]]
    prefix: Optional[str]

    def get_filename(self, tensor_name: str):
        names = [tensor_name]
        if self.prefix is not None:
            names.append(f"{self.prefix}.{tensor_name}")
        for name in names:
            filename = self.routing.get(name)
            if filename is not None:
                return str(filename), name
            for alias in self.aliases.get(name, []):
                filename = self.routing.get(alias)
                if filename is not None:
                    return str(filename), alias
        raise RuntimeError(f"weight {tensor_name} does not exist")

    def has_tensor(self, tensor_name: str) -> bool:
        try:
            self.get_filename(tensor_name)
        except Exception:
            return False
        return True

    def _not_streamed(self, tensor_name: str):
        filename, name = self.get_filename(tensor_name)
        raise UsageError(f"tensor {name!r} of {filename} was added to routing after construction; only "
                            f"TGI's own Weights can read it (use StreamerWeights inside TGI)")

    def _get_slice(self, tensor_name):
        self._not_streamed(tensor_name)

    def get_shape(self, tensor_name):
        self._not_streamed(tensor_name)

    def get_tensor(self, tensor_name, to_device=True, to_dtype=True):
        self._not_streamed(tensor_name)

    def get_partial_sharded(self, tensor_name, dim, to_device=True, to_dtype=True):
        self._not_streamed(tensor_name)

    def get_sharded(self, tensor_name, dim, to_device=True, to_dtype=True):
        self._not_streamed(tensor_name)

    def get_packed_sharded(self, tensor_name, dim, block_sizes, to_dtype=True):
        self._not_streamed(tensor_name)


class StandaloneStreamerWeights(StreamedWeightsMixin, _RoutingWeights):
    """``StreamerWeights`` without TGI: same constructor and ``get_*`` methods (no weights-loader
    helpers such as ``get_weights_col``). For tests, benchmarks and scripts."""


def streamer_weights_class(module: Any = None) -> type:
    """``StreamerWeights``: :class:`StreamedWeightsMixin` over TGI's ``Weights`` (imports TGI).

    Built once per TGI module and cached on it, so the class stays the same object and its base
    stays TGI's original ``Weights`` even after the hook has replaced ``module.Weights``.
    """
    if module is None:
        module = importlib.import_module(TGI_WEIGHTS_MODULE)
    cached = module.__dict__.get("_loader_plugins_streamer_weights")
    if cached is not None:
        return cached
    base = module.Weights
    cls = type("StreamerWeights", (StreamedWeightsMixin, base), {
        "__module__": __name__,
        "__qualname__": "StreamerWeights",
        "__doc__": f"TGI's ``Weights`` ({base.__module__}) with its bytes streamed by loader_plugins.\n\n"
                   + (StreamedWeightsMixin.__doc__ or ""),
    })
    module._loader_plugins_streamer_weights = cls
    return cls
