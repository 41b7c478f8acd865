"""The dry run: ask the model's own ``load_weights`` what it does with each checkpoint tensor.

:func:`predict` runs ``load_weights`` over :class:`~.standin.StandIn` tensors under
:class:`ProbeMode`. Nothing is read and nothing in the model changes: a write into memory
that existed before the run (parameters, buffers, anything else) is recorded and skipped, and
the modules' attributes, parameters and buffers are put back afterwards. What the run records
decides each tensor's fate:

* **in place**: its only use was one ``copy_`` of (a column block of) its bytes, at most cast
  once, into a contiguous region of a CPU or CUDA tensor that nothing else in the run wrote or
  read, and the loader kept no reference to it. The streamer reads those bytes straight into
  that region; the real run checks that the loader does the same copy again.
* **unused**: the loader never touched it (skipped names, tied weights): not read at all.
* **through the loader**: anything else (transposed, permuted, concatenated, scaled, cast
  twice, compared, quantized, copied twice or into a temporary, kept) gets real bytes.

An operation that needs a tensor's values (``.item()``, a comparison turned into a bool) gets
them: a view of the checkpoint tensor is read on the spot; a value computed from stand-ins
makes the run start again with those tensors read first. A loader that fails on stand-ins in a
way not attributable to one tensor leaves every tensor to the loader.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import time
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ..core.header import TensorSpec
from ..core.tp import ColumnBlock
from .standin import StandIn, StandInMode, byte_span, column_block, leaves, map_args, written_args
from .state import ModelState, patched_data_setter

log = logging.getLogger(__name__)

#: Attempts of the dry run before giving up (each one reads the tensors the previous one needed).
MAX_ATTEMPTS = 8


@dataclasses.dataclass
class Piece:
    """Bytes ``block`` of a checkpoint tensor, in order, go into ``dest`` (contiguous)."""

    dest: torch.Tensor
    block: ColumnBlock

    @property
    def whole(self) -> bool:
        return self.block.rows == 1 and self.block.start == 0 and self.block.width == self.block.row_bytes


@dataclasses.dataclass
class Placement:
    """Checkpoint tensor ``name`` goes straight into the model: each :class:`Piece` is a run of
    its bytes and the region of a model tensor it lands in (one piece, or one per part of a
    fused tensor the loader splits, e.g. q/k/v of a tensor-parallel rank); ``parts``: the
    ``copy_`` calls the loader made, as (value, destination) signatures, checked again in the
    real run; ``cast``: the dtype it was cast to on the way, if any."""

    name: str
    pieces: list[Piece]
    parts: list[tuple[tuple, tuple]]
    cast: torch.dtype | None

    @property
    def nbytes(self) -> int:
        return sum(p.block.nbytes for p in self.pieces)


@dataclasses.dataclass
class Prediction:
    """What the dry run decided, tensor by tensor."""

    placements: dict[str, Placement]
    unused: set[str]
    loaded: dict[str, torch.Tensor]        # read during the dry run because their values were needed
    reasons: dict[str, str]                # why each remaining tensor goes through the loader
    seconds: float = 0.0
    attempts: int = 0
    note: str = ""

    @classmethod
    def nothing(cls, names: Iterable[str], reason: str) -> "Prediction":
        return cls({}, set(), {}, {n: reason for n in names}, note=reason)


class NeedsData(Exception):
    """The dry run cannot go on without the real values of these checkpoint tensors."""

    def __init__(self, names: Iterable[str], why: str):
        self.names = set(names)
        super().__init__(f"{why} needs the values of {sorted(self.names)[:5]}")


def value_signature(value: torch.Tensor, cast) -> tuple:
    return (tuple(value.shape), tuple(value.stride()), value.storage_offset(), cast)


def dest_signature(t: torch.Tensor) -> tuple:
    return (byte_span(t), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)


def can_stream_cast(src: TensorSpec, dst: torch.dtype, device: torch.device) -> bool:
    """True when the sink that would fill a ``device`` tensor of ``dst`` makes the same bytes
    as ``copy_`` from ``src``'s dtype: no cast, or a floating-point one (torch's own ``copy_``
    on the CPU; CuPy kernels checked against torch's conversions on CUDA)."""
    src_dtype = src.torch_dtype()
    if dst == src_dtype:
        return True
    if not (dst.is_floating_point and src_dtype.is_floating_point):
        return False
    if device.type == "cuda":
        from ..core.sinks.cuda import convert_kernel, cuda_sink_available
        from ..core.header import safetensors_dtype

        if cuda_sink_available():
            try:
                return convert_kernel(src.dtype, safetensors_dtype(dst)) is not None
            except Exception:  # noqa: BLE001 - a dtype the header module does not name
                return False
    return True


