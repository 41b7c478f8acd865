"""Resolve a checkpoint (a file, a list of files, a directory, an s3:// prefix) into shards
and their parsed headers, validating ``model.safetensors.index.json`` on the way."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Sequence, Union

from ..errors import HeaderError, IndexFileError, SourceError, SourceNotFoundError
from .gcpause import paused_gc
from .header import HEADER_LENGTH_BYTES, FileHeader, TensorSpec, header_length, parse_header
from .sources.base import Source, Storage, scheme_of, storage_for

if TYPE_CHECKING:
    from ..config import StreamerConfig

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
PathLike = Union[str, os.PathLike]


@dataclasses.dataclass
class Checkpoint:
    """The shards of one checkpoint, their headers and every tensor by name.

    Opened with ``open_checkpoint(..., keep_open=True)``, it also holds the open source of each
    shard (``sources``): a :class:`~loader_plugins.SafetensorsStreamer` or ``load_file`` given
    this checkpoint then reads through them, with no listing, HEAD or header read again; the
    checkpoint's owner closes them (:meth:`close`, or ``with``)."""

    files: list[str]
    headers: list[FileHeader]
    tensors: dict[str, TensorSpec]
    sources: dict[str, Source] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def is_open(self) -> bool:
        return bool(self.sources) and all(f in self.sources for f in self.files)

    def close(self) -> None:
        """Close the shards' sources (a checkpoint opened without ``keep_open`` has none)."""
        _close_all(self.sources)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_header_from(source: Source, max_header_bytes: int) -> FileHeader:
    """Parse the header of an open source (one read for headers up to ``header_prefetch``)."""
    size = source.size()
    first = source.read_bytes(0, min(size, max(HEADER_LENGTH_BYTES, source.header_prefetch)))
    n = header_length(first, file=source.uri, file_size=size, max_header_bytes=max_header_bytes)
    end = HEADER_LENGTH_BYTES + n
    if len(first) >= end:
        body = first[HEADER_LENGTH_BYTES:end]
    else:
        body = first[HEADER_LENGTH_BYTES:] + source.read_bytes(len(first), end - len(first))
    return parse_header(body, file=source.uri, file_size=size)


def read_header(uri: PathLike, config: "StreamerConfig") -> FileHeader:
    uri = os.fspath(uri)
    storage = storage_for(uri, config)
    try:
        with storage.open(uri) as src:
            return read_header_from(src, config.max_header_bytes)
    finally:
        storage.close()


def expand(paths: PathLike | Sequence[PathLike], config: "StreamerConfig") -> tuple[list[str], dict | None]:
    """Turn the user's argument into a list of shard URIs (and the index's weight map, if any)."""
    if isinstance(paths, (str, os.PathLike)):
        items = [os.fspath(paths)]
    else:
        items = [os.fspath(p) for p in paths]
        if not items:
            raise SourceError("no checkpoint files given")
    files: list[str] = []
    weight_map: dict | None = None
    for item in items:
        storage = storage_for(item, config)
        try:
            names = storage.listing(item)     # one LIST on S3: a directory, or None
            if names is not None:
                shard_files, wm = _expand_dir(storage, item, names)
                files.extend(shard_files)
                if wm is not None:
                    weight_map = {**(weight_map or {}), **wm}
            elif item.endswith(".json"):
                shard_files, wm = _expand_index(storage, item)
                files.extend(shard_files)
                weight_map = {**(weight_map or {}), **wm}
            else:
                if not storage.exists(item):
                    raise SourceNotFoundError(2, f"{item}: no such file; pass a .safetensors file, a checkpoint "
                                         f"directory or a list of files")
                files.append(item)
        finally:
            storage.close()
    seen: set[str] = set()
    unique = [f for f in files if not (f in seen or seen.add(f))]
    return unique, weight_map


