"""Neighbouring small tensors read as one batch (plan.batch_neighbours, the reader's batches):
every byte once, bit for bit as safetensors loads them, into the reader's memory or the
caller's, with errors that name the tensors."""

import os

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from loader_plugins import SafetensorsStreamer, SourceError, StreamerConfig, load_file
from loader_plugins.core.checkpoint import open_checkpoint
from loader_plugins.core.header import TensorSpec, encode_header
from loader_plugins.core.plan import BATCH_PREFIX, batch_neighbours
from loader_plugins.core.reader import StreamReader
from loader_plugins.core.sources.local import LocalSource

from .helpers import assert_bit_exact, random_tensor, tensor_set


def _spec(name, offset, nbytes, file="f", dtype="U8"):
    return TensorSpec(name, dtype, (nbytes,), file, offset, nbytes)


def test_batches_are_runs_of_adjacent_small_tensors_within_the_limit():
    specs = [_spec("a", 0, 10), _spec("b", 10, 20), _spec("c", 30, 5), _spec("big", 35, 2000),
             _spec("d", 2035, 8), _spec("e", 2043, 8), _spec("gap", 2100, 8), _spec("h", 2108, 8),
             _spec("x", 0, 8, file="g"), _spec("empty", 8, 0, file="g"), _spec("y", 8, 8, file="g")]
    singles, batches = batch_neighbours(specs, lambda s: s.name != "h", max_bytes=32, max_tensor=100)
    members = [[m.name for m in b.members] for b in batches]
    # c would pass 32 bytes; gap does not start where e ends; h is not eligible; an empty tensor breaks no run
    assert members == [["a", "b"], ["d", "e"], ["x", "y"]]
    assert sorted(s.name for s in singles) == ["big", "c", "empty", "gap", "h"]
    for b in batches:
        assert b.spec.name.startswith(BATCH_PREFIX) and b.spec.dtype == "U8"
        assert (b.spec.offset, b.spec.end) == (b.members[0].offset, b.members[-1].end)
    covered = sorted((s.file, s.offset, s.end) for s in singles + [m for b in batches for m in b.members])
    assert covered == sorted((s.file, s.offset, s.end) for s in specs)    # every tensor once


@pytest.fixture
def counted_reads(monkeypatch):
    """Counts LocalSource.read_into calls (the real reads, still done)."""
    calls = []
    real = LocalSource.read_into

    def read_into(self, offset, dest, **kw):
        calls.append((self.path, offset, len(dest)))
        return real(self, offset, dest, **kw)

    monkeypatch.setattr(LocalSource, "read_into", read_into)
    return calls


@pytest.mark.parametrize("direct_io", ["off", "auto"])
def test_many_small_tensors_load_bit_exact_in_a_few_reads(tmp_path, counted_reads, direct_io):
    gen = torch.Generator().manual_seed(11)
    tensors = {f"layers.{i}.experts.{e}.w": random_tensor((7, 13), torch.bfloat16, gen)
               for i in range(4) for e in range(64)}
    tensors.update(tensor_set(seed=12))       # every dtype, odd shapes, 0-d and empty tensors
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    got = load_file(path, direct_io=direct_io)
    assert_bit_exact(got, st_load_file(path))
    data = [(o, n) for _, o, n in counted_reads if o > 0]   # (the header is read from byte 0)
    assert 0 < len(data) <= 3, len(data)     # one batch (plus a few alone), not ~450 reads
    read = sorted((o, o + n) for o, n in data)
    assert all(a[1] <= b[0] for a, b in zip(read, read[1:]))  # no byte read twice


def test_batch_views_are_the_callers_and_independent(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.full((5,), float(i)) for i in range(50)}, path)
    got = load_file(path)
    got["t3"].fill_(-1.0)
    assert torch.equal(got["t4"], torch.full((5,), 4.0)) and torch.equal(got["t2"], torch.full((5,), 2.0))
    assert got["t3"].is_contiguous() and got["t3"].data_ptr() % 4 == 0


def test_a_member_at_an_offset_its_batch_does_not_share_is_still_exact(tmp_path):
    """U8[3] then F32[5]: the F32 is aligned in the file but 3 bytes into its batch."""
    u8 = torch.tensor([1, 2, 3], dtype=torch.uint8)
    f32 = torch.arange(5, dtype=torch.float32) / 7
    data = u8.numpy().tobytes() + f32.numpy().tobytes()
    header = next(h for pad in range(4)      # the data area starts at 1 mod 4: "b" at 0 mod 4
                  if len(h := encode_header({"a": ("U8", (3,), 3), "b": ("F32", (5,), 20)}, {"p": "x" * pad},
                                            align=1)[0]) % 4 == 1)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(header + data)
    spec = open_checkpoint(str(path), StreamerConfig()).tensors["b"]
    assert spec.offset % 4 == 0
    got = load_file(path)
    assert_bit_exact(got, st_load_file(path))


def test_batched_tensors_fill_destinations_in_place_and_cast(tmp_path):
    gen = torch.Generator().manual_seed(13)
    tensors = {f"e{i}": random_tensor((3, 17), torch.bfloat16, gen) for i in range(40)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    same = {f"e{i}": torch.empty(3, 17, dtype=torch.bfloat16) for i in range(0, 40, 2)}
    cast = {f"e{i}": torch.empty(3, 17, dtype=torch.float32) for i in range(1, 40, 2)}
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(path, destinations={**same, **cast})
        got = dict(streamer.get_tensors())
    assert all(got[n] is d for n, d in {**same, **cast}.items())
    ref = st_load_file(path)
    assert_bit_exact(same, {n: ref[n] for n in same})
    assert_bit_exact(cast, {n: ref[n].to(torch.float32) for n in cast})


def test_memory_stays_bounded_with_batches(tmp_path):
    gen = torch.Generator().manual_seed(14)
    tensors = {f"t{i}": random_tensor((64, 64), torch.float32, gen) for i in range(256)}   # 16 KiB each, 4 MiB
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    config = StreamerConfig.from_dict({"memory_limit": "1MiB", "chunk_bytes": "256KiB", "direct_io": "off"})
    with open_checkpoint(str(path), config, keep_open=True) as ckpt:
        reader = StreamReader(list(ckpt.tensors.values()), ckpt.sources, config)
        got = {}
        for name, tensor in reader:
            got[name] = tensor.clone()          # the consumer keeps copies, drops the reader's
        assert reader.peak_held <= reader.limit, (reader.peak_held, reader.limit)
    assert_bit_exact(got, st_load_file(path))


def test_a_failed_batch_read_names_its_tensors_and_bytes(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({f"small.{i}": torch.full((100,), float(i)) for i in range(30)}, path)
    size = path.stat().st_size
    with open_checkpoint(str(path), StreamerConfig(direct_io="off"), keep_open=True) as ckpt:
        os.truncate(path, size - 1000)          # shortened after its header was read
        with pytest.raises(SourceError) as err:
            load_file(ckpt)
    message = str(err.value)
    assert "tensors 'small." in message and "read together" in message and str(path) in message
    assert "truncated" in message and "bytes [" in message
