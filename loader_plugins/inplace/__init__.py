"""In-place decisions asked of the engine model's own loader, for any engine adapter.

``predict`` dry-runs a model's ``load_weights`` over stand-in tensors (no bytes, nothing in the
model changes) and tells, per checkpoint tensor, whether its only fate is one plain copy into a
region of the model (stream it there), none (do not read it) or anything else (give the loader
its real bytes). ``ReplayMode`` then runs the loader for real over every tensor, confirming each
in-place copy and giving real values to anything the dry run did not foresee.
"""

from .load import LoadReport, load_into_model
from .probe import Piece, Placement, Prediction, predict
from .replay import InPlaceMismatch, ReplayMode
from .standin import StandIn, column_block
from .state import ModelState, patched_data_setter
from .targets import StreamTargets, stream_targets

__all__ = [
    "InPlaceMismatch",
    "LoadReport",
    "ModelState",
    "Piece",
    "Placement",
    "Prediction",
    "ReplayMode",
    "StandIn",
    "StreamTargets",
    "column_block",
    "load_into_model",
    "patched_data_setter",
    "predict",
    "stream_targets",
]
