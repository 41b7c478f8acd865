"""Peer loaders and the plain-read ceiling, one function each, for the benchmark.

Every loader has the same shape: it takes the checkpoint (a list of ``.safetensors`` paths, or
the peer's own file), loads ALL tensors into CPU memory the caller owns, touches every page of
every result (:func:`touch_all`) and returns the number of bytes loaded. Time the call; nothing
here times itself. Results are dropped on return, so each call starts from fresh memory.

Peers are imported inside the functions: this module imports with none of them installed, and a
missing one raises ``RuntimeError`` naming the extra to install (``loader-plugins[bench]``).

Bytes returned: tensor bytes for the tensor loaders, whole-file bytes (headers included, a few
KiB more) for :func:`pread_ceiling`.

Quirks, measured with the installed versions:

* safetensors 0.8 ``load_file`` returns lazy mmap views: nothing is read until a page is
  touched, and the pages belong to the page cache. :func:`safetensors_clone` clones each tensor,
  which is what a loader that must own its memory pays.
* Run:ai Model Streamer 0.17 reads ``RUNAI_STREAMER_CONCURRENCY`` when a streamer is created
  (``SafetensorsStreamer.__enter__`` -> ``runai_file_streamer_start``), not once per process: its
  debug log shows each new streamer resolving the value afresh, so :func:`runai` sets it for the
  call and restores it; no subprocess is needed. ``RUNAI_STREAMER_MEMORY_LIMIT`` is read per
  ``stream_files`` call. Settings that ARE process-wide in 0.17: the filesystem read strategy
  (``RUNAI_STREAMER_FS_STRATEGY``, fixed at the first request) and the library path. Run:ai reads
  with O_DIRECT (io_uring), so a warm page cache does not help it.
* fastsafetensors 0.5 tensors share ownership of their backing buffer (documented in
  ``copy_files_to_device``): they stay valid after the loader is closed, no clone needed.
* tensorizer reads its own format: convert once with :func:`tensorizer_prepare` (untimed).
"""

from __future__ import annotations

import contextlib
import importlib
import mmap
import os
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = [
    "aligned_buffers",
    "evict",
    "fastsafetensors",
    "pread_ceiling",
    "runai",
    "runai_object_store",
    "runai_s3",
    "safetensors_clone",
    "tensorizer",
    "tensorizer_prepare",
    "touch_all",
]

PathLike = Union[str, os.PathLike]

PAGE = 4096
_DIRECT_ALIGN = 4096  # O_DIRECT: offset, length and address multiples of the logical block size


def _require(module: str, dist: str) -> Any:
    try:
        return importlib.import_module(module)
    except (ImportError, OSError) as e:  # OSError: a wheel whose native library fails to load
        raise RuntimeError(
            f"{dist} is not installed (import {module!r} failed: {e}); "
            f"install loader-plugins[bench], or pip install {dist}"
        ) from e


