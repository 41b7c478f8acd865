"""What every source must do, run over every source class (the pattern of fsspec's
``tests/abstract``: one set of tests, each source kind a parameter).

Kinds: local files (buffered, O_DIRECT, ``auto``); S3 (SeaweedFS on 127.0.0.1); the S3 object
through the cache tiers, first as a write-through source, then as a disk-tier hit; a source lent
by an opened checkpoint (:class:`~loader_plugins.core.sources.base.BorrowedSource`). A new
source (GCS, Azure...) adds one entry to ``KINDS`` and a factory; docs/architecture.md points
here. A kind that cannot honour a test says why in ``SKIPS``.

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

MiB = 1 << 20
SIZE = 3 * MiB + 12345          # not a multiple of any page or range size

KINDS = ["local-buffered", "local-direct", "local-auto", "borrowed-local", "s3", "s3-write-through",
         "s3-disk-tier"]
#: (kind, test) -> why the kind cannot honour it
SKIPS = {
    ("s3-disk-tier", "test_a_replaced_object_is_noticed"): "a published cache entry is immutable and keyed by "
                                                           "ETag: a replaced object is another entry",
}


def _data(seed: int = 0, size: int = SIZE) -> bytes:
    import random

    return random.Random(seed).randbytes(size)


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

    def s3(data: bytes, tiers: str | None):
        server = request.getfixturevalue("s3_server")
        request.getfixturevalue("s3_env")
        bucket = request.getfixturevalue("s3_bucket")
        client = server.client()
        key = f"contract/{uuid.uuid4().hex[:8]}.bin"
        client.put_object(Bucket=bucket, Key=key, Body=data)
        uri = f"s3://{bucket}/{key}"
        values = dict(s3_endpoint_url=server.endpoint_url, s3_region="us-east-1", s3_addressing_style="path",
                      request_timeout=20.0, max_retries=2, progress="off")
        if tiers is not None:
            values["cache_dir"] = str(tmp_path / "cache")
        cfg = StreamerConfig.from_dict(values)

        def replace(new: bytes) -> None:
            client.put_object(Bucket=bucket, Key=key, Body=new)
        if tiers is None:
            from loader_plugins.core.sources.s3 import S3Storage

            return S3Storage(cfg).open(uri), replace
        from loader_plugins.cache.disk import wait_for_commits
        from loader_plugins.cache.tiered import TieredStorage

        storage = TieredStorage(cfg)
        src = storage.open(uri)
        if tiers == "write-through":
            return src, replace
        buf = bytearray(len(data))          # a whole load fills the entry, then it is published
        src.read_into(0, memoryview(buf))
        src.check_unchanged()
        src.close()
        assert wait_for_commits(60)
        hit = TieredStorage(cfg).open(uri)
        assert hit.tier == "disk", hit.tier
        return hit, None

    def factory(data: bytes):
        if kind.startswith("local-"):
            src, replace = local(data, kind.split("-", 1)[1].replace("buffered", "off").replace("direct", "on"))
        elif kind == "borrowed-local":
            inner, replace = local(data, "auto")
            opened.append(inner)
            src = BorrowedSource(inner)
        elif kind == "s3":
            src, replace = s3(data, None)
        else:
            src, replace = s3(data, kind.split("-", 1)[1].replace("through", "through").replace("disk-tier", "disk"))
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
