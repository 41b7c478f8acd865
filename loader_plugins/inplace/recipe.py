"""Placements learned from a real load and reused by the next load of the same model.

At MoE scale the dry run costs more than it saves (tens of thousands of expert copies, each
one Python round trip through the model's loader), and so does the loader itself: vLLM's
per-expert ``weight_loader`` is most of a per-expert checkpoint's load time. So a load that
gives every tensor to the loader (``in_place="auto"`` on such a checkpoint) runs it for real
under :class:`RecordMode`, which only watches: which checkpoint tensor was copied, whole and
once, into which region of which parameter, what else the loader wrote, whether it kept a
tensor or changed a module's attributes. The same rules as the dry run's decide what could
have been streamed in place (:func:`~.probe.classify`); the result is a :class:`Recipe`,
saved under a key that names everything the loader's behaviour depends on (engine version,
model class and its source, parameter layout, checkpoint tensors, engine config, rank).

The next load with that key streams the recipe's tensors straight into their regions and
gives the loader only the rest, under :class:`GuardMode`: before any operation of the loader
touches a streamed region, or writes memory of the model the recorded load did not write, the
load stops (nothing written yet), the recipe is dropped and the load runs again as the
recorded one did. So a loader that would now behave differently costs a second load, never a
different model.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import hashlib
import inspect
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from ..core.header import TensorSpec, safetensors_dtype
from ..core.tp import ColumnBlock
from .probe import METADATA_ONLY, Piece, Placement, Prediction, classify
from .standin import byte_span, leaves, written_args
from .state import _DATA, ModelState

log = logging.getLogger(__name__)

#: Bump when the recipe's meaning or layout changes: older files are then never matched.
RECIPE_VERSION = 1

aten = torch.ops.aten


def recipe_dir() -> Path:
    from ..cache.estimate import default_history_dir

    return default_history_dir() / "placements"


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name (shared ones under each name), as their raw data."""
    out: dict[str, torch.Tensor] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if t is not None:
            out[name] = _DATA.__get__(t, type(t))
    return out


