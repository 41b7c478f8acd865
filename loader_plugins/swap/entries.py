"""What a snapshot holds (:class:`StorageEntry`, :class:`TensorView`) and how an object's
tensors are found (:func:`named_tensors`, :func:`_plan_entries`)."""

from __future__ import annotations

import dataclasses
import logging
import types
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from ..core.header import safetensors_dtype
from ..errors import StreamerError
from .common import (
    ARENA_ALIGN,
    STORAGE_SUFFIX,
    SwapError,
)

if TYPE_CHECKING:

    pass

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# What a snapshot holds
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorView:
    """One named tensor over a storage: enough to rebuild it from the storage's bytes."""

    name: str
    dtype: Any                      # torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int             # in elements

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.itemsize

    def covers(self, storage_nbytes: int) -> bool:
        """True when this view is the whole storage, contiguous, from byte 0."""
        expected, step = [], 1
        for d in reversed(self.shape):
            expected.append(step)
            step *= max(d, 1)
        contiguous = all(s == e for s, e, d in zip(self.stride, reversed(expected), self.shape) if d != 1)
        return self.storage_offset == 0 and contiguous and self.nbytes == storage_nbytes

    def describe(self) -> list:
        return [self.name, str(self.dtype).replace("torch.", ""), list(self.shape), list(self.stride),
                self.storage_offset]


@dataclasses.dataclass
class StorageEntry:
    """One storage of the model: its views, where its bytes sit in the arena, how it was released."""

    views: list[TensorView]
    device: str
    nbytes: int
    arena_offset: int
    address: int                    # data_ptr when the snapshot was planned
    ref: Callable[[], Any]          # the first tensor over the storage (weak or strong)
    release: str = "none"           # how its memory was given back: pages / resize / none
    released_bytes: int = 0

    @property
    def name(self) -> str:
        return self.views[0].name

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def tensor(self):
        return self.ref()

    def file_entry(self) -> tuple[str, str, tuple[int, ...]]:
        """(key, safetensors dtype, shape) this storage is written under in a spill file."""
        for view in self.views:
            if view.covers(self.nbytes):
                try:
                    return view.name, safetensors_dtype(view.dtype), view.shape
                except StreamerError:
                    break
        return self.name + STORAGE_SUFFIX, "U8", (self.nbytes,)


def _strong(obj):
    return lambda: obj


# ----------------------------------------------------------------------------------------------
# Finding the tensors
# ----------------------------------------------------------------------------------------------

def _function_tensors(fn: Any) -> Iterator[tuple[str, Any]]:
    """Tensors captured by a function stored on a module (closure cells, default arguments)."""
    import torch

    if isinstance(fn, types.FunctionType):
        for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # empty cell
                continue
            if isinstance(value, torch.Tensor):
                yield f"<closure>.{var}", value
        for i, value in enumerate(fn.__defaults__ or ()):
            if isinstance(value, torch.Tensor):
                yield f"<default>.{i}", value


_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def named_tensors(obj: Any) -> list[tuple[str, Any]]:
    """Every (name, tensor) a snapshot of ``obj`` covers, in a stable order.

    A module contributes its parameters and buffers (tied ones under each name), tensors held as
    plain attributes, and tensors captured by functions held as attributes (``layer.cpu_linear``
    closures). Lists and dicts of tensors on a module (a KV cache) are not model state and are
    left out. A mapping contributes its items; a tensor or sequence of tensors, ``"0"``, ``"1"``...
    """
    import torch

    if isinstance(obj, torch.nn.Module):
        out: list[tuple[str, Any]] = []
        for mod_name, mod in obj.named_modules(remove_duplicate=False):
            prefix = f"{mod_name}." if mod_name else ""
            out.extend((prefix + n, p) for n, p in mod._parameters.items() if p is not None)
            out.extend((prefix + n, b) for n, b in mod._buffers.items() if b is not None)
            for attr, value in vars(mod).items():
                if attr in _MODULE_INTERNALS:
                    continue
                if isinstance(value, torch.Tensor):
                    out.append((prefix + attr, value))
                elif callable(value):
                    out.extend((f"{prefix}{attr}.{n}", t) for n, t in _function_tensors(value))
        return out
    if isinstance(obj, torch.Tensor):
        return [("0", obj)]
    if isinstance(obj, Mapping):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [(str(i), t) for i, t in enumerate(obj)]
    raise SwapError(f"cannot snapshot a {type(obj).__name__}: pass a torch.nn.Module, a tensor, a mapping "
                    f"name -> tensor or a sequence of tensors")


def _device_name(tensor) -> str:
    device = tensor.device
    return f"{device.type}:{device.index or 0}" if device.type == "cuda" else str(device)


def _plan_entries(obj: Any, exclude: Sequence[Any] = ()) -> tuple[list[StorageEntry], int, list[str]]:
    """Group the tensors by storage; lay the storages out in the arena. Returns (entries, bytes, skipped).

    Tensors over a storage of one of the ``exclude`` tensors (a KV cache the model references) are left out.
    """
    import torch

    weak = isinstance(obj, torch.nn.Module)
    entries: dict[tuple[str, int], StorageEntry] = {}
    skipped: list[str] = []
    excluded = {(_device_name(t), t.untyped_storage().data_ptr()) for t in exclude}
    for name, tensor in named_tensors(obj):
        if not isinstance(tensor, torch.Tensor):
            raise SwapError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized:
            skipped.append(name)
            continue
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:  # already empty (vLLM CPU leaves 0-element weights behind repacked layers)
            continue
        device = _device_name(tensor)
        key = (device, storage.data_ptr())
        if key in excluded:
            continue
        view = TensorView(name, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
        entry = entries.get(key)
        if entry is None:
            ref = weakref.ref(tensor) if weak else _strong(tensor)
            entries[key] = StorageEntry([view], device, nbytes, 0, storage.data_ptr(), ref)
        elif view not in entry.views:
            entry.views.append(view)
    pos = 0
    out = list(entries.values())
    for entry in out:
        entry.arena_offset = pos
        pos += -(-entry.nbytes // ARENA_ALIGN) * ARENA_ALIGN
    return out, pos, skipped
