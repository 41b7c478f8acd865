"""A stand-in for ``sgl_kernel`` (SGLang's kernels; its CPU build is on no registry), so that
SGLang's CPU engine imports in the tests. Every function is a stand-in that, if called, records
the call in ``$LP_SGL_KERNEL_STANDIN_LOG`` and raises: SGLang must take its plain-torch paths
(``--attention-backend torch_native``). The tests fail when the log has a line.

Submodules SGLang imports on the Llama, Qwen and MoE paths are the same kind of module; there is
deliberately no ``sgl_kernel.scalar_type`` (SGLang falls back to its own when the import fails).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__version__ = "0.0.0+standin"

# integration_tests/_standin.py (what the stand-ins share), by its path: the engines' PYTHONPATH may
# hold this directory alone
_spec = importlib.util.spec_from_file_location("_lp_standin", Path(__file__).resolve().parents[2] / "_standin.py")
_spec.loader.exec_module(_standin := importlib.util.module_from_spec(_spec))


class StandInCalled(RuntimeError):
    """A stand-in sgl_kernel function was called: the CPU engine left its torch paths."""


_STAND_INS = _standin.StandIns("sgl_kernel", log_env="LP_SGL_KERNEL_STANDIN_LOG", missing="kernel",
                               error=StandInCalled)
__getattr__ = _STAND_INS.module_getattr("sgl_kernel")
_STAND_INS.submodules(("allreduce", "elementwise", "flash_attn", "kvcacheio", "mamba", "quantization", "speculative",
                       "utils"))
