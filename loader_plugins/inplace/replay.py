"""The real run: the model's ``load_weights`` sees every checkpoint tensor, once, for real.

Tensors the dry run placed (:class:`~.probe.Prediction`) are already streaming into their
regions of the model when the loader starts; the loader gets stand-ins for them (and for the
unused ones) first, then every other tensor as the stream completes it. Under
:class:`ReplayMode`:

* the loader's ``copy_`` of a placed stand-in into the region the dry run saw is *confirmed*
  and skipped: the streamer writes those bytes;
* anything else done with a stand-in gets its real value first (read from storage): the
  loader's code runs exactly as it would with vLLM's own loader;
* an operation on model memory that a placed tensor is still streaming into waits for it
  (or, if the loader has not copied that tensor yet, fails: the order of writes is unknown).

:meth:`ReplayMode.finish` checks that every placement was confirmed and that no stand-in
outlived the load: a loader that does not repeat what its dry run did is an error, never a
silently different model.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator, Mapping

import torch

from ..core.header import TensorSpec
from ..errors import InternalError, StreamerError
from .probe import METADATA_ONLY, _alive, Prediction, dest_signature, materialize, value_signature
from .standin import StandIn, StandInMode, byte_span, leaves, map_args, written_args


class InPlaceMismatch(StreamerError, RuntimeError):
    """The model's loader did not do what its dry run did with a tensor streamed in place."""


