"""TGI's ``Weights`` run outside a TGI server, on CPU: for the TGI benchmark and the tests that
compare :class:`~loader_plugins.tgi_adapter.weights.StreamedWeightsMixin` with TGI's own.

* :func:`import_tgi_weights_module`: TGI's ``text_generation_server.utils.weights`` (or another
  module of its server) from a source checkout, with stub parent packages, so only torch,
  safetensors and loguru are needed (TGI's server is on no package registry).
* :class:`FakeProcessGroup`: the ``rank()`` and ``size()`` of one rank of a tensor-parallel group,
  the two methods ``Weights`` calls on its process group, without ``torch.distributed``.

Nothing here imports TGI or torch at module level.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path
from typing import Callable

__all__ = ["FakeProcessGroup", "import_tgi_weights_module", "tgi_server_dir"]


class FakeProcessGroup:
    """A stand-in for ``torch.distributed.ProcessGroup`` that only answers ``rank()`` and ``size()``.

    TGI's ``Weights`` asks its process group for nothing else: the rank and the world size pick
    which block of a sharded tensor this rank reads. With this object one process can play rank
    ``rank`` of ``size`` and read exactly that rank's shards, without
    ``torch.distributed.init_process_group`` and without the other ranks running (the TGI benchmark
    does, and the tests compare every rank's tensors with TGI's this way). It does no communication:
    code that calls a collective on it fails with ``AttributeError``.
    """

    def __init__(self, rank: int = 0, size: int = 1):
        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, size): got rank {rank} of {size}")
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"FakeProcessGroup(rank={self._rank}, size={self._size})"


def tgi_server_dir(source_dir: os.PathLike) -> Path:
    """The directory holding the ``text_generation_server`` package, from a TGI checkout (its root
    or its ``server/``) or from the package directory itself."""
    root = Path(source_dir)
    for candidate in (root / "server", root, root.parent):
        if (candidate / "text_generation_server" / "utils" / "weights.py").is_file():
            return candidate
    raise FileNotFoundError(f"{root}: no text_generation_server/utils/weights.py below it; point TGI_SOURCE_DIR "
                            f"at a text-generation-inference checkout")


def import_tgi_weights_module(source_dir: os.PathLike, *, module: str = "text_generation_server.utils.weights",
                              before_import: Callable[[], None] | None = None):
    """Import a module of TGI's server from ``source_dir`` without TGI's package ``__init__``s
    (which pull in grpc, the CUDA kernels...): the parent packages are stubs whose ``__path__``
    points at the sources."""
    package = tgi_server_dir(source_dir) / "text_generation_server"
    for name, path in (("text_generation_server", package), ("text_generation_server.utils", package / "utils")):
        existing = sys.modules.get(name)
        if existing is None or list(getattr(existing, "__path__", [])) != [str(path)]:
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]
            sys.modules[name] = stub
    if before_import is not None:
        before_import()
    return importlib.import_module(module)
