"""Wire and log formats: Arrow IPC for delta and event batches, msgpack for control messages.

Each encoded batch is one self-contained Arrow IPC *stream* (schema message + one record batch +
end-of-stream marker), so it can be logged, shipped over Ray or HTTP, and decoded on its own.
The schema's metadata names what it is (``mmsb.kind``) and its version (``mmsb.version``); a decoder
refuses any other kind, version or column type with a SerializationError. Decoding is zero-copy:
the NumPy arrays of a decoded DeltaBatch point into the input buffer. docs/formats.md has the
byte-level description.
"""

from __future__ import annotations

import msgpack
import numpy as np
import pyarrow as pa

from mmsb_dist import limits
from mmsb_dist.delta import DeltaBatch
from mmsb_dist.errors import MmsbError, SerializationError

__all__ = [
    "DELTA_SCHEMA", "EVENT_SCHEMA", "FORMAT_VERSION", "EventKind",
    "encode_deltas", "decode_deltas", "encode_events", "decode_events",
    "pack_control", "unpack_control",
]

FORMAT_VERSION = 1


def _schema(kind: str, fields: list[pa.Field], version: int = FORMAT_VERSION) -> pa.Schema:
    """A versioned mmsb schema: ``mmsb.kind`` and ``mmsb.version`` in its metadata."""
    return pa.schema(fields, metadata={b"mmsb.kind": kind.encode(),
                                       b"mmsb.version": str(version).encode()})


DELTA_SCHEMA = _schema("delta", [
    pa.field("page_id", pa.uint64(), nullable=False),
    pa.field("offset", pa.uint32(), nullable=False),
    pa.field("payload", pa.binary(), nullable=False),
    pa.field("mask", pa.binary(), nullable=True),   # null: a run; set: a masked delta
])


class EventKind:
    WRITE = 0       # a client delta was applied
    RECOMPUTE = 1   # a derived page was recomputed (its delta is the diff)
    CREATE = 2
    FREE = 3
    # Markers: they concern every page (page_id = ALL_PAGES), so a page filter never drops them.
    SEAL = 4        # the shard sealed the row's epoch (not yet a commit: see docs/events.md)
    RESTORE = 5     # the shard's state was rolled back to a sealed epoch (re-read your pages)
    ALL_PAGES = (1 << 64) - 1   # the page id of a marker row (never a valid page id)


EVENT_SCHEMA = _schema("event", [
    pa.field("epoch", pa.uint64(), nullable=False),
    pa.field("lsn", pa.uint64(), nullable=False),
    pa.field("page_id", pa.uint64(), nullable=False),
    pa.field("kind", pa.uint8(), nullable=False),
    pa.field("offset", pa.uint32(), nullable=True),
    pa.field("payload", pa.binary(), nullable=True),
    pa.field("mask", pa.binary(), nullable=True),
])