class ReplayMode(StandInMode):
    """See the module docstring. ``stream`` yields ``(name, tensor)`` as the reader completes
    them (placed tensors: their destination, once landed); ``read(names)`` reads tensors whole
    for stand-ins whose values the loader turns out to need."""

    def __init__(self, prediction: Prediction, specs: Mapping[str, TensorSpec],
                 stream: Iterator[tuple[str, torch.Tensor]], read: Callable[[list[str]], Mapping[str, torch.Tensor]],
                 order: Iterable[str], origin_of: Mapping[str, str]):
        super().__init__()
        self.prediction = prediction
        self._specs = specs
        self._stream = stream
        self._read = read
        self._order = [n for n in order if n in prediction.placements or n in prediction.unused]
        self.confirmed: set[str] = set()           # placed tensors whose every copy the loader repeated
        self._unconfirmed = {n: set(p.parts) for n, p in prediction.placements.items()}
        self.materialized: set[str] = set()
        self._values: dict[str, torch.Tensor] = dict(prediction.loaded)
        self._buffer: collections.deque = collections.deque()
        # placed pieces still streaming: storage address -> [(first byte, end byte, tensor, stream name)]
        self._pending: dict[int, list[tuple[int, int, str, str]]] = {}
        self._origin_of = dict(origin_of)
        self._piece_dest = {}
        pieces = {n: iter(p.pieces) for n, p in prediction.placements.items()}
        for key, name in self._origin_of.items():
            dest = next(pieces[name]).dest
            self._piece_dest[key] = dest
            span = byte_span(dest)
            if span is not None:
                self._pending.setdefault(span[0], []).append((span[1], span[2], name, key))
        self._given = collections.deque((n, self.origin(n, specs[n].torch_dtype(), specs[n].shape))
                                        for n in self._order)
        self._exhausted = False
        self.from_stream = 0           # tensors handed to the loader as the stream completed them

    # ---- what the loader iterates --------------------------------------------------------------
    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stand-ins first (made before the loader runs under this mode), then the rest."""
        while self._given:
            yield self._given.popleft()
        for name, tensor in self.prediction.loaded.items():
            yield name, tensor
        while True:
            if self._buffer:
                yield self._buffer.popleft()
                continue
            got = self._pull()
            if got is None:
                return
            self.from_stream += 1
            yield got

    def _pull(self) -> tuple[str, torch.Tensor] | None:
        """The next tensor for the loader; placed tensors that land on the way are recorded."""
        if self._exhausted:
            return None
        for name, tensor in self._stream:
            if name in self._origin_of:
                self._land(name)
                continue
            return name, tensor
        self._exhausted = True
        return None

    def _land(self, key: str) -> None:
        span = byte_span(self._piece_dest[key])
        if span is not None:
            regions = self._pending.get(span[0], [])
            regions[:] = [r for r in regions if r[3] != key]
            if not regions:
                self._pending.pop(span[0], None)

    def _wait(self, name: str) -> None:
        """Pump the stream until placed tensor ``name`` has landed (others are kept for the loader)."""
        while self._is_pending(name):
            got = self._pull()
            if got is None:
                if self._is_pending(name):
                    raise InternalError(f"the stream ended before {name!r} landed")
                return
            self.from_stream += 1
            self._buffer.append(got)

    def _is_pending(self, name: str) -> bool:
        return any(r[2] == name for regions in self._pending.values() for r in regions)

    # ---- stand-ins ---------------------------------------------------------------------------
    def on_copy(self, dst, src: StandIn, args, kwargs):
        name = src.origins[0]
        waiting = self._unconfirmed.get(name)
        part = (value_signature(src.value, src.cast), dest_signature(dst))
        if waiting and name not in self.materialized and part in waiting:
            waiting.discard(part)
            if not waiting:
                self.confirmed.add(name)
            return dst
        return self.on_standin_op(torch.ops.aten.copy_.default, args, kwargs, [src])

    def on_standin_op(self, func, args, kwargs, standins):
        real = {id(s): self.value_of(s) for s in standins}
        swap = lambda x: real.get(id(x), x)  # noqa: E731
        args = map_args(swap, args)
        kwargs = map_args(swap, kwargs)
        return self.on_real_op(func, args, kwargs, leaves(args, kwargs))

    def value_of(self, s: StandIn) -> torch.Tensor:
        """The real tensor stand-in ``s`` stands for (its checkpoint tensor read whole, once)."""
        name = s.origins[0]
        if name not in self._values:
            self._values.update(self._read([name]))
        self.materialized.add(name)
        return materialize(s, self._values[name])

    # ---- real tensors ------------------------------------------------------------------------
    def on_real_op(self, func, args, kwargs, flat):
        if self._pending and not func.is_view and func not in METADATA_ONLY:
            written = {id(t) for t in written_args(func, args, kwargs)}
            for x in flat:
                if isinstance(x, torch.Tensor):
                    self._before_access(x, f"{func} {'writes' if id(x) in written else 'reads'}")
        return func(*args, **kwargs)

    def _before_access(self, t: torch.Tensor, what: str) -> None:
        span = byte_span(t)
        if span is None or span[0] not in self._pending:
            return
        for start, end, name, _ in list(self._pending.get(span[0], ())):
            if start < span[2] and span[1] < end:
                if name not in self.confirmed:
                    raise InPlaceMismatch(
                        f"the model's loader ({what}) touched the destination of {name!r} before copying "
                        f"{name!r} into it, which its dry run did not do; load with --model-loader-extra-config "
                        f"'{{\"in_place\": false}}' and report the model")
                self._wait(name)

    def on_set_data(self, target: torch.Tensor, new):
        self._before_access(target, ".data assignment")
        return self.value_of(new) if isinstance(new, StandIn) else new

    # ---- the end -----------------------------------------------------------------------------
    def finish(self) -> None:
        """Wait for every placed tensor and check that the load did what the dry run saw."""
        while self._pull() is not None:   # the loader returned before the end: land the rest
            pass
        missing = sorted(set(self.prediction.placements) - self.confirmed)
        if missing:
            raise InPlaceMismatch(
                f"the model's loader did not copy {missing[:5]} ({len(missing)} tensor(s)) where its dry run did; "
                f"their bytes were streamed into the model anyway, so the model may be wrong: load with "
                f"--model-loader-extra-config '{{\"in_place\": false}}' and report the model")
        kept = _alive(self)
        if kept:
            raise InPlaceMismatch(
                f"the model's loader kept stand-ins for {sorted(kept)[:5]} beyond the load; load with "
                f"--model-loader-extra-config '{{\"in_place\": false}}' and report the model")
