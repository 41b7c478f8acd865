"""From a :class:`~.probe.Prediction` to what the reader streams: destinations, shards, and a
spec of its own for each piece of a tensor that lands in several regions."""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from ..core.checkpoint import Checkpoint
from ..core.tp import ColumnBlock
from .probe import Prediction


@dataclasses.dataclass
class StreamTargets:
    """``checkpoint``: the one to stream (a tensor split into several pieces appears as one spec
    per piece, same bytes, named ``NAME#i``); ``names``: what to read, in checkpoint order
    (placed pieces and the tensors the loader gets; unused ones and those read by the dry run
    are left out); ``destinations`` / ``shards``: the reader's; ``origin_of``: stream name ->
    checkpoint tensor name, for every placed piece."""

    checkpoint: Checkpoint
    names: list[str]
    destinations: dict[str, torch.Tensor]
    shards: dict[str, ColumnBlock]
    origin_of: dict[str, str]


def stream_targets(prediction: Prediction, checkpoint: Checkpoint, order: Iterable[str]) -> StreamTargets:
    tensors = dict(checkpoint.tensors)
    names: list[str] = []
    destinations: dict[str, torch.Tensor] = {}
    shards: dict[str, ColumnBlock] = {}
    origin_of: dict[str, str] = {}
    for name in order:
        placement = prediction.placements.get(name)
        if placement is None:
            if name not in prediction.unused and name not in prediction.loaded:
                names.append(name)
            continue
        spec = tensors[name]
        if len(placement.pieces) > 1:
            del tensors[name]
        for i, piece in enumerate(placement.pieces):
            key = name if len(placement.pieces) == 1 else _free_name(f"{name}#{i}", checkpoint.tensors)
            if key != name:
                tensors[key] = dataclasses.replace(spec, name=key)
            names.append(key)
            origin_of[key] = name
            if piece.whole:
                dest = piece.dest
                destinations[key] = dest if tuple(dest.shape) == spec.shape else dest.view(spec.shape)
            else:
                destinations[key], shards[key] = piece.dest, piece.block
    return StreamTargets(dataclasses.replace(checkpoint, tensors=tensors), names, destinations, shards, origin_of)


def _free_name(name: str, taken) -> str:
    while name in taken:
        name += "#"
    return name
