"""Events (what changed, in log order) and change tracking (twin and diff).

A shard's log is its event stream: every frame becomes event rows (schema ``event``, see
docs/formats.md), one per delta (its LSN is the frame's first LSN plus the delta's index), one per
page of a create or free record, one marker per seal or restore record. Reading is a pure function
of the log: :func:`read_events` takes a log partition and returns a bounded Arrow batch plus the LSN
to resume from, so it is tested without Ray and served by the shard actor as is.

The resume contract, in order (docs/events.md states the guarantee built on it):

1. ``read_events(log, from_lsn)`` refuses an LSN below the log's first retained LSN
   (LogCompactedError) or past its end (LogError): nothing is ever skipped silently.
2. It scans frames in LSN order from ``from_lsn``, at most ``event_scan_bytes_max`` of them, and
   keeps the rows whose LSN is ``>= from_lsn`` and whose page is wanted (markers always are).
3. It stops before ``rows_max`` rows or ``bytes_max`` delta bytes, never inside one LSN: a delta
   frame may be cut between deltas, a create/free record (one LSN, many pages) never is.
4. It returns ``next_lsn``: every row with an LSN below it was returned by this or an earlier call,
   none at or above it. Resuming at ``next_lsn`` therefore gives no gap and no duplicate.

:class:`Subscription` runs that loop against every shard (one pump thread per shard, a bounded
buffer each, retries across shard restarts from the last LSN received); :class:`PageTrack` hands out
a private copy of a page and writes its difference from a twin as one masked delta.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from mmsb_dist import limits
from mmsb_dist.delta import RECOMPUTE_CLIENT_ID, DeltaBatch, diff
from mmsb_dist.errors import CorruptionError, LogCompactedError, LogError
from mmsb_dist.formats import (EVENT_SCHEMA, EventKind, _binary, _ipc, decode_deltas,
                               decode_events, unpack_control)

__all__ = ["EventRead", "read_events", "epoch_start_lsn", "encode_event_read", "Subscription",
           "PageTrack"]

_ARROW_MARK = b"\xff\xff\xff\xff"
# Control records that change no page bytes (dependency registrations): they spend an LSN and give
# no row. Any kind neither here nor handled below is refused, never passed over.
_RECORDS_WITHOUT_ROWS = frozenset({"derive", "underive"})


class EventRead(NamedTuple):
    """One bounded read: the rows, the LSN to resume from, and whether more was left unread."""

    batch: pa.RecordBatch
    next_lsn: int
    more: bool


# ---- one frame -> rows -------------------------------------------------------------------------

@dataclasses.dataclass
class _Piece:
    """The wanted rows of one frame, as columns (``deltas`` aligned with the rows, or None)."""

    epoch: np.ndarray
    lsn: np.ndarray
    page_id: np.ndarray
    kind: int
    offsets: np.ndarray | None     # the deltas' offsets (delta rows); None: no offset
    deltas: DeltaBatch | None      # the deltas themselves when asked for
    splittable: bool               # one row per LSN (a delta frame): may be cut between rows

    def __len__(self) -> int:
        return int(self.lsn.size)

    def row_bytes(self) -> np.ndarray:
        if self.deltas is None:
            return np.zeros(len(self), np.int64)
        return self.deltas.lengths + np.diff(self.deltas.mask_starts)

    def head(self, k: int) -> "_Piece":
        deltas = None if self.deltas is None else self.deltas.take(np.arange(k))
        offsets = None if self.offsets is None else self.offsets[:k]
        return _Piece(self.epoch[:k], self.lsn[:k], self.page_id[:k], self.kind, offsets, deltas,
                      self.splittable)


def _wanted(ids: np.ndarray, wanted: np.ndarray | None) -> np.ndarray:
    """Mask of ``ids`` found in ``wanted`` (sorted, unique): one vectorized pass, no Python loop."""
    if wanted is None:
        return np.ones(ids.size, bool)
    if wanted.size == 0:
        return np.zeros(ids.size, bool)
    at = np.minimum(np.searchsorted(wanted, ids), wanted.size - 1)
    return wanted[at] == ids


def _delta_kind(batch: DeltaBatch) -> int:
    """RECOMPUTE for the batches a shard logs for derived pages, WRITE for everything else."""
    return EventKind.RECOMPUTE if batch.client_id == RECOMPUTE_CLIENT_ID else EventKind.WRITE


def _frame_piece(frame, from_lsn: int, wanted, with_deltas: bool, epoch_min: int,
                 where: str) -> _Piece | None:
    payload = frame.payload
    if bytes(payload[:4]) == _ARROW_MARK:
        batch = decode_deltas(payload)
        lsns = frame.first_lsn + np.arange(len(batch), dtype=np.uint64)
        rows = np.flatnonzero((lsns >= from_lsn) & _wanted(batch.page_ids, wanted))
        if rows.size == 0:
            return None
        deltas = None
        if with_deltas:
            deltas = batch if rows.size == len(batch) else batch.take(rows)
        return _Piece(np.full(rows.size, frame.epoch, np.uint64), lsns[rows],
                      batch.page_ids[rows], _delta_kind(batch), batch.offsets[rows], deltas, True)
    msg = unpack_control(bytes(payload))
    kind = msg["k"]
    if kind in ("create", "free"):
        ids = np.frombuffer(msg["ids"], dtype="<u8").astype(np.uint64)
        ids = ids[_wanted(ids, wanted)]
        code = EventKind.CREATE if kind == "create" else EventKind.FREE
    elif kind in ("seal", "restore"):
        # A seal row carries the epoch it sealed; a restore row the epoch its frame was logged in.
        epoch = msg["epoch"] if kind == "seal" else frame.epoch
        if kind == "seal" and epoch < epoch_min:
            return None   # the seal that ends the epoch before a from_epoch subscription
        ids = np.array([EventKind.ALL_PAGES], np.uint64)
        code = EventKind.SEAL if kind == "seal" else EventKind.RESTORE
        return _Piece(np.array([epoch], np.uint64), np.array([frame.first_lsn], np.uint64), ids,
                      code, None, None, False)
    elif kind in _RECORDS_WITHOUT_ROWS:
        return None
    else:  # the replica refuses it too: a record this build cannot read is damage, not news
        raise CorruptionError(f"unknown control record {kind!r} at LSN {frame.first_lsn}",
                              path=where)
    if ids.size == 0:
        return None
    return _Piece(np.full(ids.size, frame.epoch, np.uint64),
                  np.full(ids.size, frame.first_lsn, np.uint64), ids, code, None, None, False)


# ---- a bounded read ----------------------------------------------------------------------------

def read_events(log, from_lsn: int, page_ids=None, *, with_deltas: bool = False,
                rows_max: int = limits.event_rows_max, bytes_max: int = limits.event_bytes_max,
                scan_bytes_max: int = limits.event_scan_bytes_max,
                epoch_min: int = 0) -> EventRead:
    """Events of ``log`` from ``from_lsn`` (see the module docstring for the contract).

    ``page_ids``: only these pages (markers always); ``with_deltas``: rows carry offset, payload
    and mask; ``epoch_min``: drop seal markers of earlier epochs (a from_epoch subscription)."""
    from_lsn = int(from_lsn)
    if rows_max < 1 or bytes_max < 1 or scan_bytes_max < 1:
        raise ValueError("rows_max, bytes_max and scan_bytes_max must be positive")
    wanted = None if page_ids is None else np.unique(np.asarray(page_ids, dtype=np.uint64))
    end = log.next_lsn
    if from_lsn > end:
        raise LogError(f"LSN {from_lsn} is past the end of log {log.path} (next LSN {end}): a "
                       "position from another runtime, or a log that lost its unsynced tail")
    frames = log.read(from_lsn)        # takes its snapshot of the segments now
    _check_retained(log, from_lsn)     # after the snapshot: compaction since cannot hide a gap
    pieces, rows, nbytes, scanned = [], 0, 0, 0
    next_lsn, more, expect = from_lsn, False, None
    try:
        for frame in frames:
            if expect is not None and frame.first_lsn != expect:
                raise CorruptionError(f"events: frame at LSN {frame.first_lsn} follows LSN "
                                      f"{expect - 1}", path=log.path)
            expect = frame.end_lsn
            if scanned and scanned + len(frame.payload) > scan_bytes_max:
                more = True
                break
            scanned += len(frame.payload)
            piece = _frame_piece(frame, from_lsn, wanted, with_deltas, epoch_min, log.path)
            if piece is not None:
                k = _room(piece, rows, nbytes, rows_max, bytes_max)
                if k < len(piece):   # the budget ends inside this frame: resume at the cut
                    if k:
                        pieces.append(piece.head(k))
                    next_lsn = int(piece.lsn[k]) if piece.splittable else frame.first_lsn
                    more = True
                    break
                pieces.append(piece)
                rows += len(piece)
                nbytes += int(piece.row_bytes().sum())
            next_lsn = frame.end_lsn
            if rows >= rows_max or nbytes >= bytes_max:
                more = next_lsn < log.next_lsn
                break
    except LogError as exc:  # a segment dropped under the read: compaction overtook it
        _check_retained(log, next_lsn)
        raise exc
    assert next_lsn >= from_lsn and all(int(p.lsn[0]) >= from_lsn for p in pieces)
    return EventRead(_batch(pieces, with_deltas), next_lsn, more)


def _check_retained(log, lsn: int) -> None:
    first = log.first_lsn
    if lsn < first:
        raise LogCompactedError(f"events from LSN {lsn} of log {log.path} are gone: compaction "
                                f"kept LSNs from {first} on", first_lsn=first)


def _room(piece: _Piece, rows: int, nbytes: int, rows_max: int, bytes_max: int) -> int:
    """How many of ``piece``'s rows fit the budget (at least one row per call is always given)."""
    n = len(piece)
    if not piece.splittable:
        fits = rows + n <= rows_max and nbytes + int(piece.row_bytes().sum()) <= bytes_max
        return n if fits or rows == 0 else 0
    cum = np.cumsum(piece.row_bytes())
    k = min(n, rows_max - rows, int(np.searchsorted(cum, bytes_max - nbytes, side="right")))
    return max(k, 1) if rows == 0 else max(k, 0)


