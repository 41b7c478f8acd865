"""Activate the streamer inside TGI's Python server without changing TGI's code.

How it is reached: the wheel installs ``loader_plugins_tgi.pth`` into site-packages. Python's
``site`` module runs every line of a ``.pth`` file that starts with ``import`` while the
interpreter starts, in every process of that environment. Ours is one line::

    import os; os.environ.get("TGI_LOAD_FORMAT", "").strip().lower() == "streamer" and __import__(...).install()

so without ``TGI_LOAD_FORMAT=streamer`` it costs one dictionary lookup and imports nothing.
With it, :func:`install` puts a finder at the front of ``sys.meta_path`` that waits for two
TGI modules and patches each right after its own code has run, before any other module can
``from ... import`` the patched names:

* ``text_generation_server.utils.weights``: ``Weights`` becomes ``StreamerWeights`` (a subclass
  of the original, whose ``__init__`` and ``get_*`` stream through the core).
* ``text_generation_server.utils.hub``: when ``TGI_STREAMER_WEIGHTS_URI`` is set,
  ``weight_files(model_id, extension=".safetensors")`` returns the safetensors files at that URI
  (``s3://...`` or a local directory). ``text-generation-server download-weights`` calls it
  first and, when it succeeds, logs "Files are already present on the host. Skipping download."
  and returns, so the launcher's download step becomes a no-op for weights on S3 (for local
  weights TGI already skips it).

The hook imports neither TGI nor torch; it does its work only when TGI itself is imported.
"""

from __future__ import annotations

import functools
import importlib.abc
import logging
import os
import sys
import threading
from typing import Callable

from .settings import WEIGHTS_URI_ENV, settings_from_env, streamer_enabled

log = logging.getLogger(__name__)

WEIGHTS_MODULE = "text_generation_server.utils.weights"
HUB_MODULE = "text_generation_server.utils.hub"
PTH_NAME = "loader_plugins_tgi.pth"

_lock = threading.Lock()


def _patch_weights(module) -> None:
    from .weights import streamer_weights_class

    if getattr(module, "_loader_plugins_patched", False):
        return
    cls = streamer_weights_class(module)
    module._loader_plugins_original_weights = module.Weights
    module.Weights = cls
    module._loader_plugins_patched = True
    _bridge_logging_to_loguru()
    log.info("TGI_LOAD_FORMAT=streamer: %s.Weights is now loader_plugins' StreamerWeights", WEIGHTS_MODULE)


def list_weight_files(uri: str, config) -> list[str]:
    """The ``*.safetensors`` shards at ``uri`` (a directory, a prefix on S3, an index.json or a file).

    With ``model.safetensors.index.json`` the shards it names; otherwise every ``*.safetensors``
    except names containing "arguments", "args" or "training", as TGI filters a model directory.
    """
    from ..core.checkpoint import expand

    files, weight_map = expand(uri, config)
    if weight_map is None:
        files = [f for f in files
                 if not any(word in f.rsplit("/", 1)[-1] for word in ("arguments", "args", "training"))]
    return files


def _patch_hub(module) -> None:
    if getattr(module, "_loader_plugins_patched", False):
        return
    original: Callable = module.weight_files

    @functools.wraps(original)
    def weight_files(model_id, revision=None, extension=".safetensors"):
        settings = settings_from_env()
        if settings.weights_uri and extension == ".safetensors":
            files = list_weight_files(settings.weights_uri, settings.config)
            log.info("%s=%s: %d safetensors file(s) for %s", WEIGHTS_URI_ENV, settings.weights_uri,
                     len(files), model_id)
            return files
        return original(model_id, revision, extension)

    weight_files.__loader_plugins_original__ = original
    module.weight_files = weight_files
    module._loader_plugins_patched = True


_PATCHES: dict[str, Callable] = {WEIGHTS_MODULE: _patch_weights, HUB_MODULE: _patch_hub}


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the patch. Everything else is the real loader's."""

    def __init__(self, loader, patch: Callable):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, get_resource_reader...
        return getattr(self._loader, name)


class TGIPatchFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the modules it patches, asks the finders after it and wraps
    the loader of the spec they return."""

    def find_spec(self, fullname, path, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, TGIPatchFinder):
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            log.warning("cannot patch %s (loader %r); TGI will use its own Weights", fullname, spec.loader)
            return spec
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def install() -> bool:
    """Activate the streamer for TGI in this process; idempotent. Returns True when installed."""
    with _lock:
        if not any(isinstance(f, TGIPatchFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, TGIPatchFinder())
    # Modules imported before the hook was installed are patched in place.
    for name, patch in _PATCHES.items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
    return True


def uninstall() -> None:
    """Remove the finder and the log bridge (already patched modules stay patched). For tests."""
    global _bridge
    with _lock:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TGIPatchFinder)]
        if _bridge is not None:
            logging.getLogger("loader_plugins").removeHandler(_bridge)
            _bridge = None


def install_if_enabled() -> bool:
    """What the ``.pth`` line does, as a function: install when ``TGI_LOAD_FORMAT=streamer``."""
    if streamer_enabled():
        return install()
    return False


def pth_line() -> str:
    """The single line of ``loader_plugins_tgi.pth`` (kept in sync with the shipped file by a test)."""
    return ('import os; os.environ.get("TGI_LOAD_FORMAT", "").strip().lower() == "streamer" and '
            '__import__("loader_plugins.tgi_adapter.hook", fromlist=["install"]).install()\n')


def installed_pth_paths() -> list[str]:
    """Where this interpreter's site directories hold ``loader_plugins_tgi.pth``."""
    import site

    dirs = list(getattr(site, "getsitepackages", lambda: [])())
    user = getattr(site, "getusersitepackages", lambda: None)()
    if user:
        dirs.append(user)
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    seen, found = set(), []
    for d in dirs:
        path = os.path.join(d, PTH_NAME)
        if d not in seen and os.path.isfile(path):
            found.append(path)
        seen.add(d)
    return found


_bridge: logging.Handler | None = None


def _bridge_logging_to_loguru() -> None:
    """TGI logs with loguru and shows only records of modules named ``text_generation_server*``:
    forward this package's ``logging`` records (INFO and up) there, under that name."""
    global _bridge
    if _bridge is not None:
        return
    try:
        from loguru import logger as loguru_logger
    except ImportError:
        return
    tgi_logger = loguru_logger.patch(lambda record: record.update(name="text_generation_server.loader_plugins"))

    class _ToLoguru(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                level = loguru_logger.level(record.levelname).name
            except ValueError:
                level = record.levelno
            tgi_logger.opt(exception=record.exc_info).log(level, "{}", record.getMessage())

    package_logger = logging.getLogger("loader_plugins")
    _bridge = _ToLoguru(level=logging.INFO)
    package_logger.addHandler(_bridge)
    if package_logger.level == logging.NOTSET or package_logger.level > logging.INFO:
        package_logger.setLevel(logging.INFO)
