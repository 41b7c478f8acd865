"""StreamerWeights against TGI's own Weights, from a real TGI source tree.

Set ``TGI_SOURCE_DIR`` to a text-generation-inference checkout (3.0-3.3): TGI's server is on no
package registry. Its ``utils/weights.py`` is imported on CPU with stub parent packages (needs
torch, safetensors, loguru). On a two-file checkpoint, for rank 0 and rank 1 of a two-rank fake
process group (and rank 0 of 1), every ``get_*`` call on every tensor must give a bit-identical
tensor (dtype, shape, device, bytes) or the same exception (type and message) as TGI's.
"""

from __future__ import annotations

import os
import sys
import importlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from loader_plugins.tests.tgi_helpers import call_matrix, outcome, write_checkpoint  # noqa: E402
from loader_plugins.tgi_adapter.settings import settings_from_env  # noqa: E402
from loader_plugins.tgi_adapter.tgi_source import FakeProcessGroup, import_tgi_weights_module, tgi_server_dir  # noqa: E402

pytestmark = pytest.mark.tgi


def _tgi_source() -> str:
    source = os.environ.get("TGI_SOURCE_DIR")
    if not source:
        pytest.skip("TGI_SOURCE_DIR is not set (point it at a text-generation-inference checkout; TGI's "
                    "server is on no package registry)")
    try:
        tgi_server_dir(source)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        import loguru  # noqa: F401
    except ImportError:
        pytest.skip("TGI's weights module needs loguru (pip install loguru)")
    return source


@pytest.fixture(scope="module")
def tgi_weights_module():
    saved = {k: v for k, v in sys.modules.items() if k == "text_generation_server" or k.startswith("text_generation_server.")}
    module = import_tgi_weights_module(_tgi_source())
    yield module
    for name in [k for k in sys.modules if k == "text_generation_server" or k.startswith("text_generation_server.")]:
        del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tgi-ckpt"))


def _same(ours, theirs, where: str) -> None:
    kind, value = ours
    tkind, tvalue = theirs
    assert kind == tkind, f"{where}: ours {kind} {value!r:.300} vs TGI {tkind} {tvalue!r:.300}"
    if kind == "error":
        assert value == tvalue, f"{where}: error differs"
        return
    _same_value(value, tvalue, where)


def _same_value(ours, theirs, where: str) -> None:
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor), where
        assert ours.dtype == theirs.dtype, f"{where}: dtype {ours.dtype} vs {theirs.dtype}"
        assert tuple(ours.shape) == tuple(theirs.shape), f"{where}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
        assert ours.device == theirs.device, where
        a = ours.contiguous().reshape(-1).view(torch.uint8) if ours.numel() else ours.reshape(-1)
        b = theirs.contiguous().reshape(-1).view(torch.uint8) if theirs.numel() else theirs.reshape(-1)
        assert torch.equal(a, b), f"{where}: bytes differ"
    elif isinstance(theirs, (tuple, list)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), f"{where}: {ours!r} vs {theirs!r}"
        for i, (x, y) in enumerate(zip(ours, theirs)):
            _same_value(x, y, f"{where}[{i}]")
    else:
        assert ours == theirs, f"{where}: {ours!r} vs {theirs!r}"