def _batch(pieces: list[_Piece], with_deltas: bool) -> pa.RecordBatch:
    """One event batch from the pieces, in order (columns concatenated once)."""
    if not pieces:
        return pa.RecordBatch.from_arrays([pa.array([], f.type) for f in EVENT_SCHEMA],
                                          schema=EVENT_SCHEMA)
    cat = lambda name: np.concatenate([getattr(p, name) for p in pieces])
    n = sum(len(p) for p in pieces)
    kinds = np.concatenate([np.full(len(p), p.kind, np.uint8) for p in pieces])
    offset = _offset_column(pieces, n)
    if with_deltas:
        payload, mask = _delta_columns(pieces, n)
    else:
        payload, mask = pa.nulls(n, pa.binary()), pa.nulls(n, pa.binary())
    return pa.RecordBatch.from_arrays(
        [pa.array(cat("epoch"), pa.uint64()), pa.array(cat("lsn"), pa.uint64()),
         pa.array(cat("page_id"), pa.uint64()), pa.array(kinds, pa.uint8()), offset, payload,
         mask], schema=EVENT_SCHEMA)


def _offset_column(pieces: list[_Piece], n: int) -> pa.Array:
    """The deltas' offsets; null for create/free/marker rows."""
    has = np.concatenate([np.full(len(p), p.offsets is not None) for p in pieces])
    if not has.any():
        return pa.nulls(n, pa.uint32())
    offsets = np.concatenate([np.zeros(len(p), np.uint32) if p.offsets is None
                              else p.offsets.astype(np.uint32) for p in pieces])
    return pa.Array.from_buffers(pa.uint32(), n, [pa.py_buffer(np.packbits(has, bitorder="little")),
                                                  pa.py_buffer(offsets)],
                                 null_count=int(n - np.count_nonzero(has)))


