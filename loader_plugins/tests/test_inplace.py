"""In-place decisions asked of the model's own loader (loader_plugins.inplace), on plain torch
modules whose ``load_weights`` do what engines' loaders do: plain copies, row ranges of fused
parameters, tensor-parallel narrows, transposes, concatenations, arithmetic, ``.item()``...

Every load is compared bit for bit with the same ``load_weights`` fed by ``safetensors``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from loader_plugins import StreamerConfig
from loader_plugins.inplace import (
    InPlaceMismatch,
    ModelState,
    StandIn,
    column_block,
    load_into_model,
    predict,
)
from loader_plugins.inplace.standin import StandInMode
from loader_plugins.streamer import SafetensorsStreamer

CONFIG = StreamerConfig(concurrency=3, chunk_bytes=4096, memory_limit=1 << 20)


def _param(*shape, dtype=torch.float32) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.full(shape, float("nan"), dtype=dtype) if dtype.is_floating_point
                              else torch.zeros(shape, dtype=dtype), requires_grad=False)


class Engineish(torch.nn.Module):
    """A module whose load_weights does, tensor by tensor, what engines' loaders do."""

    def __init__(self, rank: int = 0, world: int = 1):
        super().__init__()
        self.rank, self.world = rank, world
        self.plain = _param(5, 3)
        self.qkv = _param(12, 4)                       # q, k, v checkpoint tensors into row ranges
        self.fused = _param(9, 4)                      # one fused checkpoint tensor split in order
        self.transposed = _param(4, 6)
        self.scaled = _param(3)
        self.scalar = _param()
        self.row_shard = _param(4 // world, 8)         # column parallel: dim-0 shard
        self.col_shard = _param(4, 6 // world)         # row parallel: dim-1 shard
        self.f16 = _param(5, 3, dtype=torch.float16)  # cast by copy_
        self.to_half = _param(5, 3, dtype=torch.float16)
        self.twice = _param(5, 3)                      # cast twice on the way
        self.concat = _param(8, 3)
        self.experts = _param(3, 4, 2)                 # a fused MoE weight: one slot per expert
        self.via_temp = _param(2, 2)
        self.padded = _param(6, 2)                     # vocab padding: copy, then zero the rest
        self.kept = None
        self.calls = 0

    def load_weights(self, weights):
        self.calls += 1
        loaded = set()
        pending = {}
        for name, w in weights:
            if name in ("q", "k", "v"):
                i = "qkv".index(name)
                self.qkv.data[i * 4:(i + 1) * 4].copy_(w)
                loaded.add("qkv")
                continue
            if name.startswith("expert."):
                self.experts.data[int(name.split(".")[1])].copy_(w)
                loaded.add("experts")
                continue
            if name in ("cat_a", "cat_b"):
                pending[name] = w
                if len(pending) == 2:
                    self.concat.data.copy_(torch.cat([pending["cat_a"], pending["cat_b"]]))
                loaded.add("concat")
                continue
            if name == "fused":
                for j, size in enumerate((3, 3, 3)):
                    self.fused.data[3 * j:3 * j + size].copy_(w.narrow(0, 3 * j, size))
            elif name == "transposed":
                self.transposed.data.copy_(w.t())
            elif name == "plain":
                self.plain.data.copy_(w)
            elif name == "scaled":
                self.scaled.data.copy_(w * 2)
            elif name == "scalar":
                self.scalar.data.fill_(w.item())
            elif name == "row_shard":
                rows = 4 // self.world
                self.row_shard.data.copy_(w.narrow(0, self.rank * rows, rows))
            elif name == "col_shard":
                cols = 6 // self.world
                self.col_shard.data.copy_(w.narrow(1, self.rank * cols, cols))
            elif name == "f16":
                self.f16.data.copy_(w)
            elif name == "to_half":
                self.to_half.data.copy_(w.to(torch.float16))
            elif name == "twice":
                self.twice.data.copy_(w.to(torch.float16).to(torch.float32))
            elif name == "via_temp":
                tmp = torch.empty(2, 2)
                tmp.copy_(w)
                self.via_temp.data.copy_(tmp)
            elif name == "padded":
                self.padded.data[:4].copy_(w)
                self.padded.data[4:].fill_(0)
            elif name == "ignored":
                pass
            loaded.add(name)
        return loaded


def _checkpoint(tmp_path, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"plain": (5, 3), "q": (4, 4), "k": (4, 4), "v": (4, 4), "fused": (9, 4), "transposed": (6, 4),
              "scaled": (3,), "scalar": (), "row_shard": (4, 8), "col_shard": (4, 6), "f16": (5, 3),
              "to_half": (5, 3), "twice": (5, 3), "cat_a": (4, 3), "cat_b": (4, 3), "expert.0": (4, 2),
              "expert.1": (4, 2), "expert.2": (4, 2), "via_temp": (2, 2), "padded": (4, 2), "ignored": (7,)}
    tensors = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def _reference(path, **kw) -> Engineish:
    model = Engineish(**kw)
    model.load_weights(iter(st_load_file(str(path)).items()))
    return model


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), name


def _predict(model, path):
    with SafetensorsStreamer(CONFIG) as streamer:
        checkpoint = streamer.open(str(path))
        order = sorted(checkpoint.tensors, key=lambda n: checkpoint.tensors[n].offset)
        return predict(model.load_weights, model, checkpoint.tensors, streamer.read_tensors, order=order)


# ---- the dry run's decisions ------------------------------------------------------------------

def test_dry_run_decides_from_what_load_weights_does(tmp_path):
    path = _checkpoint(tmp_path)
    model = Engineish()
    p = _predict(model, path)
    placed = set(p.placements)
    assert {"plain", "q", "k", "v", "fused", "row_shard", "col_shard", "f16", "to_half", "padded",
            "expert.0", "expert.1", "expert.2"} <= placed
    assert p.unused == {"ignored"}
    assert set(p.loaded) == {"scalar"}                         # .item() needed its value: read
    assert p.reasons["transposed"].startswith("a strided view")
    assert p.reasons["scaled"] == "aten.mul.Tensor"
    assert p.reasons["cat_a"] == p.reasons["cat_b"] == "aten.cat.default"
    assert p.reasons["twice"] == "aten._to_copy.default"          # a second cast: not one cast of the bytes
    assert p.reasons["via_temp"] == "copied into a temporary"
    assert "twice" not in placed and "via_temp" not in placed
    # the fused tensor's three in-order copies became one piece over the whole parameter
    assert len(p.placements["fused"].pieces) == 1 and p.placements["fused"].pieces[0].whole
    assert p.placements["col_shard"].pieces[0].whole             # a narrow to all of it, at one rank
    assert p.attempts == 1


def test_dry_run_leaves_the_model_as_it_found_it(tmp_path):
    path = _checkpoint(tmp_path)

    class Meddling(Engineish):
        def load_weights(self, weights):
            self.flag = "set during load"
            self.extra = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
            self.plain.data = torch.zeros(5, 3)      # a new storage
            self._parameters.pop("scaled")
            return super().load_weights(weights)

    model = Meddling()
    before = {n: (t.data_ptr(), t.clone()) for n, t in model.named_parameters()}
    attrs = dict(model.__dict__)
    _predict(model, path)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (ptr, value) in before.items():
        assert after[name].data_ptr() == ptr, name
        assert torch.equal(after[name].isnan(), value.isnan()), name   # nothing written
    assert "flag" not in model.__dict__ and model.__dict__.keys() == attrs.keys()


def test_state_restores_attributes_lists_and_storage():
    module = Engineish()
    module.things = [1, 2]
    state = ModelState(module)
    module.things.append(3)
    module.new_attr = 1
    old_ptr = module.plain.data_ptr()
    module.plain.data = torch.ones(2)
    state.restore()
    assert module.things == [1, 2] and not hasattr(module, "new_attr")
    assert module.plain.data_ptr() == old_ptr and module.plain.shape == (5, 3)


def test_a_loader_that_fails_on_stand_ins_gets_real_tensors(tmp_path):
    path = _checkpoint(tmp_path)

    class NumpyLoader(Engineish):
        def load_weights(self, weights):
            out = set()
            for name, w in weights:
                if name == "plain":
                    self.plain.data.copy_(torch.from_numpy(w.numpy()))   # no aten call: fails on a stand-in
                    out.add(name)
            return out

    model = NumpyLoader()
    p = _predict(model, path)
    assert "plain" in p.loaded and "plain" not in p.placements and p.attempts == 2


def test_kept_references_go_through_the_loader(tmp_path):
    path = _checkpoint(tmp_path)

    class Keeper(Engineish):
        def load_weights(self, weights):
            self.kept = [w for name, w in weights if name == "plain"]
            return set()

    p = _predict(Keeper(), path)
    assert p.reasons["plain"] == "the loader kept a reference to it"
    assert "ignored" in p.unused


# ---- full loads against the safetensors reference -------------------------------------------

@pytest.mark.parametrize("in_place", [True, False])
def test_load_into_model_matches_safetensors_bit_for_bit(tmp_path, in_place):
    path = _checkpoint(tmp_path)
    model = Engineish()
    report = load_into_model(model.load_weights, model, str(path), CONFIG, in_place=in_place)
    _assert_same(_reference(path), model)
    stats = report.stats
    assert model.calls == 1        # the dry run's changes to the module (its call count) were undone
    if in_place:
        assert stats["in_place"] == 13 and stats["unused"] == 1 and stats["materialized"] == []
        assert set(stats["through"]) == {"transposed", "scaled", "scalar", "twice", "cat_a", "cat_b", "via_temp"}
    else:
        assert stats["in_place"] == 0 and stats["via_model"] == 21


@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_shards_read_in_place(tmp_path, rank):
    path = _checkpoint(tmp_path)
    model = Engineish(rank=rank, world=2)
    report = load_into_model(model.load_weights, model, str(path), CONFIG)
    _assert_same(_reference(path, rank=rank, world=2), model)
    assert report.stats["in_place_shards"] == 2   # row_shard (a byte range) and col_shard (cut once read)
    assert "row_shard" not in report.stats["through"] and "col_shard" not in report.stats["through"]


def test_split_into_regions_that_are_not_in_order(tmp_path):
    """A fused tensor whose parts land in non-adjacent regions (a TP rank's q, k and v rows of a
    fused qkv): one piece per part, each read on its own."""
    gen = torch.Generator().manual_seed(3)
    path = tmp_path / "fused.safetensors"
    save_file({"qkv": torch.randn(12, 2, generator=gen)}, str(path))

    class Split(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = _param(2, 2), _param(2, 2), _param(2, 2)

        def load_weights(self, weights):
            for _, w in weights:
                for i, p in enumerate((self.q, self.k, self.v)):
                    p.data.copy_(w.narrow(0, 4 * i + 2, 2))      # rank 1's rows of each part
            return {"q", "k", "v"}

    model, reference = Split(), Split()
    reference.load_weights(iter(st_load_file(str(path)).items()))
    report = load_into_model(model.load_weights, model, str(path), CONFIG)
    _assert_same(reference, model)
    assert report.stats["in_place"] == 1 and report.stats["in_place_shards"] == 3


# ---- the real run checks the dry run --------------------------------------------------------

def test_a_loader_that_changes_its_mind_is_an_error_not_a_wrong_model(tmp_path):
    """Mock of a nondeterministic loader (a fault no real model showed): a plain copy in the dry
    run, a transposed one in the real run."""
    path = tmp_path / "sq.safetensors"
    save_file({"w": torch.arange(16.0).reshape(4, 4)}, str(path))
    calls = []

    class Fickle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = _param(4, 4)

        def load_weights(self, weights):
            calls.append(1)          # outside the module: the dry run puts the module's own state back
            for _, w in weights:
                self.w.data.copy_(w if len(calls) == 1 else w.t())
            return {"w"}

    model = Fickle()
    with pytest.raises(InPlaceMismatch, match="dry run"):
        load_into_model(model.load_weights, model, str(path), CONFIG)


def test_a_stand_in_kept_in_the_real_run_is_an_error(tmp_path):
    """Mock: the loader keeps a reference only in the real run."""
    path = tmp_path / "one.safetensors"
    save_file({"w": torch.ones(3)}, str(path))
    calls, hoard = [], []

    class Hoarder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = _param(3)

        def load_weights(self, weights):
            calls.append(1)
            for _, w in weights:
                self.w.data.copy_(w)
                if len(calls) == 2:
                    hoard.append(w)
            return {"w"}

    model = Hoarder()
    with pytest.raises(InPlaceMismatch, match="kept stand-ins"):
        load_into_model(model.load_weights, model, str(path), CONFIG)


def test_values_needed_only_in_the_real_run_are_read(tmp_path):
    """Mock: the real run inspects a tensor the dry run only copied; it gets its real value."""
    path = tmp_path / "one.safetensors"
    save_file({"w": torch.tensor([1.5, 2.5])}, str(path))
    seen, calls = [], []

    class Curious(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = _param(2)

        def load_weights(self, weights):
            calls.append(1)
            for _, w in weights:
                self.w.data.copy_(w)
                if len(calls) == 2:
                    seen.append(w.sum().item())
            return {"w"}

    model = Curious()
    report = load_into_model(model.load_weights, model, str(path), CONFIG)
    assert seen == [4.0] and report.stats["materialized"] == ["w"]
    assert torch.equal(model.w, torch.tensor([1.5, 2.5]))


# ---- stand-ins and column blocks ------------------------------------------------------------

def test_stand_in_reports_metadata_without_data():
    mode = StandInMode()
    s = mode.origin("x", torch.bfloat16, (3, 4))
    assert isinstance(s, StandIn) and s.shape == (3, 4) and s.dtype == torch.bfloat16 and s.device.type == "cpu"
    assert "x" in repr(s)


views = st.sampled_from(["whole", "narrow0", "narrow_last", "select", "t", "step", "expand", "reshape", "chunk"])


@settings(max_examples=300, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple), view=views, seed=st.integers(0, 10**6))
def test_column_block_bytes_are_the_views_bytes(shape, view, seed):
    """Whenever column_block names a block, its bytes (read as the reader reads them) are the
    view's values in row-major order; narrows along any dim are always blocks."""
    import random

    rnd = random.Random(seed)
    total = math.prod(shape)
    base = torch.arange(total, dtype=torch.int32).reshape(shape)
    meta = torch.empty(shape, dtype=torch.int32, device="meta")
    dim = rnd.randrange(len(shape))
    size = shape[dim]
    start = rnd.randrange(size)
    length = rnd.randint(1, size - start)

    def apply(t):
        if view == "whole":
            return t
        if view == "narrow0":
            return t.narrow(0, min(start, shape[0] - 1), 1)
        if view == "narrow_last":
            return t.narrow(dim, start, length)
        if view == "select":
            return t.select(dim, start)
        if view == "t":
            return t.transpose(0, dim)
        if view == "step":
            return t.narrow(dim, 0, size)[(slice(None),) * dim + (slice(None, None, 2),)]
        if view == "expand":
            return t.unsqueeze(0).expand(2, *shape)
        if view == "reshape":
            return t.reshape(-1)
        return t.chunk(2, dim=dim)[0]

    real, value = apply(base), apply(meta)
    block = column_block(value, 4, total)
    if view in ("whole", "narrow0", "narrow_last", "select", "reshape", "chunk"):
        assert block is not None
    if block is None:
        return
    flat = base.reshape(-1).view(torch.uint8).reshape(block.rows, block.row_bytes)
    got = flat[:, block.start:block.start + block.width].reshape(-1).view(torch.int32)
    assert torch.equal(got, real.reshape(-1))


def test_predict_spec_dtypes_follow_the_checkpoint(tmp_path):
    path = tmp_path / "bf.safetensors"
    save_file({"w": torch.randn(4, 4).to(torch.bfloat16)}, str(path))

    class Cast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = _param(4, 4)

        def load_weights(self, weights):
            for _, w in weights:
                assert w.dtype == torch.bfloat16 and w.device.type == "cpu"
                self.w.data.copy_(w)
            return {"w"}

    model, reference = Cast(), Cast()
    reference.load_weights(iter(st_load_file(str(path)).items()))
    report = load_into_model(model.load_weights, model, str(path), CONFIG)
    _assert_same(reference, model)
    assert report.stats["in_place"] == 1

