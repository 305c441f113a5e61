"""Event batches and control messages (delta batches are covered by test_deltas.py)."""

import pytest

from mmsb_dist import (DeltaBatch, EventKind, SerializationError, decode_events, encode_events,
                       pack_control, unpack_control)


def test_event_round_trip_with_and_without_deltas(rng):
    deltas = DeltaBatch.concat([DeltaBatch.runs([1, 2], [0, 5], [b"ab", b"cde"]),
                                DeltaBatch.masked_deltas([3], [1], [b"\x05"], [b"xyz"])])
    rb = decode_events(encode_events(7, [10, 11, 12], deltas.page_ids, EventKind.WRITE,
                                     payloads=deltas, shard=3))
    assert rb.column("epoch").to_pylist() == [7, 7, 7]
    assert rb.column("lsn").to_pylist() == [10, 11, 12]
    assert rb.column("payload").to_pylist() == [b"ab", b"cde", b"xyz"]
    assert rb.column("mask").to_pylist() == [None, None, b"\x05"]
    assert rb.schema.metadata[b"mmsb.shard"] == b"3"
    bare = decode_events(encode_events(1, 2, [9], EventKind.CREATE))
    assert bare.column("payload").to_pylist() == [None]
    assert bare.column("kind").to_pylist() == [EventKind.CREATE]


def test_event_decode_refuses_delta_batch_and_garbage():
    from mmsb_dist import encode_deltas
    with pytest.raises(SerializationError, match="not an mmsb event"):
        decode_events(encode_deltas(DeltaBatch.runs([1], [0], [b"a"])))
    with pytest.raises(SerializationError):
        decode_events(b"\x00" * 64)


def test_control_messages():
    msg = unpack_control(pack_control("seal", epoch=3, cut=[1, 2]), expect="seal")
    assert msg["epoch"] == 3 and msg["cut"] == [1, 2]
    with pytest.raises(SerializationError, match="expected"):
        unpack_control(pack_control("seal"), expect="commit")
    for bad in (b"", b"\xc1", b"\x93\x01\x02\x03", pack_control("x")[:-1]):
        with pytest.raises(SerializationError):
            unpack_control(bad)