class ProbeMode(StandInMode):
    """Records what ``load_weights`` does with stand-ins; writes into memory that existed
    before the run are skipped (see the module docstring)."""

    def __init__(self, read: Callable[[list[str]], Mapping[str, torch.Tensor]], loaded: dict[str, torch.Tensor]):
        super().__init__()
        self._read = read
        self.loaded = loaded                         # checkpoint tensors read so far (real values)
        self.current: str | None = None              # the last tensor handed to the loader
        self.copies: dict[str, list] = {}            # name -> [(dest, value, cast)]
        self.other: dict[str, str] = {}              # name -> first other use
        self.needs: set[str] = set()                 # opaque values needed: read these first next time
        self.spans: list[tuple[int, int, int, object]] = []   # (address, start, end, owner) touched
        self.temps: set[int] = set()                 # storages made during the run
        self.taint: dict[int, set[str]] = {}         # temporary storage -> origins its bytes came from

    # ---- stand-ins -------------------------------------------------------------------------
    def on_copy(self, dst, src: StandIn, args, kwargs):
        span = byte_span(dst)
        name = src.origins[0]
        if span is None:
            if dst.numel():
                self._use(src.origins, f"copied into a tensor without memory (on {dst.device.type})")
            return dst
        if span[0] in self.temps:
            self.taint.setdefault(span[0], set()).add(name)
            self._use(src.origins, "copied into a temporary")
            return dst
        self.copies.setdefault(name, []).append((dst, src.value, src.cast, tuple(src.shape)))
        self.spans.append((*span, ("copy", name, len(self.copies[name]) - 1)))
        return dst

    def on_standin_op(self, func, args, kwargs, standins):
        origins = {o for s in standins for o in s.origins}
        if gives_data(func):
            return self._with_values(func, args, kwargs, standins)   # a Python number or bool out of data
        self._use(origins, f"{func}")
        try:
            out = self.run_on_meta(func, args, kwargs, standins)
        except Exception as exc:  # noqa: BLE001 - no meta kernel: the values are needed
            raise self._need(origins, f"{func} ({exc.__class__.__name__})") from None
        for target in written_args(func, args, kwargs):
            if isinstance(target, StandIn):
                self._use(target.origins, f"modified in place by {func}")
            else:
                self._written(target, origins)
        return out

    def _with_values(self, func, args, kwargs, standins):
        """Run ``func`` on real values: read views of checkpoint tensors now; values computed
        from stand-ins cannot be had in this run (start again with their tensors read)."""
        origins = {o for s in standins for o in s.origins}
        if any(s.opaque for s in standins):
            raise self._need(origins, f"{func}")
        self._use(origins, f"its values are needed ({func})")
        missing = [o for o in origins if o not in self.loaded]
        if missing:
            self.loaded.update(self._read(missing))
        real = [x if not isinstance(x, StandIn) else materialize(x, self.loaded[x.origins[0]])
                for x in leaves(args, kwargs)]
        mapping = {id(s): r for s, r in zip(leaves(args, kwargs), real)}
        swap = lambda x: mapping.get(id(x), x)  # noqa: E731
        return func(*map_args(swap, args), **map_args(swap, kwargs))

    def _need(self, origins, why: str) -> NeedsData:
        self.needs |= set(origins)
        return NeedsData(origins, why)

    def _use(self, origins, why: str) -> None:
        for name in origins:
            self.other.setdefault(name, why)

    # ---- real tensors ----------------------------------------------------------------------
    def on_real_op(self, func, args, kwargs, flat):
        written = written_args(func, args, kwargs)
        written_ids = {id(t) for t in written}
        tainted: set[str] = set()
        reads = func not in METADATA_ONLY     # empty_like and the like use shapes only
        for x in flat:
            if not isinstance(x, torch.Tensor) or id(x) in written_ids:
                continue
            span = byte_span(x)
            if span is None:
                continue
            if span[0] in self.taint:
                tainted |= self.taint[span[0]]
            elif span[0] not in self.temps and reads:
                self.spans.append((*span, "read"))
        returns = func._schema.returns
        if tainted and gives_data(func):
            raise self._need(tainted, f"{func} on bytes copied from them")
        preexisting = []
        for target in written:
            span = byte_span(target)
            if span is None:
                continue
            if span[0] in self.temps:
                if tainted:
                    self.taint.setdefault(span[0], set()).update(tainted)
            else:
                preexisting.append(target)
                self._written(target, tainted)
        if preexisting:
            if len(returns) == 1 and returns[0].alias_info is not None and returns[0].alias_info.is_write:
                return written[0]          # an in-place op on the model: skipped
            clones = {id(t): t.clone() for t in preexisting}
            swap = lambda x: clones.get(id(x), x)  # noqa: E731
            out = func(*map_args(swap, args), **map_args(swap, kwargs))
        else:
            out = func(*args, **kwargs)
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor):
                span = byte_span(t)
                if span is not None:
                    self.temps.add(span[0])
                    if tainted:
                        self.taint.setdefault(span[0], set()).update(tainted)
        return out

    def _written(self, target: torch.Tensor, origins) -> None:
        span = byte_span(target)
        if span is not None:
            self.spans.append((*span, "write"))
        for name in origins:
            self.other.setdefault(name, "written into the model through another operation")

    def on_set_data(self, target: torch.Tensor, new):
        """``target.data = new``: a stand-in must become real first; the old bytes count as
        written (the dry run's :class:`ModelState` puts the old memory back)."""
        if isinstance(new, StandIn):
            raise self._need(new.origins, "assigning it to .data")
        span = byte_span(target)
        if span is not None and span[0] not in self.temps:
            self._written(target, ())
        return new


