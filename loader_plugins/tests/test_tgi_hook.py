"""The .pth activation hook, against a small fake of TGI's package layout (no TGI needed).

The fake has what the hook touches: ``text_generation_server.utils.weights.Weights`` and
``text_generation_server.utils.hub.weight_files``, imported by ``utils/__init__.py`` and by a
model module with ``from ... import`` as TGI does. Activation is checked in fresh interpreters
where ``site.addsitedir`` processes the shipped ``.pth`` file exactly as at start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from loader_plugins.tests.tgi_helpers import checkpoint_tensors, write_checkpoint
from loader_plugins.tgi_adapter import hook

REPO = Path(__file__).resolve().parents[2]
PTH = REPO / "loader_plugins" / "tgi_adapter" / hook.PTH_NAME

FAKE_WEIGHTS = '''
class Weights:
    """Stand-in for TGI's Weights: the constructor must never run under the hook."""
    def __init__(self, filenames, device, dtype, process_group, weights_loader, aliases=None, prefix=None):
        self.tgi_constructor_ran = True
        self.routing = {}
    def get_filename(self, tensor_name):
        filename = self.routing.get(tensor_name)
        if filename is None:
            raise RuntimeError(f"weight {tensor_name} does not exist")
        return str(filename), tensor_name
    def has_tensor(self, tensor_name):
        try:
            self.get_filename(tensor_name)
        except Exception:
            return False
        return True
'''
FAKE_HUB = '''
from pathlib import Path
def weight_files(model_id, revision=None, extension=".safetensors"):
    files = sorted(Path(model_id).glob("*" + extension))
    if not files:
        raise FileNotFoundError(f"No local weights found in {model_id} with extension {extension}")
    return files
'''
FAKE_UTILS_INIT = '''
from text_generation_server.utils.hub import weight_files
from text_generation_server.utils.weights import Weights
'''
FAKE_MODEL = '''
from text_generation_server.utils import weight_files, Weights
from text_generation_server.utils.weights import Weights as DirectWeights
'''


@pytest.fixture(scope="module")
def fake_tgi(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake-tgi")
    pkg = root / "text_generation_server"
    (pkg / "utils").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "utils" / "__init__.py").write_text(FAKE_UTILS_INIT)
    (pkg / "utils" / "weights.py").write_text(FAKE_WEIGHTS)
    (pkg / "utils" / "hub.py").write_text(FAKE_HUB)
    (pkg / "model.py").write_text(FAKE_MODEL)
    return root


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("site")
    shutil.copy(PTH, d / hook.PTH_NAME)
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


PROBE = textwrap.dedent('''
    import json, site, sys
    site.addsitedir(sys.argv[1])                  # processes loader_plugins_tgi.pth like start-up does
    report = {"hook_imported": "loader_plugins" in sys.modules}
    sys.path.insert(0, sys.argv[2])
    from text_generation_server import model
    from text_generation_server.utils import weights as weights_module, hub
    report["Weights"] = model.Weights.__name__
    report["same_class_everywhere"] = model.Weights is model.DirectWeights is weights_module.Weights
    report["bases"] = [c.__name__ for c in model.Weights.__mro__]
    if len(sys.argv) > 3:
        import torch
        from loader_plugins.tgi_adapter.tgi_source import FakeProcessGroup
        files = [str(f) for f in model.weight_files(sys.argv[3])]
        report["files"] = files
        w = model.Weights(files, "cpu", torch.float16, FakeProcessGroup(1, 2), None)
        report["tgi_constructor_ran"] = getattr(w, "tgi_constructor_ran", False)
        report["shard"] = w.get_sharded("model.embed_tokens.weight", 0).float().tolist()
        report["has"] = [w.has_tensor("lm_head.weight"), w.has_tensor("nope")]
        w.close()
    print("REPORT" + json.dumps(report))
