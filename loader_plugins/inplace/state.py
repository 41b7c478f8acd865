"""What a dry run of a model's loader must leave as it found it, and the one tensor API that
bypasses dispatch (``tensor.data = other``)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections import OrderedDict

import torch

_CONTAINERS = (dict, OrderedDict, list, set)
#: ``Tensor.data`` itself: some parameter classes override the attribute (vLLM's
#: SharedWeightParameter raises on it), the memory underneath is what matters here.
_BASE = getattr(torch._C, "TensorBase", None) or torch._C._TensorBase   # named _TensorBase before torch 2.3
_DATA = _BASE.__dict__["data"]


class ModelState:
    """Attributes of every module, parameter and buffer of ``model`` (one level into their
    dicts, lists and sets: ``_parameters``, ``_modules``...), and which memory each parameter
    and buffer uses. :meth:`restore` puts all of it back."""

    def __init__(self, model: torch.nn.Module):
        self._objects: list[tuple[object, dict, dict]] = []
        self._tensors: list[tuple[torch.Tensor, torch.Tensor, tuple]] = []
        seen: set[int] = set()
        for module in model.modules():
            self._keep(module, seen)
            for t in list(module._parameters.values()) + list(module._buffers.values()):
                if t is not None and id(t) not in seen:
                    self._keep(t, seen)
                    self._tensors.append((t, _DATA.__get__(t, type(t)), _where(t)))

    def _keep(self, obj, seen: set[int]) -> None:
        seen.add(id(obj))
        attrs = dict(obj.__dict__)
        inner = {k: (v, type(v)(v)) for k, v in attrs.items() if type(v) in _CONTAINERS}
        self._objects.append((obj, attrs, inner))

    def changed(self) -> bool:
        """Whether anything :meth:`restore` would put back differs now, leaving out values a
        ``functools.cached_property`` computed meanwhile (SGLang's ``FusedMoE.use_padded_loading``:
        derived from the module, and computed again on a fresh model)."""
        for obj, attrs, inner in self._objects:
            if not _same(_without_cached(obj, attrs), attrs):
                return True
            if any(not _same(container, saved) for container, saved in inner.values()):
                return True
        return any(_where(t) != where for t, _, where in self._tensors)

    def restore(self) -> None:
        for obj, attrs, inner in self._objects:
            if not _same(obj.__dict__, attrs):
                obj.__dict__.clear()
                obj.__dict__.update(attrs)
            for container, saved in inner.values():
                if not _same(container, saved):
                    if isinstance(container, list):
                        container[:] = saved
                    else:
                        container.clear()
                        container.update(saved)
        for t, data, where in self._tensors:
            if _where(t) != where:
                _DATA.__set__(t, data)


def _same(a, b) -> bool:
    """Equal by identity of the items (``==`` on tensors would compare their values)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    return a == b


def _without_cached(obj, before: dict) -> dict:
    """``obj.__dict__`` less the keys added since ``before`` that are ``cached_property`` values."""
    now = obj.__dict__
    added = [k for k in now if k not in before]
    if not added or not all(isinstance(inspect.getattr_static(type(obj), k, None), functools.cached_property)
                            for k in added):
        return now
    return {k: v for k, v in now.items() if k in before}


def _where(t: torch.Tensor) -> tuple:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        ptr = None
    return ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device


@contextlib.contextmanager
def patched_data_setter(mode):
    """While active, ``x.data = y`` on ``mode``'s thread goes through ``mode.on_set_data(x, y)``,
    which returns the tensor to assign (``tensor.data`` assignment is not an aten call, so no
    dispatch mode sees it)."""
    descriptor = _DATA
    had = "data" in torch.Tensor.__dict__
    previous = torch.Tensor.__dict__.get("data")
    thread = threading.get_ident()

    def fget(self):
        return descriptor.__get__(self, type(self))

    def fset(self, value):
        if threading.get_ident() == thread:
            value = mode.on_set_data(self, value)
        descriptor.__set__(self, value)

    torch.Tensor.data = property(fget, fset, doc=descriptor.__doc__)
    try:
        yield
    finally:
        if had:
            torch.Tensor.data = previous
        else:
            del torch.Tensor.data
