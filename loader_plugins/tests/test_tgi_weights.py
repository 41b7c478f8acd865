"""StreamerWeights' semantics without TGI: the expectations are TGI 3.x's documented behaviour
(``text_generation_server/utils/weights.py``), written out here independently:

* ``get_tensor``: cast to ``dtype`` unless float8_e4m3fn/int8/int16/int32/int64, then move.
* ``get_partial_sharded``: ``block = ceil(size / world)``, rank r takes ``[r*block, (r+1)*block)``
  along dim 0 or 1 (clamped); cast unless float8_e4m3fn/int8/int16/int32 (int64 IS cast), then move.
* ``get_sharded``: asserts ``size % world == 0``, then as ``get_partial_sharded``.
* ``get_packed_sharded``: blocks (an int count or proportions) each split across ranks, the rank's
  pieces concatenated; moved first, then cast unless float8_e4m3fn/int8/int16/int32/int64.
* names: the name, its aliases, then ``prefix.name`` and its aliases; else ``RuntimeError``.

The integration test ``integration_tests/test_tgi_weights_real.py`` checks the same against TGI.
"""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loader_plugins.errors import ConfigError, StreamerError
from loader_plugins.tests.tgi_helpers import write_checkpoint
from loader_plugins.tgi_adapter.settings import settings_from_env
from loader_plugins.tgi_adapter.tgi_source import FakeProcessGroup
from loader_plugins.tgi_adapter.weights import (
    StandaloneStreamerWeights,
    StreamedWeightsMixin,
    block_bounds,
    blocks_to_block_sizes,
)

SETTINGS = settings_from_env({})
KEEP_TENSOR = {torch.float8_e4m3fn, torch.int8, torch.int16, torch.int32, torch.int64}
KEEP_PARTIAL = {torch.float8_e4m3fn, torch.int8, torch.int16, torch.int32}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tgi"))


def make(files, rank=0, world=1, dtype=torch.float16, **kw):
    kw.setdefault("settings", SETTINGS)
    return StandaloneStreamerWeights(files, "cpu", dtype, FakeProcessGroup(rank, world), None, **kw)


def assert_same(got: torch.Tensor, want: torch.Tensor):
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (got.dtype, got.shape, want.dtype,
                                                                               want.shape)
    assert got.device == want.device
    if want.numel():
        assert torch.equal(got.contiguous().view(-1).view(torch.uint8), want.contiguous().view(-1).view(torch.uint8))


# ---- arithmetic --------------------------------------------------------------------------------

@pytest.mark.parametrize("size,world,expected", [
    (8, 2, [(0, 4), (4, 8)]),
    (10, 4, [(0, 3), (3, 6), (6, 9), (9, 12)]),      # last rank: rows 9..10 only after clamping
    (5, 4, [(0, 2), (2, 4), (4, 6), (6, 8)]),        # rank 3 gets nothing
    (3, 1, [(0, 3)]),
])
def test_block_bounds_are_ceil_blocks(size, world, expected):
    assert [block_bounds(size, r, world) for r in range(world)] == expected


def test_blocks_to_block_sizes():
    assert blocks_to_block_sizes(1024, [2, 1, 1]) == [512, 256, 256]
    assert blocks_to_block_sizes(12, 2) == [6, 6]
    with pytest.raises(AssertionError, match=r"^Cannot split 10 in proportional blocks: \[2, 1\]$"):
        blocks_to_block_sizes(10, [2, 1])
    with pytest.raises(AssertionError, match="^Prepacked is not divisible by 3$"):
        blocks_to_block_sizes(10, 3)


# ---- routing and names -------------------------------------------------------------------------

def test_routing_maps_every_tensor_to_its_file(ckpt):
    files, tensors = ckpt
    w = make(files)
    assert set(w.routing) == set(tensors)
    for name, filename in w.routing.items():
        with safe_open(filename, "pt") as f:
            assert name in f.keys()
    w.close()


def test_duplicate_tensor_across_files_is_tgis_error(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.zeros(2)}, str(a))
    save_file({"x": torch.ones(2)}, str(b))
    with pytest.raises(RuntimeError, match=f"^Key x was found in multiple files: {b} and {a}$"):
        make([a, b])