aten = torch.ops.aten

#: Calls that use their inputs' shapes and dtypes but never read their bytes.
METADATA_ONLY = frozenset({
    aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
    aten.new_empty_strided.default, aten.rand_like.default, aten.randn_like.default,
})

_GIVES_DATA: dict = {}


def gives_data(func) -> bool:
    """True when ``func`` returns something other than tensors (a number, a bool): its result
    is the input's data, which a stand-in does not have."""
    known = _GIVES_DATA.get(func)
    if known is None:
        known = False
        for r in func._schema.returns:
            t = r.type
            if isinstance(t, (torch.ListType, torch.OptionalType)):
                t = t.getElementType()
            if not isinstance(t, torch.TensorType):
                known = True
        _GIVES_DATA[func] = known
    return known


def materialize(s: StandIn, origin: torch.Tensor) -> torch.Tensor:
    """The real tensor a (non-opaque) stand-in stands for, given its checkpoint tensor's values."""
    value = origin.as_strided(s.value.shape, s.value.stride(), s.value.storage_offset())
    if s.cast is not None:
        value = value.to(s.cast)
    if s.device != value.device:
        value = value.to(s.device)
    if not s.direct:   # a copy: its own contiguous memory, as the copy would have
        value = value.clone(memory_format=torch.contiguous_format)
    return value


def predict(load_weights: Callable[[Iterator], object], model: torch.nn.Module, specs: Mapping[str, TensorSpec],
            read: Callable[[list[str]], Mapping[str, torch.Tensor]], *,
            order: Iterable[str] | None = None) -> Prediction:
    """Dry-run ``load_weights`` over stand-ins for ``specs`` and decide each tensor's fate.

    ``read(names)`` returns real tensors (as the checkpoint holds them) for values the loader
    needs. ``model`` is left as it was found.
    """
    t0 = time.perf_counter()
    names = list(order) if order is not None else list(specs)
    loaded: dict[str, torch.Tensor] = {}
    note = ""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        mode = ProbeMode(read, loaded)
        state = ModelState(model)
        error: BaseException | None = None

        given = collections.deque((n, loaded[n] if n in loaded else mode.origin(n, specs[n].torch_dtype(),
                                                                            specs[n].shape)) for n in names)

        def weights():
            while given:   # handed out one by one: nothing here keeps a stand-in the loader dropped
                name, tensor = given.popleft()
                mode.current = name
                yield name, tensor
            mode.current = None

        alive: set[str] = set()
        try:
            with patched_data_setter(mode), mode:
                load_weights(weights())
            alive = _alive(mode)   # before the model's state is put back: what it kept is still there
        except NeedsData:
            pass
        except Exception as exc:  # noqa: BLE001 - a loader that cannot run on stand-ins
            error = exc
        finally:
            state.restore()
        if mode.needs:
            missing = sorted(mode.needs - loaded.keys())
            if missing:
                loaded.update(read(missing))
                continue
        if error is not None:
            current = mode.current
            if current is not None and current not in loaded:
                loaded.update(read([current]))
                continue
            note = f"the dry run of load_weights failed ({error.__class__.__name__}: {error})"
            log.info("in-place prediction off for this load: %s", note)
            del error
            return _timed(Prediction.nothing(names, note), t0, attempt)
        prediction = classify(mode, specs, names, loaded, alive)
        return _timed(prediction, t0, attempt)
    note = f"the dry run needed real values {MAX_ATTEMPTS} times"
    return _timed(Prediction.nothing(names, note), t0, MAX_ATTEMPTS)


