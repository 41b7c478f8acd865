"""Stand-ins for checkpoint tensors, and the dispatch mode both runs of the model's loader share.

A :class:`StandIn` looks like the CPU tensor a safetensors iterator would hand the model's
``load_weights`` (shape, dtype, device, strides) but holds no bytes. It carries its *value*: a
meta tensor that is a view of its checkpoint tensor (``origin``), so every view the model's code
takes of it (``narrow`` for a tensor-parallel shard, ``view``, ``chunk``, ``select``, ``t()``)
says exactly which elements of the checkpoint tensor it stands for. Copies that keep the value
(``clone``, ``contiguous``, ``.to(dtype)`` once, ``.to(device)``) keep it too. Every other
operation that touches a stand-in makes an *opaque* stand-in: its value is no longer a view of
the checkpoint, so it cannot be streamed.

:class:`StandInMode` is the ``TorchDispatchMode`` under which the model's loader runs with
stand-ins. It computes views and value-preserving copies of stand-ins itself and hands every
other operation to its subclass: :class:`~.probe.ProbeMode` (the dry run) records and
suppresses, :class:`~.replay.ReplayMode` (the real run) confirms or materialises.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..core.tp import ColumnBlock

aten = torch.ops.aten

#: Views whose value is a function of the input's *logical* elements: computing them on the
#: value (a meta view of the checkpoint tensor) gives the value of the result.
_LOGICAL_VIEWS = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.slice.Tensor, aten.select.int, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.unbind.int, aten.detach.default, aten.alias.default,
    aten.diagonal.default, aten.unfold.default, aten.narrow.default, aten.lift_fresh.default,
})
#: Views that depend on the input's memory layout: only for stand-ins whose layout is their value's.
_LAYOUT_VIEWS = frozenset({aten.as_strided.default, aten._reshape_alias.default})
#: Copies whose value is the input's (one cast at most is allowed along the way).
_VALUE_COPIES = frozenset({aten.clone.default, aten._to_copy.default, aten.lift_fresh_copy.default})


class StandInEscaped(RuntimeError):
    """A stand-in was used outside the load that made it (stored by the model and used later)."""


class StandIn(torch.Tensor):
    """A checkpoint tensor's stand-in: metadata, no bytes (see the module docstring).

    ``origins``: names of the checkpoint tensors it derives from (one unless opaque);
    ``value``: meta tensor, a view of the origin's meta base, or None when opaque;
    ``cast``: the dtype the value was cast to once (None: the checkpoint's);
    ``direct``: its layout is its value's (views only, no copy since the checkpoint tensor).
    """

    origins: tuple[str, ...]
    value: torch.Tensor | None
    cast: torch.dtype | None
    direct: bool

    @staticmethod
    def __new__(cls, origins: tuple[str, ...], value: torch.Tensor | None, layout: torch.Tensor, *,
                dtype: torch.dtype, device: torch.device, cast: torch.dtype | None = None, direct: bool = False):
        self = torch.Tensor._make_wrapper_subclass(
            cls, layout.shape, strides=layout.stride(), storage_offset=layout.storage_offset(), dtype=dtype,
            device=device, requires_grad=False)
        self.origins = origins
        self.value = value
        self.cast = cast
        self.direct = direct
        return self

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise StandInEscaped(
            f"{func} on a stand-in for checkpoint tensor(s) {_origins_of(args, kwargs)} outside the load that "
            f"made it: the model's loader kept the tensor for later; load with "
            f"--model-loader-extra-config '{{\"in_place\": false}}' and report the model")

    def __repr__(self) -> str:  # the default repr would read the (absent) data
        return (f"StandIn({', '.join(self.origins)}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"{'opaque' if self.value is None else 'view'})")

    @property
    def opaque(self) -> bool:
        return self.value is None


def _origins_of(args, kwargs) -> list[str]:
    return sorted({o for x in leaves(args, kwargs) if isinstance(x, StandIn) for o in x.origins})


def leaves(args, kwargs) -> list:
    """The arguments of an aten call, one level of lists/tuples opened (all aten ever nests)."""
    out: list = []
    for group in (args, (kwargs or {}).values()):
        for a in group:
            if isinstance(a, (list, tuple)):
                out.extend(a)
            else:
                out.append(a)
    return out


def map_args(fn: Callable[[Any], Any], obj):
    """``obj`` (an aten call's args or kwargs) with ``fn`` applied to every leaf."""
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_args(fn, x) for x in obj)
    if isinstance(obj, dict):
        return {k: map_args(fn, v) for k, v in obj.items()}
    return fn(obj)


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``t``'s metadata (shape, strides, storage offset, dtype) and no data."""
    extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1 if t.numel() else 0
    storage = torch.empty(t.storage_offset() + extent, dtype=t.dtype, device="meta")
    return storage.as_strided(t.shape, t.stride(), t.storage_offset())


def column_block(value: torch.Tensor, itemsize: int, total: int) -> ColumnBlock | None:
    """The bytes of the checkpoint tensor that ``value`` (a meta view of it) holds, in
    ``value``'s row-major order, as a :class:`ColumnBlock`; None when they are not one. A
    column block is ``rows`` equal rows tiling the whole tensor and the same ``[start, start +
    width)`` of each: the whole tensor, a dim-0 shard (one row) and a narrow along a later dim
    are blocks; a transpose, a broadcast or a step is not. ``total``: the checkpoint tensor's
    element count (its value views start at storage offset 0)."""
    if value.numel() == 0:
        return None
    offset = value.storage_offset()
    dims = [(n, st) for n, st in zip(value.shape, value.stride()) if n != 1]
    k, inner = len(dims), 1
    while k and dims[k - 1][1] == inner:     # the contiguous innermost dims: one run per row
        inner *= dims[k - 1][0]
        k -= 1
    if k == 0:                               # one run
        if offset < 0 or offset + inner > total:
            return None
        return ColumnBlock(1, total * itemsize, offset * itemsize, inner * itemsize)
    row, rows = dims[k - 1][1], dims[k - 1][0]
    for j in range(k - 2, -1, -1):           # the outer dims must walk rows of one stride
        if dims[j][1] != dims[j + 1][1] * dims[j + 1][0]:
            return None
        rows *= dims[j][0]
    if rows * row != total or offset < 0 or offset + inner > row:
        return None
    return ColumnBlock(rows, row * itemsize, offset * itemsize, inner * itemsize)


class StandInMode(TorchDispatchMode):
    """Runs a model's loader over stand-ins: views and value copies of stand-ins are computed
    here; every other call goes to :meth:`on_copy` (a ``copy_`` from a stand-in into a real
    tensor), :meth:`on_standin_op` (any other call touching a stand-in) or :meth:`on_real_op`
    (no stand-in involved)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch >= 2.9 wraps a mode's __torch_dispatch__ in torch._disable_dynamo unless the mode
        # says no, which costs several times the operation itself (docs/measurements.md). Nothing
        # is compiled while a model's loader runs, so there is nothing for that wrapper to guard.
        return False

    def __init__(self) -> None:
        super().__init__()
        self.made: weakref.WeakSet = weakref.WeakSet()   # every stand-in this run created
        self.thread = threading.get_ident()

    # ---- making stand-ins ------------------------------------------------------------------
    def wrap(self, origins: tuple[str, ...], value: torch.Tensor | None, layout: torch.Tensor, *,
             dtype: torch.dtype, device, cast=None, direct=False) -> StandIn:
        s = StandIn(origins, value, layout, dtype=dtype, device=torch.device(device), cast=cast, direct=direct)
        self.made.add(s)
        return s

    def origin(self, name: str, dtype: torch.dtype, shape: Iterable[int]) -> StandIn:
        """The stand-in for checkpoint tensor ``name`` as a safetensors iterator yields it (make
        these before entering the mode: under it, the meta allocation would be one of its calls)."""
        base = torch.empty(tuple(shape), dtype=dtype, device="meta")
        return self.wrap((name,), base, base, dtype=dtype, device="cpu", direct=True)

    def opaque(self, origins, like: torch.Tensor, device) -> StandIn:
        return self.wrap(tuple(origins), None, like, dtype=like.dtype, device=device)

    # ---- dispatch --------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if StandIn not in types:
            if func.is_view:          # no data touched, and the result shares the input's memory
                return func(*args, **kwargs)
            return self.on_real_op(func, args, kwargs, leaves(args, kwargs))
        standins = [x for x in leaves(args, kwargs) if isinstance(x, StandIn)]
        first = args[0] if args else None
        single = len(standins) == 1 and first is standins[0] and not first.opaque
        if single and (func in _LOGICAL_VIEWS or (func in _LAYOUT_VIEWS and first.direct)):
            return self._view(func, first, args, kwargs)
        if single and func in _VALUE_COPIES:
            made = self._value_copy(func, first, kwargs)
            if made is not None:
                return made
        if (func is aten.copy_.default and not isinstance(args[0], StandIn) and isinstance(args[1], StandIn)
                and not args[1].opaque):
            return self.on_copy(args[0], args[1], args, kwargs)
        return self.on_standin_op(func, args, kwargs, standins)

    def _view(self, func, s: StandIn, args, kwargs):
        try:
            values = func(s.value, *args[1:], **kwargs)
        except RuntimeError:   # e.g. view() of a value that is not viewable that way: not a view any more
            return self.on_standin_op(func, args, kwargs, [s])
        layouts = values if s.direct else func(meta_like(s), *args[1:], **kwargs)
        if isinstance(layouts, torch.Tensor):
            return self.wrap(s.origins, values, layouts, dtype=s.dtype, device=s.device, cast=s.cast,
                             direct=s.direct)
        return type(layouts)(self.wrap(s.origins, v, lay, dtype=s.dtype, device=s.device, cast=s.cast,
                                       direct=s.direct) for v, lay in zip(values, layouts))

    def _value_copy(self, func, s: StandIn, kwargs) -> StandIn | None:
        dtype, device = s.dtype, s.device
        if func is aten._to_copy.default:
            if kwargs.get("layout") not in (None, torch.strided):
                return None
            dtype = kwargs.get("dtype") or s.dtype
            device = kwargs.get("device") or s.device
        cast = s.cast
        if dtype != s.dtype:
            if s.cast is not None:   # a second cast: the value is no longer one cast of the checkpoint's
                return None
            cast = dtype
        layout = torch.empty(s.shape, dtype=dtype, device="meta")
        return self.wrap(s.origins, s.value, layout, dtype=dtype, device=device, cast=cast, direct=False)

    # ---- hooks -----------------------------------------------------------------------------
    def on_copy(self, dst: torch.Tensor, src: StandIn, args, kwargs):
        raise NotImplementedError

    def on_standin_op(self, func, args, kwargs, standins: list[StandIn]):
        raise NotImplementedError

    def on_real_op(self, func, args, kwargs, flat: list):
        return func(*args, **kwargs)

    # ---- helpers for subclasses ------------------------------------------------------------
    def run_on_meta(self, func, args, kwargs, standins: list[StandIn]):
        """Compute ``func``'s outputs' metadata with every tensor argument on the meta device;
        outputs come back as opaque stand-ins of every origin involved (mutated real arguments
        are returned as they are: the caller decides what happens to them)."""
        origins = tuple(sorted({o for s in standins for o in s.origins}))
        device = next((x.device for x in leaves(args, kwargs)
                       if isinstance(x, torch.Tensor) and not isinstance(x, StandIn)), standins[0].device)
        meta_args = map_args(lambda x: meta_like(x) if isinstance(x, torch.Tensor) else x, args)
        meta_kwargs = map_args(lambda x: meta_like(x) if isinstance(x, torch.Tensor) else x, kwargs)
        out = func(*meta_args, **meta_kwargs)
        written = written_args(func, args, kwargs)
        if written and len(func._schema.returns) == 1 and isinstance(out, torch.Tensor):
            target = written[0]
            return target if not isinstance(target, StandIn) else self.opaque(origins, out, device)
        return map_args(lambda x: self.opaque(origins, x, device) if isinstance(x, torch.Tensor) else x, out)


_WRITES: dict = {}


def written_args(func, args, kwargs) -> list:
    """The tensors ``func`` writes into (``self`` of in-place ops, ``out=`` arguments)."""
    spec = _WRITES.get(func)
    if spec is None:
        spec = tuple((i, a.name) for i, a in enumerate(func._schema.arguments)
                     if a.alias_info is not None and a.alias_info.is_write)
        _WRITES[func] = spec
    out = []
    for index, name in spec:
        value = args[index] if index < len(args) else kwargs.get(name)
        if isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, torch.Tensor))
        elif isinstance(value, torch.Tensor):
            out.append(value)
    return out


def byte_span(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage address, first byte, end byte) that tensor ``t`` covers, or None when it covers
    nothing (no elements, no memory)."""
    numel = t.numel()
    if numel == 0 or t.is_meta or isinstance(t, StandIn):
        return None
    size = t.element_size()
    offset = t.storage_offset() * size
    ptr = t.data_ptr() - offset
    if not ptr:
        return None
    if t.is_contiguous():
        return ptr, offset, offset + numel * size
    extent = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
    return ptr, offset, offset + extent * size
