"""A stand-in for ``torchvision`` (PyPI's build is CUDA-linked and does not load against the CPU
torch of the vLLM venv), so that vLLM's multimodal model files and transformers' image processors
import in the tests. Put on ``sys.path`` only for the engine subprocesses of
``test_vllm_multimodal.py``.

What is data is real: ``InterpolationMode`` (transformers maps PIL resampling filters to it when
its image modules are imported). Every function is a stand-in that, if called, records the call in
``$LP_TORCHVISION_STANDIN_LOG`` and raises: the tests select transformers' PIL image processors
(``mm_processor_kwargs={"backend": "pil"}``), which never call torchvision, and fail when the log
has a line. ``__version__`` is below 0.27, so transformers keeps its PIL default for the
processors that resample with Lanczos (Idefics3, SmolVLM).
"""

from __future__ import annotations

import enum
import os
import sys
import types

__version__ = "0.0.0+standin"


class StandInCalled(RuntimeError):
    """A stand-in torchvision function was called: image processing left the PIL path."""


class InterpolationMode(enum.Enum):
    """torchvision.transforms.InterpolationMode's members and values."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _stand_in(qualname: str):
    def call(*args, **kwargs):
        path = os.environ.get("LP_TORCHVISION_STANDIN_LOG")
        if path:
            with open(path, "a") as f:
                f.write(f"{os.getpid()} {qualname}\n")
        raise StandInCalled(f"torchvision stand-in: {qualname}() was called; there is no torchvision here")

    call.__name__ = call.__qualname__ = qualname.rsplit(".", 1)[-1]
    return call


def _module_getattr(modname: str):
    def __getattr__(name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{modname}.{name}")
    return __getattr__


__getattr__ = _module_getattr("torchvision")

_DATA = {"InterpolationMode": InterpolationMode}
_SUBMODULES = ("io", "ops", "ops.boxes", "ops.misc", "models", "utils", "transforms", "transforms.functional",
               "transforms.v2", "transforms.v2.functional")
for _sub in _SUBMODULES:
    _name = f"torchvision.{_sub}"
    _mod = types.ModuleType(_name)
    _mod.__getattr__ = _module_getattr(_name)
    if _sub.startswith("transforms"):
        _mod.InterpolationMode = InterpolationMode
    sys.modules[_name] = _mod
    _parent, _, _leaf = _name.rpartition(".")
    setattr(sys.modules[_parent], _leaf, _mod)
