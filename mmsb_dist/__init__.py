"""mmsb-dist: a distributed, GPU-resident page store with ordered logs, epochs, checkpoints and replay.

The public surface is what this module exports (pinned by tests/test_exports.py); everything in
modules whose name starts with an underscore, and any name not listed here, is private.
"""

from mmsb_dist.arena import DTYPES, PageArena, PageInfo
from mmsb_dist.backend import Backend, get_backend, gpu_available
from mmsb_dist.delta import DeltaBatch, compose, diff
from mmsb_dist.engine import Ack, Seal, ShardEngine
from mmsb_dist.events import PageTrack, Subscription
from mmsb_dist.errors import (
    CapacityError,
    CorruptionError,
    DerivedPageError,
    EpochError,
    GraphCycleError,
    InvalidDeltaError,
    InvalidPageError,
    LogCompactedError,
    MmsbError,
    SerializationError,
    UnknownPageError,
)
from mmsb_dist.formats import (
    DELTA_SCHEMA,
    EVENT_SCHEMA,
    FORMAT_VERSION,
    EventKind,
    decode_deltas,
    decode_events,
    encode_deltas,
    encode_events,
    pack_control,
    unpack_control,
)

__version__ = "0.1.0"

# The runtime needs Ray; import it on first use so that the engine alone stays light.
_RUNTIME = ("start", "connect", "stop", "Bus")


def __getattr__(name):
    if name in _RUNTIME:
        from mmsb_dist import runtime
        return getattr(runtime, name)
    raise AttributeError(f"module 'mmsb_dist' has no attribute {name!r}")

__all__ = [
    "DTYPES", "PageArena", "PageInfo",
    "Backend", "get_backend", "gpu_available",
    "DeltaBatch", "compose", "diff",
    "ShardEngine", "Ack", "Seal",
    "start", "connect", "stop", "Bus",
    "MmsbError", "UnknownPageError", "InvalidDeltaError", "InvalidPageError", "CapacityError",
    "SerializationError", "CorruptionError", "GraphCycleError", "DerivedPageError", "EpochError",
    "LogCompactedError", "Subscription", "PageTrack",
    "DELTA_SCHEMA", "EVENT_SCHEMA", "FORMAT_VERSION", "EventKind",
    "encode_deltas", "decode_deltas", "encode_events", "decode_events",
    "pack_control", "unpack_control",
    "__version__",
]