def _alive(mode: StandInMode) -> set[str]:
    """Checkpoint tensors whose stand-ins something still references."""
    alive = {o for s in list(mode.made) for o in s.origins}
    if alive:   # reference cycles hold stand-ins until the collector runs
        gc.collect()
        alive = {o for s in list(mode.made) for o in s.origins}
    return alive


def _timed(p: Prediction, t0: float, attempts: int) -> Prediction:
    p.seconds = time.perf_counter() - t0
    p.attempts = attempts
    return p


def classify(mode, specs, names, loaded, alive) -> Prediction:
    """Each tensor's fate from what a run recorded (``mode``: its ``copies``, ``other`` uses
    and byte ``spans``; :class:`ProbeMode` or :class:`~.recipe.RecordMode`): in place, unused
    or through the loader (with the reason)."""
    conflicts = _overlapping(mode.spans)
    placements: dict[str, Placement] = {}
    unused: set[str] = set()
    reasons: dict[str, str] = {}
    for name in names:
        if name in loaded:
            reasons[name] = mode.other.get(name, "its values were needed")
            continue
        copies = mode.copies.get(name, [])
        why = mode.other.get(name) or ("the loader kept a reference to it" if name in alive else None)
        if why is None and not copies:
            unused.add(name)
            continue
        if why is None:
            why = next((w for i, c in enumerate(copies) if (w := _reject(specs[name], c, ("copy", name, i) in conflicts))),
                       None)
        if why is None:
            placements[name] = _place(name, specs[name], copies)
            continue
        reasons[name] = why
    return Prediction(placements, unused, loaded, reasons)


def _reject(spec: TensorSpec, copy, conflicted: bool) -> str | None:
    """Why one ``copy_`` of a stand-in cannot be done by the streamer (None: it can)."""
    dst, value, cast, shape = copy
    if tuple(dst.shape) != shape:
        return f"broadcast from {list(shape)} into {list(dst.shape)}"
    if dst.device.type not in ("cpu", "cuda"):
        return f"destination on {dst.device.type}"
    if not dst.is_contiguous():
        return "destination is not contiguous"
    if getattr(dst, "is_quantized", False) or dst.is_sparse:
        return "destination is quantized or sparse"
    if cast is not None and cast != dst.dtype:
        return f"cast to {cast} and then to {dst.dtype}"
    if not can_stream_cast(spec, dst.dtype, dst.device):
        return f"cast from {spec.dtype} to {dst.dtype} is not one the sink makes like torch"
    if column_block(value, spec.itemsize, spec.numel) is None:
        return "a strided view (transposed, broadcast or stepped)"
    if conflicted:
        return "its destination is written or read by another operation of the loader"
    return None


def _place(name: str, spec: TensorSpec, copies) -> Placement:
    """One placement for the copies of one tensor: one piece per copy, except that copies of
    consecutive byte ranges into consecutive memory of one tensor (a fused q/k/v tensor split
    by the loader and laid out again in the same order) become one piece."""
    parts = [(value_signature(value, cast), dest_signature(dst)) for dst, value, cast, _ in copies]
    found = sorted(((column_block(value, spec.itemsize, spec.numel), dst) for dst, value, _, _ in copies),
                   key=lambda p: (p[0].rows, p[0].start))
    pieces: list[Piece] = []
    for block, dst in found:
        if pieces and _continues(pieces[-1], block, dst):
            last = pieces[-1]
            width = last.block.width + block.width
            dest = last.dest.as_strided((width // spec.itemsize,), (1,), last.dest.storage_offset())
            pieces[-1] = Piece(dest, ColumnBlock(1, block.row_bytes, last.block.start, width))
        else:
            pieces.append(Piece(dst, block))
    return Placement(name, pieces, parts, copies[0][2])


def _continues(piece: Piece, block: ColumnBlock, dst: torch.Tensor) -> bool:
    """True when ``block`` into ``dst`` carries on where ``piece`` ends, in the file and in memory."""
    a, b = byte_span(piece.dest), byte_span(dst)
    return (piece.block.rows == 1 and block.rows == 1 and block.start == piece.block.start + piece.block.width
            and dst.dtype == piece.dest.dtype and dst.device == piece.dest.device and a is not None
            and b is not None and a[0] == b[0] and b[1] == a[2])


def _overlapping(spans: list[tuple[int, int, int, object]]) -> set:
    """Owners of spans that overlap another span of the same storage."""
    out: set = set()
    active: list[tuple[int, int, int, object]] = []
    for span in sorted(spans, key=lambda s: (s[0], s[1])):
        active = [a for a in active if a[0] == span[0] and a[2] > span[1]]
        for a in active:
            out.add(a[3])
            out.add(span[3])
        active.append(span)
    return out