def _delta_columns(pieces: list[_Piece], n: int):
    """payload and mask columns: set for delta rows, null for create/free/marker rows."""
    has = np.concatenate([np.full(len(p), p.deltas is not None) for p in pieces])
    masked = np.zeros(n, bool)
    lengths, mlengths = np.zeros(n, np.int64), np.zeros(n, np.int64)
    datas, masks, at = [], [], 0
    for p in pieces:
        d = p.deltas
        if d is not None:
            sl = slice(at, at + len(p))
            lengths[sl], mlengths[sl], masked[sl] = d.lengths, np.diff(d.mask_starts), d.masked
            datas.append(d.payload[:d.data_starts[-1]])
            masks.append(d.masks[:d.mask_starts[-1]])
        at += len(p)
    starts = lambda ls: np.concatenate([[0], np.cumsum(ls)]).astype(np.int64)
    data = np.concatenate(datas) if datas else np.zeros(0, np.uint8)
    mdata = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
    return _binary(starts(lengths), data, has), _binary(starts(mlengths), mdata, masked)


def encode_event_read(read: EventRead, shard: int) -> tuple[np.ndarray, int, bool]:
    """What a shard actor returns: the batch as an Arrow IPC stream in a uint8 array (one buffer,
    no pickled objects), the resume LSN, and whether more is waiting."""
    buf = _ipc(read.batch, {b"mmsb.shard": str(int(shard)).encode()})
    return np.frombuffer(buf, dtype=np.uint8), read.next_lsn, read.more