@pytest.mark.parametrize("rank,world", [(0, 2), (1, 2), (0, 1)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_streamer_weights_match_tgi_weights(tgi_weights_module, checkpoint, rank, world, dtype):
    from loader_plugins.tgi_adapter.weights import streamer_weights_class

    files, tensors = checkpoint
    TGIWeights = tgi_weights_module.Weights
    StreamerWeights = streamer_weights_class(tgi_weights_module)
    assert issubclass(StreamerWeights, TGIWeights) and StreamerWeights is not TGIWeights
    pg = FakeProcessGroup(rank, world)
    target = getattr(torch, dtype)
    loader = tgi_weights_module.DefaultWeightsLoader(tgi_weights_module.UnquantizedWeight)
    aliases = {"lm_head.weight": ["model.embed_tokens.weight"], "model.missing": ["model.norm.weight"]}
    settings = settings_from_env({})
    ours = StreamerWeights(files, "cpu", target, pg, loader, aliases=aliases, settings=settings)
    theirs = TGIWeights(files, "cpu", target, pg, loader, aliases=aliases)
    try:
        assert {k: str(v) for k, v in ours.routing.items()} == {k: str(v) for k, v in theirs.routing.items()}
        compared = 0
        # Every call twice: the second call of a tensor is served by a re-read, not the stream.
        for name, tensor in sorted(tensors.items()):
            for _ in range(2):
                for method, args, kwargs in call_matrix(name, tuple(tensor.shape)):
                    where = f"rank {rank}/{world} {dtype} {method}{args}{kwargs}"
                    _same(outcome(ours, method, args, kwargs), outcome(theirs, method, args, kwargs), where)
                    compared += 1
        # name resolution: aliases, missing names
        for method, args, kwargs in [("get_tensor", ("model.missing",), {}), ("has_tensor", ("model.missing",), {}),
                                     ("get_tensor", ("nope",), {}), ("has_tensor", ("nope",), {}),
                                     ("get_sharded", ("nope", 0), {}), ("get_shape", ("nope",), {})]:
            _same(outcome(ours, method, args, kwargs), outcome(theirs, method, args, kwargs), f"{method}{args}")
        # weights-loader helpers of the base class go through our get_* methods
        for method, args in [("get_weights_col_packed_qkv", ("model.layers.0.self_attn.qkv_proj", 2, 1)),
                             ("get_weights_col_packed_gate_up", ("model.layers.0.mlp.gate_up_proj",)),
                             ("get_multi_weights_col", (["model.layers.0.self_attn.o_proj"], 0)),
                             ("get_weights_row", ("model.layers.1.mlp.down_proj",)),
                             ("get_weights", ("lm_head",))]:
            a = outcome(ours, method, args, {})
            b = outcome(theirs, method, args, {})
            unwrap = lambda r: (r[0], getattr(r[1], "weight", r[1]))  # noqa: E731
            _same(unwrap(a), unwrap(b), f"{method}{args}")
        print(f"rank {rank}/{world} {dtype}: {compared} calls on {len(tensors)} tensors bit-identical to TGI")
    finally:
        ours.close()


def test_prefix_resolution_matches_tgi(tgi_weights_module, checkpoint):
    from loader_plugins.tgi_adapter.weights import streamer_weights_class

    files, _ = checkpoint
    pg = FakeProcessGroup(1, 2)
    StreamerWeights = streamer_weights_class(tgi_weights_module)
    kw = dict(aliases={"layers.0.self_attn.o_proj.weight": ["lm_head.weight"]}, prefix="model")
    ours = StreamerWeights(files, "cpu", torch.float16, pg, None, settings=settings_from_env({}), **kw)
    theirs = tgi_weights_module.Weights(files, "cpu", torch.float16, pg, None, **kw)
    try:
        for name in ["embed_tokens.weight", "model.embed_tokens.weight", "layers.0.self_attn.o_proj.weight",
                     "norm.weight", "lm_head.weight", "missing"]:
            for method, args in [("get_tensor", (name,)), ("has_tensor", (name,)), ("get_sharded", (name, 0)),
                                 ("get_filename", (name,))]:
                _same(outcome(ours, method, args, {}), outcome(theirs, method, args, {}), f"{method}{args}")
    finally:
        ours.close()


def test_speculator_files_added_to_routing_use_tgi(tgi_weights_module, checkpoint, tmp_path):
    """Medusa/MLP speculators add their own file to ``weights.routing`` after construction."""
    from safetensors.torch import save_file

    from loader_plugins.tgi_adapter.weights import streamer_weights_class

    files, _ = checkpoint
    extra = tmp_path / "medusa_lm_head.safetensors"
    head = torch.randn(6, 8).to(torch.bfloat16)
    save_file({"medusa.0.weight": head}, str(extra))
    pg = FakeProcessGroup(0, 2)
    ours = streamer_weights_class(tgi_weights_module)(files, "cpu", torch.float16, pg, None,
                                                      settings=settings_from_env({}))
    try:
        ours.routing["medusa.0.weight"] = str(extra)   # what layers/medusa.py does
        assert ours.get_tensor("medusa.0.weight").equal(head.to(torch.float16))
        assert ours.get_sharded("medusa.0.weight", 0).equal(head[:3].to(torch.float16))
        assert ours.get_shape("medusa.0.weight") == [6, 8]
        assert str(extra) in ours._handles      # served by TGI's safe_open handle
    finally:
        ours.close()


def test_hook_swaps_weights_in_real_tgi(checkpoint, monkeypatch, tmp_path):
    """The .pth hook's finder patches TGI's real weights and hub modules as they are imported."""
    source = _tgi_source()
    pytest.importorskip("huggingface_hub")
    from loader_plugins.tgi_adapter import hook

    saved = {k: v for k, v in sys.modules.items() if k.startswith("text_generation_server")}
    for name in list(saved):
        del sys.modules[name]
    files, _ = checkpoint
    monkeypatch.setenv("TGI_LOAD_FORMAT", "streamer")
    monkeypatch.setenv("TGI_STREAMER_WEIGHTS_URI", os.path.dirname(files[0]))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    try:
        hook.install()
        weights_module = import_tgi_weights_module(source)
        assert weights_module.Weights.__name__ == "StreamerWeights"
        assert weights_module._loader_plugins_original_weights in weights_module.Weights.__mro__
        from text_generation_server.utils.weights import Weights
        assert Weights is weights_module.Weights
        from loader_plugins.tgi_adapter import StreamerWeights
        assert StreamerWeights is Weights
        hub = importlib.import_module("text_generation_server.utils.hub")
        assert [os.path.basename(f) for f in hub.weight_files(str(model_dir))] == [os.path.basename(f) for f in files]
        monkeypatch.delenv("TGI_STREAMER_WEIGHTS_URI")
        with pytest.raises(FileNotFoundError):   # TGI's own behaviour: no weights in the model directory
            hub.weight_files(str(model_dir))
    finally:
        hook.uninstall()
        for name in [k for k in sys.modules if k.startswith("text_generation_server")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_download_weights_is_a_no_op_for_weights_elsewhere(checkpoint, monkeypatch, tmp_path, capsys):
    """TGI's real ``download-weights`` (cli.download_weights) returns at once when the hook serves
    ``TGI_STREAMER_WEIGHTS_URI``: its first step is ``utils.weight_files``."""
    import types

    source = _tgi_source()
    for module in ("typer", "huggingface_hub"):
        pytest.importorskip(module)
    from loader_plugins.tgi_adapter import hook

    saved = {k: v for k, v in sys.modules.items() if k.startswith("text_generation_server")}
    for name in list(saved):
        del sys.modules[name]
    files, _ = checkpoint
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    monkeypatch.setenv("TGI_LOAD_FORMAT", "streamer")
    monkeypatch.setenv("TGI_STREAMER_WEIGHTS_URI", os.path.dirname(files[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def stubs():
        # utils/adapter.py pulls in peft; cli.py needs only parse_lora_adapters from it.
        adapter = types.ModuleType("text_generation_server.utils.adapter")
        adapter.parse_lora_adapters = lambda *a, **k: []
        sys.modules[adapter.__name__] = adapter

    try:
        hook.install()
        hub = import_tgi_weights_module(source, module="text_generation_server.utils.hub", before_import=stubs)
        utils = sys.modules["text_generation_server.utils"]   # the stub package: what utils/__init__ re-exports
        utils.weight_files = hub.weight_files
        utils.LocalEntryNotFoundError = hub.LocalEntryNotFoundError
        utils.EntryNotFoundError = hub.EntryNotFoundError
        cli = importlib.import_module("text_generation_server.cli")
        cli.download_weights(str(model_dir), extension=".safetensors", logger_level="INFO", json_output=False)
        out = capsys.readouterr().out
        assert "Files are already present on the host. Skipping download." in out
        print(out)
    finally:
        hook.uninstall()
        for name in [k for k in sys.modules if k.startswith("text_generation_server")]:
            del sys.modules[name]
        sys.modules.update(saved)
