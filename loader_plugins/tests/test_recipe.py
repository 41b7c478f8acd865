"""Placements recorded by a real load and reused by the next (loader_plugins.inplace.recipe), on a
plain torch module whose ``load_weights`` does what vLLM's per-expert MoE loader does. Every
load is compared bit for bit with the same ``load_weights`` fed by ``safetensors``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from loader_plugins import StreamerConfig
from loader_plugins.inplace import load_into_model
from loader_plugins.inplace.load import choose_in_place
from loader_plugins.inplace.recipe import Recipe, recipe_dir

CONFIG = StreamerConfig(concurrency=3)
E, R, C = 24, 4, 8
KEPT: list = []


def _param(*shape) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.full(shape, float("nan")), requires_grad=False)


class MoEish(torch.nn.Module):
    """Per-expert checkpoint tensors into slots of fused expert weights (as vLLM's FusedMoE),
    a plain copy, a transposed one (through the loader), an ignored one."""

    def __init__(self, experts: int = E):
        super().__init__()
        self.w13 = _param(experts, 2 * R, C)
        self.w2 = _param(experts, C, R)
        self.norm = _param(C)
        self.t = _param(C, R)
        self.deviate = False      # set from outside: the loader then does what its recorded run did not
        self.keep = False
        self.cycle = False        # set from outside: the loader leaves a tensor in a garbage reference cycle

    def load_weights(self, weights):
        loaded = set()
        for name, w in weights:
            if name.startswith("experts."):
                _, e, proj = name.split(".")[:3]
                slot = int(e)
                if proj == "gate":
                    self.w13.data[slot].narrow(0, 0, R).copy_(w)
                elif proj == "up":
                    self.w13.data[slot].narrow(0, R, R).copy_(w)
                else:
                    self.w2.data[slot].copy_(w)
                loaded.add("w2" if proj == "down" else "w13")
            elif name == "norm":
                if self.keep:
                    KEPT.append(w)
                if self.cycle:
                    loop = [w]
                    loop.append(loop)
                    del loop
                self.norm.data.copy_(w)
                loaded.add("norm")
            elif name == "t":
                self.t.data.copy_(w.t())
                loaded.add("t")
        if self.deviate:
            self.w2.data[0].zero_()
        return loaded


def _checkpoint(tmp_path, experts: int = E):
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for e in range(experts):
        for proj, shape in (("gate", (R, C)), ("up", (R, C)), ("down", (C, R))):
            tensors[f"experts.{e}.{proj}.weight"] = torch.randn(shape, generator=gen)
    tensors.update(norm=torch.randn(C, generator=gen), t=torch.randn(R, C, generator=gen),
                   unused=torch.randn(3, generator=gen))
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    return path


def _reference(path, **flags) -> dict[str, torch.Tensor]:
    model = MoEish()
    for k, v in flags.items():
        setattr(model, k, v)
    model.load_weights(st_load_file(path).items())
    return dict(model.named_parameters())


def _assert_same(ref, model):
    """Every parameter of the reference, bit for bit (a subclass's own ones are checked by its test)."""
    params = dict(model.named_parameters())
    for name, r in ref.items():
        assert torch.equal(params[name].view(torch.int32), r.view(torch.int32)), name


@pytest.fixture(autouse=True)
def recipes(tmp_path, monkeypatch):
    monkeypatch.setenv("LOADER_PLUGINS_HISTORY_DIR", str(tmp_path / "history"))
    monkeypatch.setattr("loader_plugins.inplace.load.PROBE_FLOOR_SECONDS", 0.0)   # auto: through the loader here
    KEPT.clear()
    yield recipe_dir()


def _load(model, path, config=CONFIG, **kw):
    report = load_into_model(model.load_weights, model, str(path), config, engine_key="test", **kw)
    report.remember()
    return report


def test_auto_streams_in_place_unless_the_dry_run_costs_more_than_it_saves(monkeypatch):
    monkeypatch.setattr("loader_plugins.inplace.load.PROBE_FLOOR_SECONDS", 0.5)
    from loader_plugins.bench.moe import moe_config, moe_tensors
    from loader_plugins.core.header import TensorSpec

    def specs(entries):
        return [TensorSpec(n, "BF16", s, "f", 0, 2 * int(torch.Size(s).numel())) for n, s in entries]

    cfg = moe_config(24, 128, 128, 32, 1024)
    per_expert, why = choose_in_place(specs(moe_tensors(cfg, "per-expert")))
    assert not per_expert and "9435 copies" in why
    assert not choose_in_place(specs(moe_tensors(cfg, "fused")))[0]        # 267 tensors, 6,363 expert copies
    dense = [(f"l{i}.w", (4096, 4096)) for i in range(200)]              # 6.7 GB in 200 tensors
    assert choose_in_place(specs(dense))[0]
    tiny = moe_tensors(moe_config(2, 4, 64, 32, 256), "per-expert")      # a test model: in place, as always
    assert choose_in_place(specs(tiny))[0]


def test_a_recorded_load_is_replayed_by_the_next(tmp_path, recipes):
    path = _checkpoint(tmp_path)
    ref = _reference(path)
    first = MoEish()
    report = _load(first, path)
    _assert_same(ref, first)
    assert report.stats["recipe"] == "recorded" and report.stats["in_place"] == 0
    assert len(list(recipes.glob("*.json"))) == 1
    second = MoEish()
    report = _load(second, path)
    _assert_same(ref, second)
    assert report.stats["recipe"] == "used"
    assert report.stats["in_place"] == 3 * E + 1                 # the experts and norm, straight into the model
    assert set(report.stats["through"]) == {"t"} and report.stats["unused"] == 1
    assert report.result == {"w13", "w2", "norm", "t"}            # what the loader would have said


def test_a_loader_that_deviates_is_stopped_before_it_writes_and_loaded_again(tmp_path, recipes):
    path = _checkpoint(tmp_path)
    _load(MoEish(), path)
    model = MoEish()
    model.deviate = True           # now zeroes expert 0's w2 slot, which the stream fills
    report = _load(model, path)
    _assert_same(_reference(path, deviate=True), model)
    assert report.stats["recipe"] == "recorded"                   # dropped, and recorded again
    recipe = Recipe.find(next(recipes.glob("*.json")).stem)
    assert "experts.0.down.weight" not in recipe.placed and "experts.1.down.weight" in recipe.placed


def test_a_tensor_the_loader_keeps_is_not_placed(tmp_path, recipes):
    path = _checkpoint(tmp_path)
    model = MoEish()
    model.keep = True
    small = CONFIG.replace(chunk_bytes=4096)      # batches of 4 KiB: the kept one holds a few tensors
    _load(model, path, small)
    recipe = Recipe.find(next(recipes.glob("*.json")).stem)
    assert "norm" not in recipe.placed            # it (and what was read with it) stays with the loader
    assert len(recipe.placed) > 2 * E
    second = MoEish()
    second.keep = True
    report = _load(second, path, small)
    assert report.stats["recipe"] == "used"
    _assert_same(_reference(path), second)


def test_a_tensor_held_only_by_a_garbage_cycle_is_placed(tmp_path, recipes):
    """The collector is paused during a load; what only a reference cycle holds is freed at the end
    (kept() collects when something still looks referenced), so it counts as not kept."""
    path = _checkpoint(tmp_path)
    model = MoEish()
    model.cycle = True
    _load(model, path)
    recipe = Recipe.find(next(recipes.glob("*.json")).stem)
    assert "norm" in recipe.placed
    second = MoEish()
    second.cycle = True
    assert _load(second, path).stats["recipe"] == "used"
    _assert_same(_reference(path), second)


def test_no_recipe_when_the_loader_changes_the_model_or_the_model_changes(tmp_path, recipes):
    path = _checkpoint(tmp_path)

    class Counting(MoEish):
        def load_weights(self, weights):
            self.loads = getattr(self, "loads", 0) + 1
            return super().load_weights(weights)

    model = Counting()
    report = _load(model, path)
    assert report.stats.get("recipe") is None and not list(recipes.glob("*.json"))
    _assert_same(_reference(path), model)
    _load(MoEish(), path)
    other = MoEish(experts=E + 1)          # another layout: another key, recorded afresh
    report = _load(other, path)
    assert report.stats["recipe"] == "recorded" and len(list(recipes.glob("*.json"))) == 2


def test_without_an_engine_key_nothing_is_recorded(tmp_path, recipes):
    path = _checkpoint(tmp_path)
    model = MoEish()
    report = load_into_model(model.load_weights, model, str(path), CONFIG)
    report.remember()
    assert report.recipe is None and not list(recipes.glob("*.json"))
    _assert_same(_reference(path), model)


def test_a_write_the_loader_leaves_out_without_a_tensor_it_ignored_is_caught(tmp_path, recipes):
    """The loader writes something only when it has seen a tensor it otherwise ignores: the
    recipe does not give it that tensor, so that write would be missing; the load is done again."""
    path = _checkpoint(tmp_path)

    class SeesUnused(MoEish):
        def __init__(self):
            super().__init__()
            self.flag = _param(2)

        def load_weights(self, weights):
            names = []

            def seen(items):
                for name, w in items:
                    names.append(name)
                    yield name, w

            loaded = super().load_weights(seen(weights))
            if "unused" in names:
                self.flag.data.fill_(1.0)
            return loaded | {"flag"}

    _load(SeesUnused(), path)
    model = SeesUnused()
    report = _load(model, path)
    assert torch.equal(model.flag, torch.ones(2))
    assert report.stats["recipe"] == "recorded"      # the recipe was dropped and the load recorded again
    _assert_same(_reference(path), model)


def test_a_cached_property_the_loader_computes_does_not_stop_the_recording(tmp_path, recipes):
    """SGLang's FusedMoE reads ``use_padded_loading`` (a ``functools.cached_property``) in its
    weight loader: the value lands in the module's ``__dict__``, derived from the module, and is
    computed again on the next model; other new attributes still stop the recording."""
    import functools

    path = _checkpoint(tmp_path)

    class Cached(MoEish):
        sets_attribute = False

        @functools.cached_property
        def padded(self) -> bool:
            return False

        def load_weights(self, weights):
            assert self.padded is False
            if self.sets_attribute:
                self.seen = True
            return super().load_weights(weights)

    first, second = Cached(), Cached()
    assert _load(first, path).stats["recipe"] == "recorded"
    assert _load(second, path).stats["recipe"] == "used"
    _assert_same(_reference(path), second)
    other = Cached()
    other.sets_attribute = True
    report = _load(other, path)      # the recipe's guard sees the new attribute: dropped, loaded again, not recorded
    assert report.stats.get("recipe") != "used"
    _assert_same(_reference(path), other)
