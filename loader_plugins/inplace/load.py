"""One load of a checkpoint into an engine's model through the model's own ``load_weights``:
open the checkpoint once, dry-run the loader (:func:`~.probe.predict`), stream placed tensors
into the model while the loader runs for real over every tensor (:class:`~.replay.ReplayMode`).
Engine adapters call :func:`load_into_model` and report its :class:`LoadReport`."""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from ..cache.estimate import record_load
from ..config import StreamerConfig
from ..core.sources.base import scheme_of
from ..streamer import SafetensorsStreamer
from .probe import Prediction, predict
from .replay import ReplayMode
from .state import patched_data_setter
from .targets import stream_targets

LoadWeights = Callable[[Iterator[tuple[str, torch.Tensor]]], Any]


@dataclasses.dataclass
class LoadReport:
    """What one load did: ``result`` is what ``load_weights`` returned; ``stats`` the numbers
    (tensors and bytes in place, through ``load_weights``, unused; the dry run's cost) and
    ``stats["through"]``: each tensor given to the loader with real bytes, and why."""

    result: Any
    stats: dict[str, Any]

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
                    in_place: bool = True) -> LoadReport:
    """Load the checkpoint at ``location`` into ``model`` through ``load_weights`` (the model's
    own, called once with every tensor), streaming in place what its dry run shows is a plain copy.
    ``in_place=False``: every tensor through ``load_weights`` with real bytes."""
    t0 = time.perf_counter()
    with SafetensorsStreamer(config) as streamer:
        checkpoint = streamer.open(location)
        specs = checkpoint.tensors
        file_index = {f: i for i, f in enumerate(checkpoint.files)}
        order = [s.name for s in sorted(specs.values(), key=lambda s: (file_index[s.file], s.offset))]
        if in_place:
            prediction = predict(load_weights, model, specs, streamer.read_tensors, order=order)
        else:
            prediction = Prediction.nothing(order, "in_place is off")
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
    report = LoadReport(result, _stats(str(location), specs, prediction, mode, time.perf_counter() - t0,
                                       streamer.stats.get("bytes_read")))
    if all(scheme_of(f) == "file" for f in checkpoint.files):   # tiered S3 loads record themselves
        record_load(config, "local", report.stats["bytes"], report.stats["seconds"])
    return report


def _stats(location: str, specs, prediction: Prediction, mode: ReplayMode, seconds: float,
           read_bytes: int | None) -> dict[str, Any]:
    placed = prediction.placements
    in_place_bytes = sum(p.nbytes for p in placed.values())
    unused = prediction.unused - mode.materialized
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
        "materialized": sorted(mode.materialized - set(prediction.loaded)),
    }