def test_name_resolution_prefix_and_aliases(ckpt):
    files, tensors = ckpt
    w = make(files, prefix="model", aliases={"layers.0.self_attn.o_proj.weight": ["lm_head.weight"],
                                             "tied": ["nope", "lm_head.weight"]})
    assert w.get_filename("embed_tokens.weight") == (files[0], "model.embed_tokens.weight")
    assert w.get_filename("lm_head.weight") == (files[1], "lm_head.weight")
    # the unprefixed name's aliases come before the prefixed name
    assert w.get_filename("layers.0.self_attn.o_proj.weight") == (files[1], "lm_head.weight")
    assert w.get_filename("layers.0.mlp.gate_up_proj.weight")[1] == "model.layers.0.mlp.gate_up_proj.weight"
    assert w.get_filename("tied") == (files[1], "lm_head.weight")
    assert w.has_tensor("norm.weight") and not w.has_tensor("nope")
    with pytest.raises(RuntimeError, match="^weight nope does not exist$"):
        w.get_tensor("nope")
    assert_same(w.get_tensor("tied", to_dtype=False), tensors["lm_head.weight"])
    w.close()


# ---- get_tensor / get_shape / _get_slice -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_get_tensor_casts_all_but_the_exempt_dtypes(ckpt, dtype):
    files, tensors = ckpt
    w = make(files, dtype=dtype)
    for name, ref in tensors.items():
        want = ref if ref.dtype in KEEP_TENSOR else ref.to(dtype)
        assert_same(w.get_tensor(name), want)
        assert_same(w.get_tensor(name, to_dtype=False), ref)      # second call: re-read from the file
    w.close()


def test_get_shape_and_slice_use_the_header(ckpt):
    files, tensors = ckpt
    w = make(files)
    for name, ref in tensors.items():
        assert w.get_shape(name) == list(ref.shape)
        s = w._get_slice(name)
        assert s.get_shape() == list(ref.shape)
        with safe_open(w.routing[name], "pt") as f:
            assert s.get_dtype() == f.get_slice(name).get_dtype()
    # nothing was taken: every tensor is still served from the stream
    w.wait_streamed()
    assert len(w._store._ready) == len(tensors)
    w.close()


@pytest.mark.parametrize("key", [slice(None), slice(1, 3), slice(-2, None), slice(5, 100), slice(3, 1),
                                 (slice(None), slice(1, 3)), (slice(None), slice(-2, None)), 0, Ellipsis])
def test_slice_indexing_matches_safetensors(ckpt, key):
    files, tensors = ckpt
    w = make(files)
    for name, ref in tensors.items():
        with safe_open(w.routing[name], "pt") as f:
            try:
                want = f.get_slice(name)[key]
            except Exception as exc:  # noqa: BLE001
                with pytest.raises(type(exc)):
                    w._get_slice(name)[key]
                continue
        assert_same(w._get_slice(name)[key], want)
    w.close()


# ---- sharding ----------------------------------------------------------------------------------

