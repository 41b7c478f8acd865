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
import importlib.util
from pathlib import Path

__version__ = "0.0.0+standin"

# integration_tests/_standin.py (what the stand-ins share), by its path: the engines' PYTHONPATH may
# hold this directory alone
_spec = importlib.util.spec_from_file_location("_lp_standin", Path(__file__).resolve().parents[2] / "_standin.py")
_spec.loader.exec_module(_standin := importlib.util.module_from_spec(_spec))


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


_STAND_INS = _standin.StandIns("torchvision", log_env="LP_TORCHVISION_STANDIN_LOG", missing="torchvision",
                               error=StandInCalled)
__getattr__ = _STAND_INS.module_getattr("torchvision")
_SUBMODULES = ("io", "ops", "ops.boxes", "ops.misc", "models", "utils", "transforms", "transforms.functional",
               "transforms.v2", "transforms.v2.functional")
for _sub, _mod in _STAND_INS.submodules(_SUBMODULES).items():
    if _sub.startswith("transforms"):
        _mod.InterpolationMode = InterpolationMode