def _expand_dir(storage: Storage, directory: str, names: list[str]) -> tuple[list[str], dict | None]:
    if INDEX_NAME in names:
        return _expand_index(storage, storage.join(directory, INDEX_NAME), listed=set(names))
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if not shards:
        raise SourceNotFoundError(2, f"{directory}: no *.safetensors files and no {INDEX_NAME} in this directory")
    return [storage.join(directory, n) for n in shards], None


def _expand_index(storage: Storage, index_uri: str, listed: set[str] | None = None
                  ) -> tuple[list[str], dict[str, str]]:
    """The shards an index names. ``listed``: the names in the index's directory, when it was
    just listed (a shard directly in it is then checked against the listing, not asked for)."""
    raw = storage.read_small(index_uri)
    try:
        index = json.loads(raw)
    except ValueError as exc:
        raise IndexFileError(f"{index_uri}: not valid JSON ({exc}); re-download the index file") from exc
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise IndexFileError(f"{index_uri}: must be an object with a \"weight_map\" object mapping tensor names "
                             f"to shard file names")
    weight_map = index["weight_map"]
    directory = index_uri.rsplit("/", 1)[0] if "/" in index_uri else "."
    if scheme_of(index_uri) == "file":
        directory = os.path.dirname(index_uri) or "."
    shard_uris: dict[str, str] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(tensor, str) or not isinstance(shard, str) or not shard:
            raise IndexFileError(f"{index_uri}: weight_map entry {tensor!r}: {shard!r} must map a tensor name to "
                                 f"a shard file name")
        if shard not in shard_uris:
            shard_uris[shard] = _safe_join(storage, directory, shard, index_uri, tensor)
    for shard, uri in shard_uris.items():
        present = shard in listed if listed is not None and "/" not in shard else storage.exists(uri)
        if not present:
            who = next(t for t, s in weight_map.items() if s == shard)
            raise IndexFileError(f"{index_uri}: shard {shard!r} (holding tensor {who!r} and others) does not exist "
                                 f"at {uri}; the checkpoint is incomplete, download the missing shard")
    resolved = {t: shard_uris[s] for t, s in weight_map.items()}
    return sorted(shard_uris.values()), resolved


def _safe_join(storage: Storage, directory: str, shard: str, index_uri: str, tensor: str) -> str:
    parts = shard.split("/")
    unsafe = (shard.startswith("/") or "\\" in shard or "\x00" in shard or ":" in shard
              or any(p in ("", ".", "..") for p in parts))
    if unsafe:
        raise IndexFileError(f"{index_uri}: shard name {shard!r} (tensor {tensor!r}) points outside the checkpoint "
                             f"directory or is not a plain relative file name; fix the index file")
    joined = storage.join(directory, shard)
    if scheme_of(joined) == "file":
        real_dir = os.path.realpath(directory)
        real = os.path.realpath(joined)
        if os.path.commonpath([real_dir, real]) != real_dir:
            raise IndexFileError(f"{index_uri}: shard {shard!r} (tensor {tensor!r}) resolves to {real}, outside the "
                                 f"checkpoint directory {real_dir} (a symlink?); refusing to read it")
    return joined


def open_checkpoint(paths: PathLike | Sequence[PathLike], config: "StreamerConfig",
                    sources: dict[str, Source] | None = None, *, keep_open: bool = False) -> Checkpoint:
    """Resolve ``paths`` and parse every shard's header (concurrently).

    When ``sources`` is given, the opened sources are stored in it (uri -> Source) so the reader
    can reuse them; ``keep_open=True`` keeps them in the returned checkpoint (its ``sources``,
    closed by :meth:`Checkpoint.close`); otherwise they are closed.
    """
    if keep_open and sources is None:
        sources = {}
    files, headers, weight_map = open_headers(paths, config, sources)
    try:
        checkpoint = merge_headers(files, headers, weight_map)
    except BaseException:
        _close_all(sources)
        raise
    if keep_open:
        checkpoint.sources = sources
    return checkpoint