def epoch_start_lsn(seals, epoch: int) -> int:
    """The LSN where events of ``epoch`` start: the cut of the newest seal before it (0 if none).
    ``seals``: the shard's Seal records."""
    cuts = [s.cut for s in seals if s.epoch < int(epoch)]
    return max(cuts, default=0)


# ---- subscriptions (on Ray) --------------------------------------------------------------------

class _Item(NamedTuple):
    shard: int
    batch: pa.RecordBatch | None   # None: progress only (rows scanned, none wanted)
    next_lsn: int
    error: BaseException | None = None


class Subscription:
    """An iterator of event batches (``pyarrow.RecordBatch``, schema ``EVENT_SCHEMA``) from the
    shards of a runtime: in LSN order per shard, each row exactly once; see docs/events.md.

    Made by ``Bus.subscribe``. One pump thread per shard asks the shard for the next bounded batch
    (``ShardActor.events``), keeps at most ``prefetch_batches`` of them unconsumed, and polls every
    ``poll_s`` when caught up. A failed call (the shard restarting) is retried, bounded, from the
    last LSN received, so a restart costs neither a gap nor a duplicate.

    ``position``: per-shard next LSN after the batches handed out so far (the resume token; pass it
    back as ``Bus.subscribe(from_lsn=...)``). Each batch's shard is in its schema metadata
    (``mmsb.shard``) and in :attr:`last_shard`.
    """

    def __init__(self, shards: dict, start: dict[int, int], *, page_ids: dict | None = None,
                 with_deltas: bool = False, epoch_min: int = 0,
                 prefetch_batches: int = limits.subscription_prefetch_batches_max,
                 poll_s: float = limits.subscription_poll_s,
                 rows_max: int = limits.event_rows_max,
                 call_timeout_s: float = limits.subscription_call_timeout_s,
                 retry_s: float = limits.subscription_retry_s):
        if not 1 <= int(prefetch_batches) <= 1024:
            raise ValueError(f"prefetch_batches={prefetch_batches}: need 1..1024")
        if not 0 < poll_s <= limits.subscription_poll_s_max:
            raise ValueError(f"poll_s={poll_s}: need 0 < poll_s <= "
                             f"limits.subscription_poll_s_max ({limits.subscription_poll_s_max})")
        self._shards = dict(shards)
        self._position = {int(s): int(start[s]) for s in self._shards}
        self._args = dict(with_deltas=bool(with_deltas), rows_max=int(rows_max),
                          epoch_min=int(epoch_min))
        self._poll_s, self._timeout_s, self._retry_s = poll_s, call_timeout_s, retry_s
        self._queue: queue.Queue[_Item] = queue.Queue()  # bounded by the per-shard permits
        self._permits = {s: threading.BoundedSemaphore(int(prefetch_batches)) for s in self._shards}
        self._stop = threading.Event()
        self.last_shard: int | None = None
        self.retries = 0   # events calls re-sent after a shard failed (restarts), all shards
        self._ids = self._put_ids(page_ids)
        self._threads = [threading.Thread(target=self._pump, args=(s,), daemon=True,
                                          name=f"mmsb-subscription-{s}") for s in self._shards]
        for t in self._threads:
            t.start()

    @staticmethod
    def _put_ids(page_ids):
        """The page filter of each shard, in the object store once (not re-sent with each poll)."""
        import ray

        if page_ids is None:
            return None
        return {s: ray.put(np.ascontiguousarray(ids, np.uint64)) for s, ids in page_ids.items()}

    @property
    def position(self) -> dict[int, int]:
        return dict(self._position)

    # ---- the consumer side -----------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> pa.RecordBatch:
        while True:
            batch = self.poll(timeout_s=1.0)
            if batch is not None:
                return batch
            if self._stop.is_set():
                raise StopIteration

    def poll(self, timeout_s: float | None = None) -> pa.RecordBatch | None:
        """The next non-empty batch, or None when none came within ``timeout_s`` (None: wait)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._stop.is_set():
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                return None
            self._permits[item.shard].release()
            if item.error is not None:
                self.close()
                raise item.error
            self._position[item.shard] = item.next_lsn
            if item.batch is not None:
                self.last_shard = item.shard
                return item.batch
        return None

    def close(self) -> None:
        """Stop the pumps (their calls in flight finish on their own; nothing is left running)."""
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=self._poll_s + 1.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the pumps -------------------------------------------------------------------------------

    def _pump(self, shard: int) -> None:
        lsn = self._position[shard]
        try:
            while not self._stop.is_set():
                data, next_lsn, more = self._fetch(shard, lsn)
                batch = decode_events(data)
                if next_lsn != lsn and not self._offer(
                        _Item(shard, batch if batch.num_rows else None, next_lsn)):
                    return
                lsn = next_lsn
                if not more:
                    self._stop.wait(self._poll_s)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            self._offer(_Item(shard, None, lsn, exc))

    def _offer(self, item: _Item) -> bool:
        """Queue ``item`` when its shard has a free buffer slot; False if the subscription ended."""
        while not self._permits[item.shard].acquire(timeout=0.2):
            if self._stop.is_set():
                return False
        self._queue.put(item)
        return True

    def _fetch(self, shard: int, lsn: int):
        """One events call, retried from the same LSN while the shard is restarting (bounded)."""
        import ray
        from tenacity import (Retrying, retry_if_exception_type, stop_after_delay,
                              wait_exponential)

        transient = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError,
                     ray.exceptions.ActorUnavailableError)
        ids = None if self._ids is None else self._ids[shard]
        for attempt in Retrying(retry=retry_if_exception_type(transient), reraise=True,
                                stop=stop_after_delay(self._retry_s),
                                wait=wait_exponential(multiplier=0.05, max=2.0),
                                before_sleep=self._count_retry):
            with attempt:
                if self._stop.is_set():
                    raise _Stopped()
                ref = self._shards[shard].events.remote(lsn, ids, **self._args)
                return ray.get(ref, timeout=self._timeout_s)
        raise AssertionError("unreachable: tenacity reraises")

    def _count_retry(self, state) -> None:
        self.retries += 1


class _Stopped(Exception):
    """The subscription was closed while a pump was between calls."""


# ---- tracking: twin and diff -------------------------------------------------------------------

class PageTrack:
    """``with track as arr:`` hands out ``arr``, a writable private copy of a page (typed; on the
    backend the page lives on), and keeps a twin of it. On a normal exit the difference between
    twin and ``arr`` is written as one masked delta (nothing when they are equal) and is durable
    when the block ends; on an exception nothing is written. After the block, :attr:`delta` holds
    what was written (or None) and :attr:`ack` its acknowledgement.

    Bytes the block did not change are not written, so concurrent writers of other bytes of the
    same page keep their changes; bytes it changed win (last writer wins, in log order)."""

    def __init__(self, page_id: int, load, write, backend=None):
        # load() -> a private copy of the page; write(delta) -> (delta as written, its Ack)
        self.page_id = int(page_id)
        self._load, self._write, self._backend = load, write, backend
        self._twin = self._work = None
        self.delta: DeltaBatch | None = None
        self.ack = None

    def __enter__(self):
        if self._work is not None:
            raise RuntimeError(f"page {self.page_id} is already being tracked by this object")
        self._twin = self._load()
        self._work = self._twin.copy()
        return self._work

    def __exit__(self, exc_type, exc, tb) -> bool:
        twin, work, self._twin, self._work = self._twin, self._work, None, None
        if exc_type is None:
            delta = diff(self.page_id, twin, work, backend=self._backend)
            if delta is not None:   # write() stamps the delta id and returns what it wrote
                self.delta, self.ack = self._write(delta)
        return False