def recipe_key(model: torch.nn.Module, specs: Mapping[str, TensorSpec], load_weights, engine_key: str) -> str:
    """A digest of what the loader's behaviour depends on: the engine's own key (its version,
    config, dtype, parallel rank), the model class and the source file it is defined in, the
    ``load_weights`` called, every parameter and buffer (name, shape, dtype, strides, offset,
    device) and every checkpoint tensor (name, dtype, shape)."""
    from .. import __version__

    h = hashlib.sha256()
    cls = type(model)
    fn = getattr(load_weights, "__func__", load_weights)
    parts: list[Any] = [RECIPE_VERSION, __version__, engine_key, f"{cls.__module__}.{cls.__qualname__}",
                        f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"]
    try:
        source = inspect.getsourcefile(cls)
        parts.append(hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else "")
    except (OSError, TypeError):
        parts.append("")
    parts.append([(n, tuple(t.shape), str(t.dtype), tuple(t.stride()), t.storage_offset(), t.device.type)
                  for n, t in model_tensors(model).items()])
    parts.append([(s.name, s.dtype, tuple(s.shape)) for s in specs.values()])
    h.update(json.dumps(parts, default=str).encode())
    return h.hexdigest()


@dataclasses.dataclass
class Recipe:
    """What a recorded load did: ``placed`` name -> pieces (model tensor, element offset,
    shape, strides, dtype, column block); ``unused``: tensors the loader did nothing with;
    ``writes``: model tensor -> byte ranges the loader's own work wrote (the tensors it was
    given: the rest); ``result``: what ``load_weights`` returned, when a set of names."""

    key: str
    placed: dict[str, list[list]]
    unused: list[str]
    writes: dict[str, list[list[int]]]
    result: list[str] | None
    regions: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return recipe_dir() / f"{self.key}.json"

    def save(self) -> None:
        target = self.path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".recipe-")
            with os.fdopen(fd, "w") as f:
                json.dump({k: v for k, v in dataclasses.asdict(self).items() if k != "regions"}, f,
                          separators=(",", ":"))
            os.replace(tmp, target)
        except OSError as exc:   # a read-only home: the next load records again
            log.info("placement recipe not saved to %s (%s)", target, exc)

    @classmethod
    def find(cls, key: str) -> "Recipe | None":
        path = recipe_dir() / f"{key}.json"
        try:
            data = json.loads(path.read_text())
            recipe = cls(**data)
        except (OSError, ValueError, TypeError):
            return None
        return recipe if recipe.key == key else None

    def forget(self) -> None:
        try:
            self.path.unlink()
        except OSError:
            pass

    def prediction(self, model: torch.nn.Module, specs: Mapping[str, TensorSpec], order: list[str]) -> Prediction | None:
        """The recipe's placements on this model's tensors; None when one no longer fits.
        ``self.regions`` then holds each piece's (storage, first byte, end byte, name)."""
        tensors = model_tensors(model)
        bases: dict[str, tuple] = {}
        placements: dict[str, Placement] = {}
        regions: list[tuple[int, int, int, str]] = []
        for name, pieces in self.placed.items():
            if name not in specs:
                return None
            made = []
            for target, offset, shape, stride, dtype, rows, row_bytes, start, width in pieces:
                known = bases.get(target)
                if known is None:
                    base = tensors.get(target)
                    if base is None:
                        return None
                    size = base.element_size()
                    known = bases[target] = (base, safetensors_dtype(base.dtype), size,
                                             base.untyped_storage().nbytes() // size, base.data_ptr() - base.storage_offset() * size)
                base, base_dtype, size, elements, ptr = known
                extent = sum((n - 1) * s for n, s in zip(shape, stride)) + 1 if shape else 1
                if base_dtype != dtype or offset < 0 or offset + extent > elements:
                    return None
                made.append(Piece(base.as_strided(shape, stride, offset), ColumnBlock(rows, row_bytes, start, width)))
                regions.append((ptr, offset * size, (offset + extent) * size, name))
            placements[name] = Placement(name, made, [], None)
        self.regions = regions
        placed_or_unused = set(placements) | set(self.unused)
        reasons = {n: "read for the loader" for n in order if n not in placed_or_unused}
        return Prediction(placements, set(self.unused), {}, reasons, note="placements recorded by an earlier load")


class Geometry:
    """Which elements of a checkpoint tensor a view holds (shape, strides, offset from its first
    element): what the dry run's meta views say, without making a tensor."""

    __slots__ = ("shape", "_stride", "_offset")

    def __init__(self, shape: tuple[int, ...], stride: tuple[int, ...], offset: int):
        self.shape, self._stride, self._offset = shape, stride, offset

    def stride(self) -> tuple[int, ...]:
        return self._stride

    def storage_offset(self) -> int:
        return self._offset

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Watch(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False   # as StandInMode: nothing is compiled while a loader runs


class RecordMode(_Watch):
    """Watches a real run of the model's loader over real checkpoint tensors (:meth:`weights`
    registers each one handed out) and records what :func:`~.probe.classify` needs: each
    checkpoint tensor's copies into model memory, its first other use, the byte spans read and
    written. Changes nothing."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.copies: dict[str, list] = {}
        self.other: dict[str, str] = {}
        self.spans: list[tuple[int, int, int, object]] = []
        self.temps: set[int] = set()
        self.writes: list[tuple[int, int, int]] = []       # pre-existing memory written by anything else
        self._starts: dict[int, list[int]] = {}           # checkpoint memory: storage -> sorted starts
        self._regions: dict[int, list[tuple[int, int, str, TensorSpec]]] = {}
        self._alive: dict[int, tuple[StorageWeakRef, list[str]]] = {}   # storage -> (weak ref, its tensors)
        self._state = ModelState(model)

    def weights(self, stream: Iterable[tuple[str, torch.Tensor]], specs: Mapping[str, TensorSpec]
                ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in stream:
            self._register(name, tensor, specs[name])
            yield name, tensor
            del tensor

    def _register(self, name: str, tensor: torch.Tensor, spec: TensorSpec) -> None:
        span = byte_span(tensor)
        if span is None:
            return
        ptr, start, end = span
        starts = self._starts.setdefault(ptr, [])
        regions = self._regions.setdefault(ptr, [])
        at = bisect.bisect(starts, start)
        starts.insert(at, start)
        regions.insert(at, (start, end, name, spec))
        entry = self._alive.get(ptr)
        if entry is None:
            entry = self._alive[ptr] = (StorageWeakRef(tensor.untyped_storage()), [])
        entry[1].append(name)

    def _inside(self, span) -> list[tuple[int, int, str, TensorSpec]]:
        """Checkpoint tensors whose bytes ``span`` overlaps."""
        regions = self._regions.get(span[0])
        if not regions:
            return []
        starts = self._starts[span[0]]
        i = max(0, bisect.bisect(starts, span[1]) - 1)
        out = []
        while i < len(regions) and regions[i][0] < span[2]:
            if regions[i][1] > span[1]:
                out.append(regions[i])
            i += 1
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.is_view:
            return func(*args, **kwargs)
        if func is aten.copy_.default and isinstance(args[1], torch.Tensor) and self._copy(args[0], args[1]):
            return func(*args, **kwargs)
        written = written_args(func, args, kwargs)
        written_ids = {id(t) for t in written}
        inputs: set[int] = set()
        reads = func not in METADATA_ONLY
        for x in leaves(args, kwargs):
            if not isinstance(x, torch.Tensor):
                continue
            span = byte_span(x)
            if span is None:
                continue
            inputs.add(span[0])
            inside = self._inside(span)
            if inside:
                for region in inside:
                    self.other.setdefault(region[2], f"{func} on it")
                continue
            if span[0] in self.temps:
                continue
            if id(x) in written_ids:
                self.spans.append((*span, "write"))
                self.writes.append(span)
            elif reads:
                self.spans.append((*span, "read"))
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor):
                span = byte_span(t)
                if span is not None and span[0] not in inputs:
                    self.temps.add(span[0])
        return out

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> bool:
        """Record ``dst.copy_(src)`` when ``src`` is (a view of) one checkpoint tensor."""
        span = byte_span(src)
        if span is None:
            return False
        inside = self._inside(span)
        if not inside:
            return False
        start, end, name, spec = inside[0]
        if len(inside) > 1 or span[1] < start or span[2] > end or src.dtype != spec.torch_dtype():
            for region in inside:
                self.other.setdefault(region[2], "copied from a view spanning other tensors")
            return False
        target = byte_span(dst)
        if target is None or target[0] in self.temps or self._inside(target):
            self.other.setdefault(name, "copied into a temporary" if target is not None else
                                  f"copied into a tensor without memory (on {dst.device.type})")
            for region in self._inside(target) if target is not None else ():
                self.other.setdefault(region[2], "written into by the loader")
            return True
        rel = (src.storage_offset() * src.element_size() - start) // spec.itemsize
        value = Geometry(tuple(src.shape), tuple(src.stride()), rel)
        self.copies.setdefault(name, []).append((dst, value, None, tuple(src.shape)))
        self.spans.append((*target, ("copy", name, len(self.copies[name]) - 1)))
        return True

    def on_set_data(self, target: torch.Tensor, new):
        """``target.data = new``: the model keeps a checkpoint tensor; the old memory counts as written."""
        span = byte_span(new) if isinstance(new, torch.Tensor) else None
        for region in self._inside(span) if span is not None else ():
            self.other.setdefault(region[2], "assigned to .data")
        old = byte_span(target)
        if old is not None and old[0] not in self.temps:
            self.spans.append((*old, "write"))
            self.writes.append(old)
        return new

    # ---- after the load ----------------------------------------------------------------------
    def kept(self) -> set[str]:
        """Checkpoint tensors whose memory something still references (the whole of a batch
        read together counts: any one of its tensors kept keeps them all). The collector runs
        only when some memory is still referenced (a cycle may hold it): a full collection of an
        engine's heap costs most of a second, and memory already freed stays freed."""
        def referenced() -> set[str]:
            return {n for ref, names in self._alive.values() if not ref.expired() for n in names}

        if not referenced():
            return set()
        gc.collect()
        return referenced()

    def recipe(self, key: str, model: torch.nn.Module, specs: Mapping[str, TensorSpec], order: list[str],
               result) -> "Recipe | None":
        """The recipe of this run, or None when this loader's run cannot be replayed from one."""
        if self._state.changed():
            log.info("no placement recipe: the model's loader changed attributes of the model")
            return None
        prediction = classify(self, specs, order, {}, self.kept())
        by_storage: dict[int, tuple[str, torch.Tensor]] = {}
        for name, t in model_tensors(model).items():
            span = byte_span(t)
            if span is not None:
                by_storage.setdefault(span[0], (name, t))
        placed: dict[str, list[list]] = {}
        for name, placement in prediction.placements.items():
            pieces = []
            for piece in placement.pieces:
                span = byte_span(piece.dest)
                owner = by_storage.get(span[0]) if span is not None else None
                if owner is None or owner[1].dtype != piece.dest.dtype:
                    pieces = None
                    break
                b = piece.block
                pieces.append([owner[0], piece.dest.storage_offset(), list(piece.dest.shape),
                               list(piece.dest.stride()), safetensors_dtype(piece.dest.dtype), b.rows, b.row_bytes,
                               b.start, b.width])
            if pieces:
                placed[name] = pieces
        if not placed:
            return None
        writes: dict[str, list[list[int]]] = {}
        copies_of_others = [s for s in self.spans if isinstance(s[3], tuple) and s[3][1] not in placed]
        for ptr, start, end, *_ in list(self.writes) + copies_of_others:
            owner = by_storage.get(ptr)
            if owner is None:
                log.info("no placement recipe: the model's loader wrote memory that is no parameter or buffer")
                return None
            writes.setdefault(owner[0], []).append([start, end])
        unused = sorted(prediction.unused)
        names = result if isinstance(result, (set, frozenset)) and all(isinstance(n, str) for n in result) else None
        return Recipe(key, placed, unused, writes, sorted(names) if names is not None else None)


class Deviation(RuntimeError):
    """The loader, given the tensors a recipe leaves it, did something its recorded run did not."""


class GuardMode(_Watch):
    """Runs the loader over the tensors a :class:`Recipe` leaves it and stops it (raising
    :class:`Deviation` before the operation runs) on any access to a region the stream fills,
    and on any write into model memory the recorded run did not write."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe):
        super().__init__()
        self.deviation: str | None = None
        self._owner: dict[int, str] = {}
        for name, t in model_tensors(model).items():
            span = byte_span(t)
            if span is not None:
                self._owner.setdefault(span[0], name)
        self._placed: dict[int, list[tuple[int, int, str]]] = {}
        for ptr, start, end, name in recipe.regions:      # as Recipe.prediction() laid them out
            self._placed.setdefault(ptr, []).append((start, end, name))
        self._writes = {n: {tuple(r) for r in ranges} for n, ranges in recipe.writes.items()}   # looked up per write
        self._written: set[tuple[str, int, int]] = set()    # what this run's loader wrote, as recorded
        self._temps: set[int] = set()
        self._state = ModelState(model)

    def _stop(self, why: str):
        self.deviation = why
        raise Deviation(why)

    def _check(self, t: torch.Tensor, written: bool, what: str) -> None:
        span = byte_span(t)
        if span is None or span[0] in self._temps:
            return
        for start, end, name in self._placed.get(span[0], ()):
            if start < span[2] and span[1] < end:
                self._stop(f"{what} touches the region {name!r} is streamed into")
        if written:
            owner = self._owner.get(span[0])
            ranges = self._writes.get(owner, ()) if owner is not None else ()
            if (span[1], span[2]) not in ranges:
                self._stop(f"{what} writes {owner or 'model memory'} bytes [{span[1]}, {span[2]}), which the recorded "
                           f"load did not")
            self._written.add((owner, span[1], span[2]))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.is_view or func in METADATA_ONLY:
            out = func(*args, **kwargs)
            if not func.is_view:
                self._temp(out)
            return out
        written = {id(t) for t in written_args(func, args, kwargs)}
        inputs = set()
        for x in leaves(args, kwargs):
            if isinstance(x, torch.Tensor):
                self._check(x, id(x) in written, str(func))
                span = byte_span(x)
                if span is not None:
                    inputs.add(span[0])
        out = func(*args, **kwargs)
        self._temp(out, inputs)
        return out

    def _temp(self, out, inputs=frozenset()) -> None:
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor):
                span = byte_span(t)
                if span is not None and span[0] not in inputs:
                    self._temps.add(span[0])

    def on_set_data(self, target: torch.Tensor, new):
        self._stop(".data assignment, which the recorded load did not make")

    def finish(self) -> None:
        """After the loader returned: it changed no attribute and wrote everything the recorded
        load wrote (a write it left out, e.g. one that depended on seeing a tensor the recipe
        does not give it, would leave memory as allocated)."""
        if self._state.changed():
            self._state.restore()
            self._stop("the loader changed attributes of the model, which the recorded load did not")
        missing = [(n, a, b) for n, ranges in self._writes.items() for a, b in ranges if (n, a, b) not in self._written]
        if missing:
            n, a, b = missing[0]
            self._stop(f"the loader did not write {n} bytes [{a}, {b}) ({len(missing)} region(s)), which the recorded "
                       f"load wrote")