def open_sources(files: Sequence[str], config: "StreamerConfig") -> dict[str, Source]:
    """Open a source for each of ``files`` (uri -> Source), concurrently; nothing is read. Each
    source keeps its storage alive; on an error every source opened is closed again."""
    storages: dict[str, Storage] = {}
    sources: dict[str, Source] = {}
    error: BaseException | None = None
    try:
        for uri in files:
            scheme = scheme_of(uri)
            if scheme not in storages:
                storages[scheme] = storage_for(uri, config)
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
            futures = {uri: pool.submit(storages[scheme_of(uri)].open, uri) for uri in files}
        for uri, future in futures.items():
            try:
                sources[uri] = future.result()
            except BaseException as exc:  # noqa: BLE001 - the first is raised once all are closed
                error = error or exc
    except BaseException as exc:  # noqa: BLE001
        error = exc
    if error is not None:
        _close_all(sources)
        for storage in storages.values():
            storage.close()
        raise error
    return sources


def open_headers(paths: PathLike | Sequence[PathLike], config: "StreamerConfig",
                 sources: dict[str, Source] | None = None) -> tuple[list[str], list[FileHeader], dict | None]:
    """Resolve ``paths`` into shard URIs and parse each shard's header: ``(files, headers,
    weight_map)``; nothing is checked across shards (see :func:`merge_headers`)."""
    files, weight_map = expand(paths, config)
    storages: dict[str, Storage] = {}

    def parse(uri: str) -> FileHeader:
        storage = storages[scheme_of(uri)]
        src = storage.open(uri)
        try:
            header = read_header_from(src, config.max_header_bytes)
        except BaseException:
            src.close()
            raise
        if sources is not None:
            sources[uri] = src
        else:
            src.close()
        return header

    for uri in files:
        scheme = scheme_of(uri)
        if scheme not in storages:
            storages[scheme] = storage_for(uri, config)
    try:
        if len(files) == 1 or all(scheme_of(f) == "file" for f in files):
            # parsing is Python work, and a local read is short: threads would only take turns
            with paused_gc():
                headers = [parse(f) for f in files]
        else:
            with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
                headers = list(pool.map(parse, files))
    except BaseException:
        _close_all(sources)
        raise
    finally:
        if sources is None:  # opened sources keep their storage alive through their own reference
            for storage in storages.values():
                storage.close()
    return files, headers, weight_map


def _close_all(sources: dict[str, Source] | None) -> None:
    if sources:
        for src in sources.values():
            src.close()
        sources.clear()


def merge_headers(files: list[str], headers: list[FileHeader], weight_map: dict | None) -> Checkpoint:
    """One checkpoint from its shards' headers: each tensor in one shard only, and where
    ``model.safetensors.index.json`` maps it."""
    tensors: dict[str, TensorSpec] = {}
    for header in headers:
        before = len(tensors)
        tensors.update((spec.name, spec) for spec in header.tensors)
        if len(tensors) != before + len(header.tensors):   # a name seen before: say which, and where
            firsts = {}
            for spec in (s for h in headers for s in h.tensors):
                other = firsts.setdefault(spec.name, spec)
                if other is not spec:
                    raise HeaderError(f"tensor {spec.name!r} appears in both {other.file} and {spec.file}; a "
                                      f"checkpoint must hold each tensor once (remove the stale shard)")
    if weight_map is not None:
        wrong = [n for n, uri in weight_map.items() if (s := tensors.get(n)) is None or s.file != uri]
        if wrong:
            name, uri = wrong[0], weight_map[wrong[0]]
            spec = tensors.get(name)
            where = f"but it is not in {uri}" if spec is None else f"but it is in {spec.file}"
            raise IndexFileError(f"{INDEX_NAME} maps tensor {name!r} to {uri} {where}; the index and the "
                                 f"shards disagree, re-download the checkpoint")
        extra = [n for n in tensors if n not in weight_map]
        if extra:
            log.warning("%d tensor(s) in the shards are not listed in %s (e.g. %r); loading them too",
                        len(extra), INDEX_NAME, extra[0])
    return Checkpoint(files=files, headers=headers, tensors=tensors)