def _expected_partial(ref, dim, rank, world, dtype, to_dtype=True):
    size = ref.shape[dim]
    block = -(-size // world)
    piece = ref[rank * block:(rank + 1) * block] if dim == 0 else ref[:, rank * block:(rank + 1) * block]
    if to_dtype and piece.dtype not in KEEP_PARTIAL:
        piece = piece.to(dtype)
    return piece


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_get_partial_sharded_ceil_blocks(ckpt, world):
    files, tensors = ckpt
    for rank in range(world):
        w = make(files, rank, world)
        for name, ref in tensors.items():
            for dim in (0, 1):
                if ref.dim() <= dim:
                    with pytest.raises(IndexError):
                        w.get_partial_sharded(name, dim)
                    continue
                got = w.get_partial_sharded(name, dim)
                assert_same(got, _expected_partial(ref, dim, rank, world, torch.float16))
                assert got.is_contiguous()
                assert got.untyped_storage().nbytes() == got.numel() * got.element_size()  # owns its memory
                assert_same(w.get_partial_sharded(name, dim, to_dtype=False),
                            _expected_partial(ref, dim, rank, world, torch.float16, to_dtype=False))
        w.close()


def test_partial_sharded_casts_int64_unlike_get_tensor(ckpt):
    files, tensors = ckpt
    w = make(files, 0, 2)
    assert w.get_tensor("quant.g_idx").dtype == torch.int64
    got = w.get_partial_sharded("quant.g_idx", 0)
    assert got.dtype == torch.float16
    assert_same(got, tensors["quant.g_idx"][:4].to(torch.float16))
    assert w.get_partial_sharded("quant.qweight", 1).dtype == torch.int32
    w.close()


def test_get_partial_sharded_rejects_other_dims(ckpt):
    files, _ = ckpt
    w = make(files, 0, 2)
    with pytest.raises(NotImplementedError, match="^Let's make that generic when needed$"):
        w.get_partial_sharded("conv.weight", 2)
    with pytest.raises(IndexError, match="^list index out of range$"):
        w.get_partial_sharded("model.norm.weight", 1)
    # the failed calls took nothing: the tensor is still served from the stream
    assert_same(w.get_tensor("conv.weight", to_dtype=False), ckpt[1]["conv.weight"])
    w.close()


def test_get_sharded_requires_divisible_size(ckpt):
    files, tensors = ckpt
    w = make(files, 1, 4)
    with pytest.raises(AssertionError, match="^The choosen size 10 is not compatible with sharding on 4 shards$"):
        w.get_sharded("model.embed_tokens.weight", 0)
    w2 = make(files, 1, 2)
    assert_same(w2.get_sharded("model.embed_tokens.weight", 0), tensors["model.embed_tokens.weight"][5:].to(torch.float16))
    assert_same(w2.get_sharded("model.layers.0.self_attn.o_proj.weight", 1),
                tensors["model.layers.0.self_attn.o_proj.weight"][:, 8:].to(torch.float16))
    w.close()
    w2.close()


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("blocks", [[2, 1, 1], 2, 1])
def test_get_packed_sharded(ckpt, world, blocks):
    files, tensors = ckpt
    name = "model.layers.0.self_attn.qkv_proj.weight"   # 16 rows: q 8, k 4, v 4 for [2, 1, 1]
    ref = tensors[name]
    sizes = [16 * b // sum(blocks) for b in blocks] if isinstance(blocks, list) else [16 // blocks] * blocks
    for rank in range(world):
        w = make(files, rank, world, dtype=torch.float32)
        want, offset = [], 0
        for size in sizes:
            shard = size // world
            want.append(ref[offset + rank * shard: offset + (rank + 1) * shard])
            offset += size
        assert_same(w.get_packed_sharded(name, 0, blocks), torch.cat(want).to(torch.float32))
        assert_same(w.get_packed_sharded(name, 0, blocks, to_dtype=False), torch.cat(want))
        w.close()


def test_get_packed_sharded_errors_and_exempt_dtypes(ckpt):
    files, tensors = ckpt
    w = make(files, 1, 2)
    with pytest.raises(AssertionError, match="^Prepacked tensor cannot be sharded across 2 shards$"):
        w.get_packed_sharded("model.layers.0.mlp.gate_up_proj.weight", 1, 2)    # 6 -> blocks of 3
    with pytest.raises(NotImplementedError, match="^Currently only dim=0 or dim=1 is supported$"):
        w.get_packed_sharded("conv.weight", 2, 1)
    got = w.get_packed_sharded("quant.qweight", 1, 2)        # int32 is kept
    q = tensors["quant.qweight"]
    assert_same(got, torch.cat([q[:, 2:4], q[:, 6:8]], dim=1))
    got = w.get_packed_sharded("quant.g_idx", 0, 1)           # int64 is kept here
    assert_same(got, tensors["quant.g_idx"][4:])
    w.close()


# ---- order of device move and cast -------------------------------------------------------------

def test_move_and_cast_order(ckpt, monkeypatch):
    files, _ = ckpt
    w = make(files, 0, 2)
    calls = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        calls.append("device" if "device" in kwargs else "dtype" if "dtype" in kwargs else repr(args))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    w.get_tensor("model.embed_tokens.weight")
    assert calls == ["dtype", "device"]
    calls.clear()
    w.get_partial_sharded("model.layers.0.self_attn.o_proj.weight", 1)
    assert calls == ["dtype", "device"]
    calls.clear()
    w.get_packed_sharded("model.layers.0.self_attn.qkv_proj.weight", 0, [2, 1, 1])
    assert calls == ["device", "dtype"]
    calls.clear()
    w.get_tensor("quant.qweight", to_device=False)
    assert calls == []
    monkeypatch.undo()
    w.close()


# ---- streamed memory: handed out once, then re-read --------------------------------------------

def test_results_never_alias_each_other(ckpt):
    files, tensors = ckpt
    w = make(files, dtype=torch.float32)
    name = "model.norm.weight"        # float32: no cast, so the streamed tensor itself is handed out
    first = w.get_tensor(name)
    first.zero_()
    second = w.get_tensor(name)
    assert_same(second, tensors[name])
    assert second.data_ptr() != first.data_ptr()
    w.close()


def test_get_shape_and_has_tensor_take_nothing(ckpt):
    files, tensors = ckpt
    w = make(files)
    for name in tensors:
        w.get_shape(name), w.has_tensor(name)
    w.wait_streamed()
    assert set(w._store._ready) == set(tensors)
    w.get_tensor("lm_head.weight")
    assert "lm_head.weight" not in w._store._ready
    w.close()
    assert not w._store._ready


def test_requests_wait_only_for_their_tensor(ckpt, monkeypatch):
    """Streaming runs in the background: a request is answered as soon as its tensor is in."""
    from loader_plugins import streamer as streamer_module

    files, tensors = ckpt
    gate = threading.Event()
    real = streamer_module.SafetensorsStreamer.get_tensors

    def slow_get_tensors(self):
        for name, tensor in real(self):
            if name == "lm_head.weight":
                assert gate.wait(10)
            yield name, tensor

    monkeypatch.setattr(streamer_module.SafetensorsStreamer, "get_tensors", slow_get_tensors)
    w = make(files)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("x", w.get_tensor("lm_head.weight")))
    t.start()
    t.join(0.3)
    assert t.is_alive()     # still waiting for lm_head
    gate.set()
    t.join(10)
    assert_same(got["x"], tensors["lm_head.weight"].to(torch.float16))
    w.close()


def test_streaming_error_reaches_the_request(ckpt, monkeypatch):
    from loader_plugins import streamer as streamer_module
    from loader_plugins.errors import SourceError

    def failing(self):
        raise SourceError("model-00002-of-00002.safetensors: read of bytes [8, 24) failed: Input/output error")
        yield  # pragma: no cover

    monkeypatch.setattr(streamer_module.SafetensorsStreamer, "get_tensors", failing)
    files, _ = ckpt
    w = make(files)
    with pytest.raises(StreamerError, match="streaming the weights failed, so tensor 'lm_head.weight'.*Input/output"):
        w.get_tensor("lm_head.weight")
    with pytest.raises(StreamerError, match="Input/output error"):
        w.wait_streamed()
    w.close()


def test_files_added_to_routing_later_use_the_base_class(ckpt, tmp_path):
    """Speculators (Medusa, MLP) add their file to ``routing`` after construction."""
    class RecordingBase:
        def __init__(self):
            raise AssertionError("the base constructor must not run")

        def get_filename(self, tensor_name):
            return str(self.routing[tensor_name]), tensor_name

        def _record(self, *call):
            self.calls.append(call)
            return call

        def get_tensor(self, name, to_device=True, to_dtype=True):
            return self._record("get_tensor", name)

        def get_sharded(self, name, dim, to_device=True, to_dtype=True):
            return self._record("get_sharded", name, dim)

        def get_partial_sharded(self, name, dim, to_device=True, to_dtype=True):
            return self._record("get_partial_sharded", name, dim)

        def get_packed_sharded(self, name, dim, block_sizes, to_dtype=True):
            return self._record("get_packed_sharded", name, dim, block_sizes)

        def _get_slice(self, name):
            return self._record("_get_slice", name)

        def get_shape(self, name):
            return self._record("get_shape", name)

    class Weights(StreamedWeightsMixin, RecordingBase):
        pass

    files, _ = ckpt
    w = Weights(files, "cpu", torch.float16, FakeProcessGroup(), None, settings=SETTINGS)
    w.calls = []
    extra = tmp_path / "medusa_lm_head.safetensors"
    save_file({"medusa.0.weight": torch.zeros(2, 2)}, str(extra))
    w.routing["medusa.0.weight"] = str(extra)
    w.get_tensor("medusa.0.weight")
    w.get_sharded("medusa.0.weight", 0)
    w.get_partial_sharded("medusa.0.weight", 1)
    w.get_packed_sharded("medusa.0.weight", 0, 2)
    w._get_slice("medusa.0.weight")
    w.get_shape("medusa.0.weight")
    assert [c[0] for c in w.calls] == ["get_tensor", "get_sharded", "get_partial_sharded", "get_packed_sharded",
                                       "_get_slice", "get_shape"]
    # a streamed name rerouted to another file is no longer ours either
    w.routing["lm_head.weight"] = str(extra)
    w.get_tensor("lm_head.weight")
    assert w.calls[-1] == ("get_tensor", "lm_head.weight")
    w.close()


# ---- settings --------------------------------------------------------------------------------

def test_multi_rank_defaults_to_buffered_reads_unless_set(ckpt):
    files, _ = ckpt
    w = make(files, 0, 2)
    assert w._store._config.direct_io == "off"
    w.close()
    w = make(files, 0, 1)
    assert w._store._config.direct_io == SETTINGS.config.direct_io
    w.close()
    w = make(files, 0, 2, settings=settings_from_env({"TGI_STREAMER_DIRECT_IO": "on"}))
    assert w._store._config.direct_io == "on"
    w.close()


def test_settings_come_from_the_environment():
    s = settings_from_env({"TGI_STREAMER_CONCURRENCY": "3", "TGI_STREAMER_MEMORY_LIMIT": "1GiB",
                           "TGI_STREAMER_WEIGHTS_URI": "s3://bucket/llama/", "TGI_STREAMER_DEADLINE": "none",
                           "TGI_STREAMER_HUGEPAGES": "off", "OTHER": "x"})
    assert s.config.concurrency == 3 and s.config.memory_limit == 1 << 30 and s.config.deadline is None
    assert s.config.hugepages == "off"
    assert s.weights_uri == "s3://bucket/llama/"
    assert s.explicit == {"concurrency", "memory_limit", "deadline", "hugepages"}
    with pytest.raises(ConfigError, match="TGI_STREAMER_CONCURENCY: 'concurency' is not a streamer option; allowed: "
                                          "TGI_STREAMER_WEIGHTS_URI, TGI_STREAMER_CONCURRENCY"):
        settings_from_env({"TGI_STREAMER_CONCURENCY": "3"})
    with pytest.raises(ConfigError, match="concurrency"):
        settings_from_env({"TGI_STREAMER_CONCURRENCY": "many"})


def test_standalone_weights_need_no_tgi(ckpt):
    import sys

    files, _ = ckpt
    make(files).close()
    assert not any(m.startswith("text_generation_server") for m in sys.modules)


def test_streamer_weights_name_needs_tgi(monkeypatch):
    import importlib
    import sys

    import loader_plugins.tgi_adapter as adapter

    if importlib.util.find_spec("text_generation_server") is not None:
        pytest.skip("TGI is importable here")
    monkeypatch.delitem(sys.modules, "text_generation_server", raising=False)
    with pytest.raises(ImportError, match="needs TGI's Python server .*StandaloneStreamerWeights"):
        adapter.StreamerWeights
    with pytest.raises(AttributeError):
        adapter.NoSuchName
