"""What the stand-in packages share (``sgl_kernel_standin/``, ``torchvision_standin/``): functions
that, if called, record the call in the log an environment variable names and raise, and modules
whose every attribute is such a function.

A stand-in's ``__init__`` loads this file by its path (:func:`load`), since the engines' PYTHONPATH
may hold the stand-in's directory alone (``model-streamer bench sglang``).
"""

from __future__ import annotations

import os
import sys
import types


class StandIns:
    """The stand-ins of one package: ``package`` names it, ``log_env`` the variable naming the
    log, ``missing`` what is not there (in the message), ``error`` the package's exception."""

    def __init__(self, package: str, *, log_env: str, missing: str, error: type[Exception]):
        self.package = package
        self.log_env = log_env
        self.missing = missing
        self.error = error

    def function(self, qualname: str):
        log_env, error = self.log_env, self.error
        message = f"{self.package} stand-in: {qualname}() was called; there is no {self.missing} here"

        def call(*args, **kwargs):
            path = os.environ.get(log_env)
            if path:
                with open(path, "a") as f:
                    f.write(f"{os.getpid()} {qualname}\n")
            raise error(message)

        call.__name__ = call.__qualname__ = qualname.rsplit(".", 1)[-1]
        return call

    def module_getattr(self, modname: str):
        """A module ``__getattr__``: every public name is a stand-in function."""
        def __getattr__(name: str):
            if name.startswith("__") and name.endswith("__"):
                raise AttributeError(name)
            return self.function(f"{modname}.{name}")
        return __getattr__

    def submodules(self, names) -> dict[str, types.ModuleType]:
        """``package.NAME`` for each name (parents first: ``"a"`` before ``"a.b"``), each a module
        of stand-ins, importable and an attribute of its parent."""
        made = {}
        for sub in names:
            name = f"{self.package}.{sub}"
            module = types.ModuleType(name)
            module.__getattr__ = self.module_getattr(name)
            sys.modules[name] = module
            parent, _, leaf = name.rpartition(".")
            setattr(sys.modules[parent], leaf, module)
            made[sub] = module
        return made
