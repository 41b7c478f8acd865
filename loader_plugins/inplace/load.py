"""One load of a checkpoint into an engine's model through the model's own ``load_weights``:
open the checkpoint once, dry-run the loader (:func:`~.probe.predict`), stream placed tensors
into the model while the loader runs for real over every tensor (:class:`~.replay.ReplayMode`).
Engine adapters call :func:`load_into_model` and report its :class:`LoadReport`."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

import torch

from ..cache.estimate import record_load
from ..config import StreamerConfig
from ..core.gcpause import paused_gc
from ..core.header import TensorSpec
from ..core.sources.base import scheme_of
from ..streamer import SafetensorsStreamer
from .probe import Prediction, predict
from .recipe import Deviation, GuardMode, Recipe, RecordMode, recipe_key
from .replay import ReplayMode
from .state import patched_data_setter
from .targets import stream_targets

log = logging.getLogger(__name__)

LoadWeights = Callable[[Iterator[tuple[str, torch.Tensor]]], Any]

#: ``in_place="auto"``: what the dry run and the checked real run cost per copy the loader
#: makes, above one plain ``load_weights`` call, and the rate at which a plain call pays for
#: the copy out of a buffer that streaming in place saves (both measured in vLLM's CPU engine:
#: docs/measurements.md, "In place or through load_weights"). In place unless the dry run
#: would cost more than the copy and more than :data:`PROBE_FLOOR_SECONDS`.
PROBE_SECONDS_PER_COPY = 500e-6
COPY_BYTES_PER_SECOND = 2e9
#: A dry run estimated below this is always done: at small tensor counts either way costs
#: little, and in place holds no second copy of the weights.
PROBE_FLOOR_SECONDS = 0.5


def choose_in_place(specs: Iterable[TensorSpec]) -> tuple[bool, str]:
    """``in_place="auto"``: stream in place (True) or give every tensor to the loader, and why.

    The loader's copies are estimated from the shapes: one per tensor, except that a tensor of
    three dimensions or more is taken for a stack of experts (transformers 5's fused
    ``mlp.experts.gate_up_proj`` [E, 2I, H]), which MoE loaders copy one expert at a time."""
    specs = list(specs)
    copies = sum(s.shape[0] if len(s.shape) >= 3 else 1 for s in specs)
    nbytes = sum(s.nbytes for s in specs)
    probe = copies * PROBE_SECONDS_PER_COPY
    copy = nbytes / COPY_BYTES_PER_SECOND
    if probe <= max(PROBE_FLOOR_SECONDS, copy):
        return True, ""
    return False, (f"in_place is auto and the loader's ~{copies} copies of {nbytes / max(copies, 1) / 1e3:.0f} kB on "
                   f"average make the dry run (~{probe:.1f} s) dearer than the copy it saves (~{copy:.2f} s)")


@dataclasses.dataclass
class LoadReport:
    """What one load did: ``result`` is what ``load_weights`` returned; ``stats`` the numbers
    (tensors and bytes in place, through ``load_weights``, unused; the dry run's cost) and
    ``stats["through"]``: each tensor given to the loader with real bytes, and why."""

    result: Any
    stats: dict[str, Any]
    recipe: Recipe | None = None     # placements this load recorded, saved by remember()

    def remember(self) -> None:
        """Save the placements this load recorded for the next load of the same model (call once
        the engine has checked the loaded model)."""
        if self.recipe is not None:
            self.recipe.save()
            self.stats["recipe"] = "recorded"
            self.recipe = None

    def summary(self) -> str:
        s = self.stats
        return (f"{s['bytes'] / 1e9:.3f} GB in {s['seconds']:.2f} seconds ({s['gbps']:.2f} GB/s) from {s['location']}: "
                f"{s['in_place']} tensors ({s['in_place_bytes'] / 1e9:.3f} GB) in place, {s['via_model']} tensors "
                f"({s['via_model_bytes'] / 1e9:.3f} GB) through the model's load_weights, {s['unused']} unused "
                f"tensors not read; dry run of load_weights {s['probe_seconds']:.2f} s")

    def reasons(self, top: int = 5) -> str:
        return "; ".join(f"{why} ({count})" for why, count in list(self.stats["reasons"].items())[:top])


def load_into_model(load_weights: LoadWeights, model: torch.nn.Module,
                    location: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], config: StreamerConfig, *,
                    in_place: bool | str = "auto", engine_key: str | None = None) -> LoadReport:
    """Load the checkpoint at ``location`` into ``model`` through ``load_weights`` (the model's
    own, called once with every tensor), streaming in place what its dry run shows is a plain copy.
    ``in_place=False``: every tensor through ``load_weights`` with real bytes, as they complete
    (no dry run, nothing watched); ``"auto"``: in place unless the dry run would cost more than
    it saves (:func:`choose_in_place`), and then with placements recorded by an earlier load of
    the same model when there are some (:mod:`.recipe`; ``engine_key``: what the engine adds to
    their key, None for no recipes)."""
    t0 = time.perf_counter()
    with SafetensorsStreamer(config) as streamer, paused_gc():
        checkpoint = streamer.open(location)
        specs = checkpoint.tensors
        file_index = {f: i for i, f in enumerate(checkpoint.files)}
        order = [s.name for s in sorted(specs.values(), key=lambda s: (file_index[s.file], s.offset))]
        why_not = "in_place is off"
        key = None
        if in_place == "auto":
            in_place, why_not = choose_in_place(specs.values())
            if not in_place and engine_key is not None:
                key = recipe_key(model, specs, load_weights, engine_key)
                recipe = Recipe.find(key)
                if recipe is not None:
                    report = _load_with_recipe(load_weights, model, streamer, checkpoint, str(location), config,
                                               order, recipe, t0)
                    if report is not None:
                        return report
                    checkpoint = streamer.open(location)   # the stream closed the sources
        if not in_place:
            return _load_plain(load_weights, model, streamer, checkpoint, str(location), config, order, why_not, t0,
                               key)
        prediction = predict(load_weights, model, specs, streamer.read_tensors, order=order)
        targets = stream_targets(prediction, checkpoint, order)
        stream = streamer._stream(None, targets.names, targets.destinations, keeps_all=False,
                                  shards=targets.shards or None, checkpoint=targets.checkpoint)
        mode = ReplayMode(prediction, specs, stream, streamer.read_tensors, order, targets.origin_of)
        try:
            with patched_data_setter(mode), mode:
                result = load_weights(mode.weights())
            mode.finish()
        finally:
            stream.close()
    return _report(result, str(location), checkpoint, prediction, mode, t0, streamer, config)


def _load_plain(load_weights: LoadWeights, model: torch.nn.Module, streamer: SafetensorsStreamer, checkpoint,
                location: str, config: StreamerConfig, order: list[str], why: str, t0: float,
                key: str | None = None) -> LoadReport:
    """Every tensor to ``load_weights`` as the reader completes it (vLLM's default loader's
    contract): no dry run and no stand-ins, so the loader runs at its own speed. With a recipe
    ``key``, the run is watched (:class:`~.recipe.RecordMode`) and its placements recorded."""
    stream = streamer._stream(None, None, None, keeps_all=False, checkpoint=checkpoint)
    record = RecordMode(model) if key is not None else None
    try:
        if record is None:
            result = load_weights(stream)
        else:
            with patched_data_setter(record), record:
                result = load_weights(record.weights(stream, checkpoint.tensors))
    finally:
        stream.close()
    report = _report(result, location, checkpoint, Prediction.nothing(order, why), None, t0, streamer, config)
    if record is not None:
        report.recipe = record.recipe(key, model, checkpoint.tensors, order, result)
    return report


def _load_with_recipe(load_weights: LoadWeights, model: torch.nn.Module, streamer: SafetensorsStreamer, checkpoint,
                      location: str, config: StreamerConfig, order: list[str], recipe: Recipe,
                      t0: float) -> LoadReport | None:
    """Stream the recipe's placements into the model and give ``load_weights`` the rest under
    :class:`~.recipe.GuardMode`; None when the loader deviates (the recipe is dropped: the
    caller loads again and records anew) or the recipe no longer fits this model."""
    prediction = recipe.prediction(model, checkpoint.tensors, order)
    if prediction is None:
        recipe.forget()
        return None
    targets = stream_targets(prediction, checkpoint, order)
    stream = streamer._stream(None, targets.names, targets.destinations, keeps_all=False,
                              shards=targets.shards or None, checkpoint=targets.checkpoint)
    guard = GuardMode(model, recipe)
    placed = targets.origin_of

    def given():
        for name, tensor in stream:
            if name not in placed:
                yield name, tensor

    try:
        try:
            with patched_data_setter(guard), guard:
                result = load_weights(given())
            guard.finish()
        except Deviation:
            pass
        if guard.deviation is None:
            for _ in stream:   # the placed tensors still landing
                pass
    finally:
        stream.close()
    if guard.deviation is not None:
        log.warning("the model's loader did not do what its recorded load did (%s): loading again through "
                    "load_weights and recording anew", guard.deviation)
        recipe.forget()
        return None
    if recipe.result is not None and isinstance(result, (set, frozenset)):
        result = set(result) | set(recipe.result)
    report = _report(result, location, checkpoint, prediction, None, t0, streamer, config)
    report.stats["recipe"] = "used"
    return report


def _report(result, location: str, checkpoint, prediction: Prediction, mode: ReplayMode | None, t0: float,
            streamer: SafetensorsStreamer, config: StreamerConfig) -> LoadReport:
    report = LoadReport(result, _stats(location, checkpoint.tensors, prediction, mode, time.perf_counter() - t0,
                                       streamer.stats.get("bytes_read")))
    if all(scheme_of(f) == "file" for f in checkpoint.files):   # tiered S3 loads record themselves
        record_load(config, "local", report.stats["bytes"], report.stats["seconds"])
    return report


def _stats(location: str, specs, prediction: Prediction, mode: ReplayMode | None, seconds: float,
           read_bytes: int | None) -> dict[str, Any]:
    placed = prediction.placements
    in_place_bytes = sum(p.nbytes for p in placed.values())
    materialized = mode.materialized if mode is not None else set()
    unused = prediction.unused - materialized
    through = [n for n in specs if n not in placed and n not in unused]
    through_bytes = sum(specs[n].nbytes for n in through)
    total = in_place_bytes + through_bytes
    reasons = collections.Counter(prediction.reasons.get(n, "read for the loader") for n in through)
    return {
        "location": location, "seconds": seconds, "bytes": total,
        "checkpoint_bytes": sum(spec.nbytes for spec in specs.values()),
        "gbps": total / seconds / 1e9 if seconds else 0.0,
        "in_place": len(placed), "in_place_bytes": in_place_bytes,
        # bytes the stream read from storage: a tensor-parallel rank, its shards' bytes only
        "read_bytes": read_bytes,
        "in_place_shards": sum(1 for p in placed.values() for piece in p.pieces if not piece.whole),
        "via_model": len(through), "via_model_bytes": through_bytes,
        "unused": len(unused), "unused_bytes": sum(specs[n].nbytes for n in unused),
        "probe_seconds": prediction.seconds, "probe_attempts": prediction.attempts,
        "probe_note": prediction.note, "reasons": dict(reasons.most_common()),
        "through": {n: prediction.reasons.get(n, "read for the loader") for n in through},
        "materialized": sorted(materialized - set(prediction.loaded)),
    }
