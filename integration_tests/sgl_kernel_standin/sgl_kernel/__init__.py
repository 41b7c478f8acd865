"""A stand-in for ``sgl_kernel`` (SGLang's kernels; its CPU build is on no registry), so that
SGLang's CPU engine imports in the tests. Every function is a stand-in that, if called, records
the call in ``$LP_SGL_KERNEL_STANDIN_LOG`` and raises: SGLang must take its plain-torch paths
(``--attention-backend torch_native``). The tests fail when the log has a line.

Submodules SGLang imports on the Llama, Qwen and MoE paths are the same kind of module; there is
deliberately no ``sgl_kernel.scalar_type`` (SGLang falls back to its own when the import fails).
"""

from __future__ import annotations

import os
import sys
import types

__version__ = "0.0.0+standin"


class StandInCalled(RuntimeError):
    """A stand-in sgl_kernel function was called: the CPU engine left its torch paths."""


def _stand_in(qualname: str):
    def call(*args, **kwargs):
        path = os.environ.get("LP_SGL_KERNEL_STANDIN_LOG")
        if path:
            with open(path, "a") as f:
                f.write(f"{os.getpid()} {qualname}\n")
        raise StandInCalled(f"sgl_kernel stand-in: {qualname}() was called; there is no kernel here")

    call.__name__ = call.__qualname__ = qualname.rsplit(".", 1)[-1]
    return call


def _module_getattr(modname: str):
    def __getattr__(name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stand_in(f"{modname}.{name}")
    return __getattr__


__getattr__ = _module_getattr("sgl_kernel")

for _sub in ("allreduce", "elementwise", "flash_attn", "kvcacheio", "mamba", "quantization", "speculative", "utils"):
    _mod = types.ModuleType(f"sgl_kernel.{_sub}")
    _mod.__getattr__ = _module_getattr(f"sgl_kernel.{_sub}")
    sys.modules[_mod.__name__] = _mod
    globals()[_sub] = _mod