def _binary(starts: np.ndarray, data: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    n = starts.size - 1
    if starts[-1] > np.iinfo(np.int32).max:
        raise SerializationError("a binary column over 2 GiB cannot be encoded")
    validity = None
    null_count = 0
    if valid is not None:
        validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
        null_count = int(n - np.count_nonzero(valid))
    return pa.Array.from_buffers(pa.binary(), n, [validity, pa.py_buffer(starts.astype(np.int32)),
                                                  pa.py_buffer(data)], null_count=null_count)


_IPC_EXACT_SIZE_MIN = 1 << 20


def _ipc(batch: pa.RecordBatch, extra: dict[bytes, bytes]) -> pa.Buffer:
    """One IPC stream (schema + the batch) in a buffer. A batch of at least _IPC_EXACT_SIZE_MIN
    bytes is first written to a sink that only counts bytes, then into a buffer of exactly that
    size, which never grows: a growing BufferOutputStream copied a 1 Mi-delta batch several times
    (50 ms instead of 12 here)."""
    schema = batch.schema.with_metadata({**batch.schema.metadata, **extra})

    def write(sink) -> None:
        with pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(batch)

    if batch.nbytes < _IPC_EXACT_SIZE_MIN:   # small: one pass into a growing buffer is cheaper
        sink = pa.BufferOutputStream()
        write(sink)
        return sink.getvalue()
    counter = pa.MockOutputStream()
    write(counter)
    buf = pa.allocate_buffer(counter.size())
    write(pa.FixedSizeBufferWriter(buf))
    return buf


def encode_deltas(batch: DeltaBatch) -> pa.Buffer:
    """Encode a (structurally valid) batch; the bytes of ``batch`` are checked before encoding."""
    batch.check()
    # Masked deltas keep their mask bytes; runs get a null mask (an empty mask range).
    mask = _binary(batch.mask_starts, batch.masks, batch.masked)
    rb = pa.RecordBatch.from_arrays(
        [pa.array(batch.page_ids, pa.uint64()), pa.array(batch.offsets.astype(np.uint32)),
         _binary(batch.data_starts, batch.payload), mask], schema=DELTA_SCHEMA)
    return _ipc(rb, {b"mmsb.client": str(batch.client_id).encode(),
                     b"mmsb.seq": str(batch.seq).encode()})


def _read_one(data, kind: str, schema: pa.Schema) -> tuple[pa.RecordBatch, dict]:
    try:
        buf = pa.py_buffer(data) if not isinstance(data, pa.Buffer) else data
        reader = pa.ipc.open_stream(buf)
        meta = reader.schema.metadata or {}
        if meta.get(b"mmsb.kind") != kind.encode():
            raise SerializationError(f"not an mmsb {kind} batch (kind={meta.get(b'mmsb.kind')!r})")
        if meta.get(b"mmsb.version") != str(FORMAT_VERSION).encode():
            raise SerializationError(f"unsupported {kind} format version "
                                     f"{meta.get(b'mmsb.version')!r}; this build reads "
                                     f"{FORMAT_VERSION}")
        if not reader.schema.equals(schema, check_metadata=False):
            raise SerializationError(f"{kind} batch columns {reader.schema.types} do not match "
                                     f"the v{FORMAT_VERSION} schema {schema.types}")
        batches = [b for b in reader]
        if len(batches) != 1:
            raise SerializationError(f"expected one {kind} record batch, found {len(batches)}")
        rb = batches[0]
        rb.validate(full=True)
    except MmsbError:
        raise
    except (pa.ArrowException, ValueError, TypeError, OSError) as exc:
        raise SerializationError(f"malformed {kind} batch: {exc}") from exc
    return rb, meta


def _binary_parts(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(starts int64 rebased to 0, data uint8 view) of a binary column, zero-copy for the data."""
    n = len(col)
    if col.null_count == n:  # no bytes at all (a mask column of runs only): skip its buffers
        return np.zeros(n + 1, np.int64), np.zeros(0, np.uint8)
    _, offsets_buf, data_buf = col.buffers()
    offs = np.frombuffer(offsets_buf, dtype=np.int32, count=n + 1, offset=col.offset * 4)
    base, end = int(offs[0]), int(offs[-1])
    data = (np.frombuffer(data_buf, dtype=np.uint8, count=end - base, offset=base)
            if data_buf is not None and end > base else np.zeros(0, np.uint8))
    # One new array either way; astype is the faster where there is nothing to subtract.
    return (offs.astype(np.int64) if base == 0 else np.subtract(offs, base, dtype=np.int64)), data


def _validity(col: pa.Array) -> np.ndarray:
    """Which rows of ``col`` are not null, as bools (runs are the null rows of the mask column)."""
    n, nulls = len(col), col.null_count
    if nulls == 0 or nulls == n:   # all masked, or (the usual batch) all runs: no bits to read
        return np.full(n, nulls == 0)
    bits = np.frombuffer(col.buffers()[0], dtype=np.uint8)
    return np.unpackbits(bits, count=col.offset + n, bitorder="little")[col.offset:].astype(bool)


def decode_deltas(data) -> DeltaBatch:
    """Decode and structurally validate; SerializationError or InvalidDeltaError on bad input."""
    rb, meta = _read_one(data, "delta", DELTA_SCHEMA)
    try:
        client, seq = int(meta.get(b"mmsb.client", b"0")), int(meta.get(b"mmsb.seq", b"0"))
    except ValueError as exc:
        raise SerializationError(f"bad delta id in batch metadata: {exc}") from exc
    starts, payload = _binary_parts(rb.column(2))
    mask_col = rb.column(3)
    mstarts, masks = _binary_parts(mask_col)
    masked = _validity(mask_col)
    batch = DeltaBatch(rb.column(0).to_numpy(), rb.column(1).to_numpy().astype(np.int64),
                       starts, payload, masked, mstarts, masks, client, seq)
    batch.check()
    return batch


def encode_events(epoch, lsn, page_ids, kinds, *, offsets=None, payloads=None,
                  shard: int = 0) -> pa.Buffer:
    """Encode an event batch. ``payloads`` (optional) is a DeltaBatch whose i-th delta belongs to
    event i (the delta an event carries)."""
    return _ipc(event_batch(epoch, lsn, page_ids, kinds, offsets=offsets, payloads=payloads),
                {b"mmsb.shard": str(shard).encode()})


def event_batch(epoch, lsn, page_ids, kinds, *, offsets=None, payloads=None) -> pa.RecordBatch:
    ids = np.ascontiguousarray(page_ids, dtype=np.uint64)
    n = ids.size
    col = lambda v, t: pa.array(np.broadcast_to(np.asarray(v, dtype=t.to_pandas_dtype()), (n,)), t)
    if payloads is not None:
        if len(payloads) != n:
            raise SerializationError(f"{len(payloads)} deltas for {n} events")
        data = _binary(payloads.data_starts, payloads.payload)
        mask = _binary(payloads.mask_starts, payloads.masks, payloads.masked)
        offs = pa.array(payloads.offsets.astype(np.uint32))
    else:
        data = pa.nulls(n, pa.binary())
        mask = pa.nulls(n, pa.binary())
        offs = (pa.array(np.asarray(offsets, np.uint32)) if offsets is not None
                else pa.nulls(n, pa.uint32()))
    return pa.RecordBatch.from_arrays(
        [col(epoch, pa.uint64()), col(lsn, pa.uint64()), pa.array(ids, pa.uint64()),
         col(kinds, pa.uint8()), offs, data, mask], schema=EVENT_SCHEMA)


def decode_events(data) -> pa.RecordBatch:
    rb, _ = _read_one(data, "event", EVENT_SCHEMA)
    return rb


def pack_control(kind: str, **fields) -> bytes:
    """A small control message: ``{"v": version, "k": kind, ...fields}`` in msgpack."""
    body = msgpack.packb({"v": FORMAT_VERSION, "k": kind, **fields}, use_bin_type=True)
    if len(body) > limits.control_message_bytes_max:
        raise SerializationError(f"control message of {len(body)} bytes is over "
                                 "limits.control_message_bytes_max")
    return body


def unpack_control(data: bytes, expect: str | None = None) -> dict:
    if len(data) > limits.control_message_bytes_max:
        raise SerializationError(f"control message of {len(data)} bytes is over "
                                 "limits.control_message_bytes_max")
    try:
        msg = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise SerializationError(f"malformed control message: {exc}") from exc
    if not isinstance(msg, dict) or msg.get("v") != FORMAT_VERSION or "k" not in msg:
        raise SerializationError("not an mmsb control message (missing version or kind)")
    if expect is not None and msg["k"] != expect:
        raise SerializationError(f"expected a {expect!r} control message, got {msg['k']!r}")
    return msg
