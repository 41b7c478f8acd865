"""The Sink protocol (core/sinks/base.py): the reader lands bytes through whatever sinks the
caller builds, asking none of them what kind it is."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from loader_plugins import StreamerConfig
from loader_plugins.core.checkpoint import open_checkpoint
from loader_plugins.core.reader import StreamReader
from loader_plugins.core.sinks.base import Sink
from loader_plugins.core.sinks.cpu import CpuSink
from loader_plugins.errors import DestinationError


class BytesSink:
    """A sink for destinations that are plain ``bytearray`` s (no tensor at all). ``deferred``:
    bytes land in a private copy and reach the caller's bytearray only at :meth:`finish`."""

    allocates = False

    def __init__(self, deferred: bool = False):
        self.deferred = deferred
        self.private: dict[int, bytearray] = {}
        self.finished = self.closed = False
        self.cancelled: threading.Event | None = None

    def takes(self, spec, dest) -> bool:
        return isinstance(dest, bytearray)

    def check(self, spec, dest, block) -> bool:
        if len(dest) != spec.nbytes:
            raise DestinationError(f"{spec.name}: a bytearray of {spec.nbytes} bytes is needed, got {len(dest)}")
        return True

    def wrap(self, dest):
        return None

    def buffer_for(self, target):
        if not self.deferred:
            return memoryview(target)
        return memoryview(self.private.setdefault(id(target), bytearray(len(target))))

    def land(self, job, item, source, *, pool, cancelled) -> None:
        source.read_into(item.file_offset, job.buffer[item.dest_offset:item.dest_offset + item.length],
                         cancelled=cancelled)

    def reserved_bytes(self) -> int:
        return 0

    def attach(self, cancelled) -> None:
        self.cancelled = cancelled

    def finish(self) -> None:
        self.finished = True

    def report(self) -> dict:
        return {"finished": self.finished}

    def close(self) -> None:
        self.closed = True


def _checkpoint(tmp_path):
    tensors = {"a": torch.arange(10000, dtype=torch.float32), "b": torch.randn(17, 33).to(torch.bfloat16),
               "c": torch.arange(5, dtype=torch.int64), "empty": torch.empty(0, 4)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return str(path)


def test_both_shipped_sinks_implement_the_protocol():
    assert isinstance(CpuSink(StreamerConfig()), Sink)
    from loader_plugins.core.sinks.cuda import CudaSink

    for name in ("allocates", "deferred", "takes", "check", "wrap", "buffer_for", "land", "reserved_bytes",
                 "attach", "finish", "close"):
        assert hasattr(CudaSink, name), name
    assert isinstance(BytesSink(), Sink)


@pytest.mark.parametrize("deferred", [False, True])
def test_a_new_sink_lands_its_destinations_and_the_cpu_sink_the_rest(tmp_path, deferred):
    path = _checkpoint(tmp_path)
    expected = st_load_file(path)
    config = StreamerConfig(chunk_bytes=4096, concurrency=3, direct_io="off")
    sources: dict = {}
    specs = open_checkpoint(path, config, sources=sources).tensors
    sink = BytesSink(deferred)
    dests = {"a": bytearray(specs["a"].nbytes), "c": bytearray(specs["c"].nbytes)}
    order = []
    try:
        reader = StreamReader(list(specs.values()), sources, config, destinations=dests,
                              sinks=[sink, CpuSink(config)])
        got = {}
        for name, value in reader:
            order.append((name, sink.finished))
            got[name] = value
    finally:
        for src in sources.values():
            src.close()
    assert sink.cancelled is not None and sink.closed
    assert got["a"] is dests["a"] and got["c"] is dests["c"]
    if deferred:   # handed out after finish(), and never before
        assert all(done for name, done in order if name in dests)
        for name in dests:   # what finish() would publish: the private copy holds the bytes
            got[name] = sink.private[id(dests[name])]
    assert bytes(got["a"]) == expected["a"].numpy().tobytes()
    assert bytes(got["c"]) == expected["c"].numpy().tobytes()
    assert torch.equal(got["b"].view(torch.int16), expected["b"].view(torch.int16))   # the CPU sink's
    assert got["empty"].shape == (0, 4)


def test_a_bad_destination_is_refused_by_the_sink_that_takes_it_before_any_read(tmp_path):
    path = _checkpoint(tmp_path)
    config = StreamerConfig(direct_io="off")
    sources: dict = {}
    specs = open_checkpoint(path, config, sources=sources).tensors
    try:
        with pytest.raises(DestinationError, match="a bytearray of 40000 bytes is needed, got 3"):
            StreamReader(list(specs.values()), sources, config, destinations={"a": bytearray(3)},
                         sinks=[BytesSink(), CpuSink(config)])
    finally:
        for src in sources.values():
            src.close()


def test_the_reader_needs_a_sink_that_allocates(tmp_path):
    path = _checkpoint(tmp_path)
    config = StreamerConfig(direct_io="off")
    sources: dict = {}
    specs = open_checkpoint(path, config, sources=sources).tensors
    try:
        with pytest.raises(Exception, match="a sink that allocates"):
            StreamReader(list(specs.values()), sources, config, sinks=[BytesSink()])
    finally:
        for src in sources.values():
            src.close()