def _paths(paths: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = [os.fspath(p) for p in paths]
    if not out:
        raise ValueError("no checkpoint files given")
    return out


@contextlib.contextmanager
def _env(**values: Optional[str]) -> Iterator[None]:
    """Set environment variables for the block, then restore them (None = leave unset)."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------------------------
# Touching and evicting
# --------------------------------------------------------------------------------------------


def _touch_bytes(flat: Any, nbytes: int) -> int:
    # One byte per 4 KiB from the start, and the last byte: every page the range spans, whatever
    # its alignment. Returns a checksum so the reads cannot be skipped.
    return int(flat[::PAGE].sum()) + int(flat[nbytes - 1])


def touch_all(tensors: Union[Mapping[str, Any], Iterable[Any]]) -> int:
    """Read one byte of every page of every tensor or buffer; return their total bytes.

    Accepts a mapping (its values are used) or an iterable of torch tensors or objects with the
    buffer protocol (``bytearray``, ``mmap``, numpy arrays). For an mmap-backed tensor this is
    what actually reads the file.
    """
    if isinstance(tensors, Mapping):
        tensors = tensors.values()
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            nbytes = t.numel() * t.element_size()
            if nbytes == 0:
                continue
            if not t.is_contiguous():
                raise ValueError("touch_all needs contiguous tensors (a non-contiguous one is a view of "
                                 "memory it does not span); pass tensor.contiguous()")
            _touch_bytes(t.reshape(-1).view(torch.uint8), nbytes)
        else:
            flat = np.frombuffer(t, dtype=np.uint8)
            nbytes = flat.size
            if nbytes == 0:
                continue
            _touch_bytes(flat, nbytes)
        total += nbytes
    return total


def evict(paths: Union[PathLike, Sequence[PathLike]]) -> None:
    """Drop the files' pages from the page cache (fsync, then POSIX_FADV_DONTNEED) for a cold run.

    Dirty pages cannot be dropped, hence the fsync. Pages mapped by a live process stay. The VM
    host may still cache the disk underneath: "cold" here means cold to this kernel.
    """
    for path in _paths(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


def safetensors_clone(paths: Union[PathLike, Sequence[PathLike]]) -> int:
    """safetensors ``load_file`` per file, each tensor cloned into memory the caller owns."""
    st_torch = _require("safetensors.torch", "safetensors")
    owned: List[torch.Tensor] = []
    for path in _paths(paths):
        views = st_torch.load_file(path, device="cpu")
        owned.extend(t.clone() for t in views.values())
        del views
    return touch_all(owned)


def runai(
    paths: Union[PathLike, Sequence[PathLike]],
    concurrency: int = 16,
    *,
    memory_limit: Optional[int] = None,
) -> int:
    """Run:ai Model Streamer ``SafetensorsStreamer`` with ``RUNAI_STREAMER_CONCURRENCY`` for this call.

    ``concurrency``: Run:ai's worker count (its default is 16). ``memory_limit``: bytes for
    ``RUNAI_STREAMER_MEMORY_LIMIT`` (its ring of read buffers; default 40 GB, -1 unlimited).
    Tensors are owned (``owned=True``, Run:ai's default): each is a view into a ring slot that
    the streamer never reuses. Both variables are restored on return.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    streamer_mod = _require("runai_model_streamer", "runai-model-streamer")
    paths = _paths(paths)
    limit = None if memory_limit is None else str(int(memory_limit))
    tensors: List[torch.Tensor] = []
    with _env(RUNAI_STREAMER_CONCURRENCY=str(int(concurrency)),
              **({"RUNAI_STREAMER_MEMORY_LIMIT": limit} if limit is not None else {})):
        with streamer_mod.SafetensorsStreamer() as streamer:
            streamer.stream_files(paths, device="cpu")
            for _name, tensor in streamer.get_tensors():
                tensors.append(tensor)
    return touch_all(tensors)


def runai_s3(
    uris: Union[str, Sequence[str]],
    concurrency: int = 16,
    endpoint: Optional[str] = None,
    *,
    virtual_addressing: Optional[bool] = None,
    region: Optional[str] = None,
    profile: Optional[str] = None,
    memory_limit: Optional[int] = None,
) -> int:
    """Run:ai Model Streamer on ``s3://`` URIs (needs ``runai-model-streamer-s3``), like :func:`runai`.

    Run:ai's S3 backend (the AWS C++ SDK) takes its settings from the environment only; these are
    set for the call and restored on return: ``endpoint`` -> ``AWS_ENDPOINT_URL``,
    ``virtual_addressing`` -> ``RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING`` (``False`` for path-style
    servers such as SeaweedFS or MinIO; None leaves it alone), ``region`` -> ``AWS_REGION``,
    ``profile`` -> ``AWS_PROFILE``; ``AWS_EC2_METADATA_DISABLED=true`` whenever ``endpoint`` is given
    (no instance metadata off AWS). Credentials come from the usual ``AWS_*`` variables.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    uris = [uris] if isinstance(uris, str) else list(uris)
    if not uris or not all(str(u).lower().startswith("s3://") for u in uris):
        raise ValueError(f"runai_s3 takes s3:// URIs, got {uris[:3]}")
    streamer_mod = _require("runai_model_streamer", "runai-model-streamer")
    _require("runai_model_streamer_s3", "runai-model-streamer-s3")
    env: dict = {"RUNAI_STREAMER_CONCURRENCY": str(int(concurrency))}
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
        env["AWS_EC2_METADATA_DISABLED"] = "true"
    if virtual_addressing is not None:
        env["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] = "1" if virtual_addressing else "0"
    if region:
        env["AWS_REGION"] = region
    if profile:
        env["AWS_PROFILE"] = profile
    if memory_limit is not None:
        env["RUNAI_STREAMER_MEMORY_LIMIT"] = str(int(memory_limit))
    tensors: List[torch.Tensor] = []
    with _env(**env):
        with streamer_mod.SafetensorsStreamer() as streamer:
            streamer.stream_files(uris, device="cpu")
            for _name, tensor in streamer.get_tensors():
                tensors.append(tensor)
    return touch_all(tensors)


def runai_object_store(
    uris: Union[str, Sequence[str]],
    concurrency: int,
    *,
    plugin: str,
    env: Mapping[str, Optional[str]],
) -> int:
    """Run:ai Model Streamer on ``gs://`` or ``az://`` URIs, like :func:`runai_s3`: ``plugin`` is the
    backend's distribution (``runai-model-streamer-gcs``, ``runai-model-streamer-azure``), ``env``
    the variables its C++ backend reads (endpoint, credentials; set for the call, then restored)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    uris = [uris] if isinstance(uris, str) else list(uris)
    streamer_mod = _require("runai_model_streamer", "runai-model-streamer")
    _require(plugin.replace("-", "_"), plugin)
    tensors: List[torch.Tensor] = []
    with _env(RUNAI_STREAMER_CONCURRENCY=str(int(concurrency)), **dict(env)):
        with streamer_mod.SafetensorsStreamer() as streamer:
            streamer.stream_files(uris, device="cpu")
            for _name, tensor in streamer.get_tensors():
                tensors.append(tensor)
    return touch_all(tensors)


def tensorizer_prepare(paths: Union[PathLike, Sequence[PathLike]], out_path: PathLike) -> Path:
    """Serialize the checkpoint's tensors into one tensorizer file (do it once, untimed)."""
    tz = _require("tensorizer", "tensorizer")
    st = _require("safetensors", "safetensors")
    state = {}
    handles = []
    try:
        for path in _paths(paths):
            f = st.safe_open(path, framework="pt", device="cpu")
            handles.append(f)
            for name in f.keys():
                state[name] = f.get_tensor(name)  # mmap views: read as the serializer writes
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".partial")
        serializer = tz.TensorSerializer(os.fspath(tmp))
        try:
            serializer.write_state_dict(state)
        finally:
            serializer.close()
        os.replace(tmp, out_path)
    finally:
        state.clear()
        handles.clear()
    return out_path


def tensorizer(tensorized_path: PathLike, *, num_readers: Optional[int] = None) -> int:
    """tensorizer ``TensorDeserializer`` of a file from :func:`tensorizer_prepare`, eagerly, to CPU.

    ``num_readers``: tensorizer's reader threads (None: its own dynamic choice).
    """
    tz = _require("tensorizer", "tensorizer")
    deserializer = tz.TensorDeserializer(
        os.fspath(tensorized_path), device="cpu", lazy_load=False, num_readers=num_readers
    )
    try:
        tensors = list(deserializer.values())
    finally:
        deserializer.close()
    return touch_all(tensors)


def fastsafetensors(
    paths: Union[PathLike, Sequence[PathLike]],
    *,
    max_threads: int = 16,
    bbuf_size_kb: int = 16 * 1024,
) -> int:
    """fastsafetensors ``SafeTensorsFileLoader`` on CPU without GDS (``nogds=True``).

    ``max_threads`` and ``bbuf_size_kb`` are its own knobs, at their defaults. The tensors share
    ownership of the loader's buffers and stay valid after it is closed (fastsafetensors 0.5).
    """
    fst = _require("fastsafetensors", "fastsafetensors")
    loader = fst.SafeTensorsFileLoader(
        fst.SingleGroup(), "cpu", nogds=True, max_threads=max_threads, bbuf_size_kb=bbuf_size_kb
    )
    try:
        loader.add_filenames({0: _paths(paths)})
        buffers = loader.copy_files_to_device()
        try:
            tensors = [buffers.get_tensor(name) for name in loader.get_keys()]
        finally:
            buffers.close()
    finally:
        loader.close()
    return touch_all(tensors)


# --------------------------------------------------------------------------------------------
# The ceiling: plain parallel reads
# --------------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def aligned_buffers(paths: Union[PathLike, Sequence[PathLike]]) -> List[mmap.mmap]:
    """One page-aligned anonymous buffer per file, big enough for an O_DIRECT read of all of it.

    For :func:`pread_ceiling`'s ``dest``: allocate once, run once to touch them, then time the
    runs that read into already-touched memory.
    """
    return [mmap.mmap(-1, max(_DIRECT_ALIGN, _round_up(os.path.getsize(p), _DIRECT_ALIGN)))
            for p in _paths(paths)]


def _writable_view(buf: Any) -> memoryview:
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ValueError("dest tensors must be contiguous CPU tensors")
        buf = buf.reshape(-1).view(torch.uint8).numpy()
    view = memoryview(buf)
    if view.readonly:
        raise ValueError("dest buffers must be writable")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def _read_range(fd: int, view: memoryview, offset: int, length: int, direct: bool, path: str) -> None:
    """Read ``length`` bytes at ``offset`` into ``view[offset:]``, looping over short reads."""
    done = 0
    while done < length:
        want = length - done
        if direct:
            want = _round_up(want, _DIRECT_ALIGN)  # the tail of the file: the kernel stops at EOF
        n = os.preadv(fd, [view[offset + done : offset + done + want]], offset + done)
        if n == 0:
            raise OSError(f"{path}: unexpected end of file at byte {offset + done} (wanted {length - done} more)")
        done += n


def pread_ceiling(
    paths: Union[PathLike, Sequence[PathLike]],
    threads: int = 4,
    chunk_bytes: int = 16 << 20,
    direct: bool = False,
    dest: Optional[Sequence[Any]] = None,
) -> int:
    """Read every file whole with ``threads`` threads of ``os.preadv``, ``chunk_bytes`` at a time.

    No parsing, no tensors: the ceiling a loader is compared with. Without ``dest`` each file goes
    into a fresh buffer (``torch.empty`` for buffered reads, as a loader would allocate; an
    anonymous ``mmap``, page-aligned, for O_DIRECT), so first-touch page faults are part of the
    cost. ``dest``: one preallocated buffer per file (tensor, numpy array, bytearray, mmap), at
    least the file's size; with ``direct`` page-aligned and sized to a 4 KiB multiple, e.g. from
    :func:`aligned_buffers`. Returns the bytes read (whole files).
    """
    paths = _paths(paths)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if chunk_bytes < 1 or (direct and chunk_bytes % _DIRECT_ALIGN):
        raise ValueError(f"chunk_bytes must be positive{' and a multiple of 4096 with direct' if direct else ''}, "
                         f"got {chunk_bytes}")
    sizes = [os.path.getsize(p) for p in paths]
    need = [_round_up(s, _DIRECT_ALIGN) if direct else s for s in sizes]

    if dest is None:
        if direct:
            buffers: List[Any] = [mmap.mmap(-1, max(_DIRECT_ALIGN, n)) for n in need]
        else:
            buffers = [torch.empty(n, dtype=torch.uint8) for n in need]
    else:
        if len(dest) != len(paths):
            raise ValueError(f"dest has {len(dest)} buffers for {len(paths)} files")
        buffers = list(dest)
    views = [_writable_view(b) for b in buffers]
    for path, view, n in zip(paths, views, need):
        if view.nbytes < n:
            raise ValueError(f"dest buffer for {path} holds {view.nbytes} bytes, needs {n}")
        if direct and _address(view) % _DIRECT_ALIGN:
            raise ValueError(f"dest buffer for {path} is not {_DIRECT_ALIGN}-byte aligned (O_DIRECT); "
                             f"use aligned_buffers()")

    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds: List[int] = []
    try:
        for path in paths:
            try:
                fds.append(os.open(path, flags))
            except OSError as e:
                if direct:
                    raise OSError(e.errno, f"{path}: cannot open with O_DIRECT ({e.strerror}); "
                                           f"the filesystem may not support it, use direct=False") from e
                raise
        jobs = [(i, off, min(chunk_bytes, size - off))
                for i, size in enumerate(sizes) for off in range(0, size, chunk_bytes)]
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pread") as pool:
            futures = [pool.submit(_read_range, fds[i], views[i], off, n, direct, paths[i]) for i, off, n in jobs]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in done:
                f.result()  # the first failure reaches the caller
    finally:
        for fd in fds:
            os.close(fd)
    touch_all(view[:size] for view, size in zip(views, sizes))
    return sum(sizes)
