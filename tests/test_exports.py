"""The public surface is exactly what mmsb_dist exports; changing it is a deliberate act."""

import mmsb_dist

PUBLIC = {
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
}


def test_public_names_are_pinned():
    assert set(mmsb_dist.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(mmsb_dist, name), name


def test_errors_share_a_base_and_name_the_place():
    for name in ("UnknownPageError", "InvalidDeltaError", "InvalidPageError", "CapacityError",
                 "SerializationError", "CorruptionError", "GraphCycleError", "EpochError",
                 "LogCompactedError", "DerivedPageError"):
        assert issubclass(getattr(mmsb_dist, name), mmsb_dist.MmsbError)
    err = mmsb_dist.InvalidDeltaError("range beyond the page", page=3, offset=10, length=7)
    assert "page=3" in str(err) and "offset=10" in str(err) and "length=7" in str(err)
    import pickle
    again = pickle.loads(pickle.dumps(err))
    assert (again.page, again.offset, again.length) == (3, 10, 7) and str(again) == str(err)
    c = pickle.loads(pickle.dumps(mmsb_dist.CorruptionError("bad crc", path="/x/seg", position=12)))
    assert c.path == "/x/seg" and c.position == 12 and "byte 12" in str(c)