''')


def run_probe(site: Path, fake: Path, env_extra: dict, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TGI_", "PYTHONPATH"))}
    env.update(env_extra)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(site), str(fake), *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT"))
    return json.loads(line[len("REPORT"):])


def test_shipped_pth_is_the_one_line_hook():
    text = PTH.read_text()
    assert text == hook.pth_line()
    assert text.startswith("import ") and text.count("\n") == 1   # site runs only lines starting with import


def test_inactive_without_the_switch(site_dir, fake_tgi):
    report = run_probe(site_dir, fake_tgi, {})
    assert report == {"hook_imported": False, "Weights": "Weights", "same_class_everywhere": True,
                      "bases": ["Weights", "object"]}
    report = run_probe(site_dir, fake_tgi, {"TGI_LOAD_FORMAT": "safetensors"})
    assert report["hook_imported"] is False and report["Weights"] == "Weights"


def test_active_with_the_switch(site_dir, fake_tgi, ckpt):
    files, tensors = ckpt
    directory = os.path.dirname(files[0])
    report = run_probe(site_dir, fake_tgi, {"TGI_LOAD_FORMAT": "streamer"}, directory)
    assert report["hook_imported"] is True
    assert report["Weights"] == "StreamerWeights"
    assert report["same_class_everywhere"] is True
    assert report["bases"] == ["StreamerWeights", "StreamedWeightsMixin", "Weights", "object"]
    assert report["tgi_constructor_ran"] is False
    assert report["files"] == files
    assert report["shard"] == tensors["model.embed_tokens.weight"][5:].half().float().tolist()
    assert report["has"] == [True, False]


def test_weights_uri_replaces_the_model_directory(site_dir, fake_tgi, ckpt, tmp_path):
    files, _ = ckpt
    model_dir = tmp_path / "model"        # config and tokenizer only: no weights
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    env = {"TGI_LOAD_FORMAT": "streamer", "TGI_STREAMER_WEIGHTS_URI": os.path.dirname(files[0])}
    report = run_probe(site_dir, fake_tgi, env, str(model_dir))
    assert report["files"] == files


def test_install_is_idempotent_and_patches_modules_already_imported(fake_tgi, ckpt, monkeypatch):
    files, _ = ckpt
    monkeypatch.syspath_prepend(str(fake_tgi))
    saved = {k: v for k, v in sys.modules.items() if k.startswith("text_generation_server")}
    for name in saved:
        del sys.modules[name]
    try:
        import text_generation_server.utils.hub as hub_module   # imported before the hook
        original = hub_module.weight_files
        hook.install()
        hook.install()
        assert sum(isinstance(f, hook.TGIPatchFinder) for f in sys.meta_path) == 1
        assert hub_module.weight_files is not original          # patched in place
        monkeypatch.setenv("TGI_STREAMER_WEIGHTS_URI", os.path.dirname(files[0]))
        assert hub_module.weight_files("any/model") == files
        assert [str(f) for f in hub_module.weight_files(os.path.dirname(files[0]), extension=".safetensors")] == files
        with pytest.raises(FileNotFoundError):   # other extensions: TGI's own lookup
            hub_module.weight_files(os.path.dirname(files[0]), extension=".bin")
        monkeypatch.delenv("TGI_STREAMER_WEIGHTS_URI")
        assert hub_module.weight_files(os.path.dirname(files[0])) == [Path(f) for f in files]
        import text_generation_server.utils.weights as weights_module   # imported after the hook
        assert weights_module.Weights.__name__ == "StreamerWeights"
        hook.install()                                     # patching twice keeps one class
        assert weights_module.Weights.__mro__[2] is weights_module._loader_plugins_original_weights
    finally:
        hook.uninstall()
        for name in [k for k in sys.modules if k.startswith("text_generation_server")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_weights_uri_with_an_index_lists_its_shards(tmp_path, ckpt):
    import json as _json

    from loader_plugins.tgi_adapter.settings import settings_from_env

    files, tensors = ckpt
    d = tmp_path / "w"
    d.mkdir()
    for f in files:
        shutil.copy(f, d)
    (d / "training_args.safetensors").write_bytes(Path(files[0]).read_bytes())
    config = settings_from_env({}).config
    names = [os.path.basename(f) for f in hook.list_weight_files(str(d), config)]
    assert names == [os.path.basename(f) for f in files]            # TGI's filter drops "*args*"
    first = checkpoint_tensors()[0]
    weight_map = {name: ("model-00001-of-00002.safetensors" if name in first else
                         "model-00002-of-00002.safetensors") for name in tensors}
    (d / "model.safetensors.index.json").write_text(_json.dumps({"weight_map": weight_map}))
    assert [os.path.basename(f) for f in hook.list_weight_files(str(d), config)] == names


def test_pth_line_costs_nothing_when_off():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TGI_")}
    env["PYTHONPATH"] = str(REPO)
    code = f"import sys; exec({hook.pth_line()!r}); print('loader_plugins' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    env["TGI_LOAD_FORMAT"] = " Streamer "
    code = (f"import sys; exec({hook.pth_line()!r}); from loader_plugins.tgi_adapter import hook; "
            f"print(sum(isinstance(f, hook.TGIPatchFinder) for f in sys.meta_path), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["1", "False"], out.stderr    # active, and torch not imported by the hook
