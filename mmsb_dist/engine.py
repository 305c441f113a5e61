"""One shard without Ray: a page arena, its ordered log and its checkpoints, joined.

The contract, in the order the steps happen (the order is what makes a crash harmless):

1. Validate the whole request (a delta batch, a create, a free) against the page table. A bad one
   raises its typed error and changes nothing, on disk or in memory.
2. Append it to the log (write-ahead). ``append`` returns once the frame is durable under the fsync
   policy; a crash before that loses a request that was never acknowledged.
3. Apply it to the arena, in LSN order (one lock orders 2 and 3 together).
4. Acknowledge with its LSN range (:class:`Ack`). A batch whose delta id (client, seq) was already
   applied is acknowledged as a duplicate and not applied again.
5. ``seal(epoch)`` records the LSN cut and the state hash in the log as a seal record and syncs the
   log: from then on that epoch is a durable, consistent cut of this shard.
6. ``checkpoint`` snapshots the arena at a sealed epoch (a host copy, taken under the lock) and
   writes it in the background; ``compact`` drops log segments and checkpoints older than the
   retention window.

Recovery (on open): the newest checkpoint, then every logged frame after its cut, replayed in LSN
order as the log's own open verifies it (one pass over the log; a helper thread reads and decodes
while the opening thread applies, see _open_log); a torn log tail is truncated by the log, any other
damage raises CorruptionError.
Replay to a sealed epoch builds a scratch arena the same way, stopping at the epoch's cut, and must
reproduce the recorded state hash exactly. Log frames hold either an Arrow IPC delta batch (it
begins with the IPC continuation marker ``ff ff ff ff``) or a msgpack control record (a map:
``create``, ``free``, ``seal``); docs/engine.md has the details.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from mmsb_dist import checkpoint as ckpt
from mmsb_dist import limits
from mmsb_dist.arena import DTYPES, PageArena, SnapshotFill
from mmsb_dist.backend import Backend, get_backend
from mmsb_dist.dedup import AppliedSeqs, is_delta_id
from mmsb_dist.delta import RECOMPUTE_CLIENT_ID, DeltaBatch
from mmsb_dist.errors import (CorruptionError, DerivedPageError, EpochError, InvalidDeltaError,
                              InvalidPageError, LogFailedError, MmsbError, OrderError)
from mmsb_dist.formats import decode_deltas, encode_deltas, pack_control, unpack_control
from mmsb_dist.log import Frame, LogPartition, checksum_async

__all__ = ["ShardEngine", "Ack", "Seal", "Prepared"]

_ARROW_MARK = b"\xff\xff\xff\xff"


@dataclass(frozen=True)
class Ack:
    """A durable acknowledgement: the batch holds LSNs [first_lsn, first_lsn + count)."""

    first_lsn: int
    count: int
    epoch: int
    duplicate: bool = False

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + self.count - 1


@dataclass(frozen=True)
class Seal:
    """Epoch ``epoch`` of this shard: every frame with LSN < ``cut``, state hash ``state_hash``."""

    epoch: int
    cut: int
    state_hash: int


@dataclass(frozen=True)
class Prepared:
    """A batch made ready to apply without the engine's lock (ShardEngine.prepare): decoded and
    shape-checked, with its encoded bytes (None: encode when logged), the Future of their log
    checksum (None: checksum when logged) and its validation against the page table as it was
    (None: validate when applied; so does a page table that changed since)."""

    batch: DeltaBatch
    payload: object = None
    crc: object = None
    checked: tuple | None = None  # (arena, its table_version, slots, dest): validated then

    def validation(self, arena: PageArena) -> tuple | None:
        """(slots, dest) from prepare, if still valid for ``arena`` (see _still_valid)."""
        return _still_valid(self.checked, arena)


def _still_valid(checked: tuple | None, arena: PageArena) -> tuple | None:
    """(slots, dest) of ``checked`` = (arena, its table_version, slots, dest), a validation made
    earlier, if it was made against ``arena`` and that page table has not changed since (no create
    or free); else None: validate again."""
    c = checked
    return c[2:] if c and c[0] is arena and c[1] == arena.table_version else None


_EMPTY_SEAL = Seal(0, 0, 0)  # epoch 0: no pages (the combined hash of no pages is 0)


def _decode_frame(frame: Frame):
    """A logged frame's payload decoded: a DeltaBatch, or a control record's dict."""
    payload = frame.payload
    if bytes(payload[:4]) == _ARROW_MARK:
        return decode_deltas(payload)
    return unpack_control(bytes(payload))


class _Stopped(Exception):
    """Raised inside a _ReadAhead's producer once its consumer has stopped."""


class _ReadAhead:
    """Log frames with their payloads decoded (``(frame, _decode_frame(frame))``), produced on a
    helper thread, consumed in order by the caller.

    The helper runs ``produce(put)``, which passes frames to ``put`` in LSN order (a loop over
    LogPartition.read, or a LogPartition opening with ``recover_into``); ``put`` decodes each and
    queues it, up to ``hold_bytes`` of payload ahead of the caller; ``hand(value)`` queues any
    other value in order with them. So reading and checking the log and decoding (on the helper)
    overlap applying (on the caller): checksums and kernels release the GIL. An error producing
    frame k is raised when the caller reaches frame k, as it would be without the helper; what
    ``produce`` returns is ``value`` once it is done.

    Use it as a context manager: entering starts the helper; leaving stops it (a ``put`` after that
    raises _Stopped inside ``produce``). ``skip_rest()`` instead lets ``produce`` run to its end
    without queueing anything more."""

    _END = object()
    HANDED = object()  # the frame slot of what ``hand`` queued

    def __init__(self, produce, hold_bytes: int | None = None, decode_thread: bool | None = None,
                 decode=_decode_frame):
        self.value = None
        self._decode = decode
        self._hold_bytes = limits.replay_read_ahead_bytes if hold_bytes is None else hold_bytes
        # Decoding on a thread of its own (a third one) takes it off the reading thread, which
        # on a fast machine is the open's longest chain; on a small one the threads would only
        # take turns.
        if decode_thread is None:
            decode_thread = _decode_thread_pays()
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="mmsb-replay-decode") \
            if decode_thread else None
        self._cond = threading.Condition()
        self._ready: deque = deque()  # (frame, decoded), then (_END, exception or None)
        self._held = 0                # payload bytes in _ready
        self._stopped = self._skipping = False
        self._thread = threading.Thread(target=self._produce, args=(produce,), daemon=True,
                                        name="mmsb-replay-read-ahead")

    def _produce(self, produce) -> None:
        end = None
        try:
            self.value = produce(self._put)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the caller, in its place in the order
            end = exc
        with self._cond:
            self._ready.append((self._END, end))
            self._cond.notify_all()

    def _put(self, frame: Frame) -> None:
        if self._stopped:
            raise _Stopped
        if self._skipping:
            return
        item = (frame, self._decoder.submit(self._decode, frame) if self._decoder else
                self._decode(frame))
        size = len(frame.payload)
        with self._cond:
            while (self._held and self._held + size > self._hold_bytes
                   and not (self._stopped or self._skipping)):
                self._cond.wait()
            if self._stopped:
                raise _Stopped
            if not self._skipping:
                self._ready.append(item)
                self._held += size
                self._cond.notify_all()

    def hand(self, value) -> None:
        """Queue ``value`` for the caller, in order with the frames: it gets (HANDED, value)."""
        with self._cond:
            if self._stopped:
                raise _Stopped
            self._ready.append((self.HANDED, value))
            self._cond.notify_all()

    def __enter__(self) -> "_ReadAhead":
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[tuple[Frame, object]]:
        while True:
            with self._cond:
                while not self._ready:
                    self._cond.wait()
                frame, decoded = self._ready.popleft()
                if frame is not self._END and frame is not self.HANDED:
                    self._held -= len(frame.payload)
                    self._cond.notify_all()
            if frame is self._END:
                if decoded is not None:
                    raise decoded
                return
            if type(decoded) is Future:
                decoded = decoded.result()
            yield frame, decoded

    def skip_rest(self) -> None:
        """Queue nothing more, let ``produce`` finish, and wait for it (its error is raised)."""
        with self._cond:
            self._skipping = True
            self._ready = deque(item for item in self._ready if item[0] is self._END)
            self._held = 0
            self._cond.notify_all()
        for _ in self:
            pass

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._stopped = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()
        if self._decoder is not None:
            self._decoder.shutdown(wait=True, cancel_futures=True)


def _decode_thread_pays() -> bool:
    return (os.cpu_count() or 1) >= limits.replay_decode_thread_cpus_min


class _ValidateAhead:
    """The open's decoding: ``decode(frame)`` gives (decoded, checked). ``active`` (the open
    decodes on a thread of its own): that thread also checks each delta batch against the page
    table, ahead of the applying thread (as ShardEngine.prepare does for writes), and checked is
    (arena, its table_version, slots, dest) or None (always None when not active). The table is
    the replica's arena once the applying thread has built it (``built``). A control record other
    than a seal may change the table, so the batches after one wait until the applying thread has
    applied it (``applied``); a validation that went stale anyway (the table_version moved) or
    failed is made again when the batch is applied, which raises in place."""

    def __init__(self, active: bool):
        self.active = active
        self._cond = threading.Condition()
        self._arena: PageArena | None = None
        self._fence = -1    # LSN of the last control record decoded that may change the table
        self._applied = -1  # the last LSN applied
        self._closed = False

    def decode(self, frame: Frame) -> tuple:
        decoded = _decode_frame(frame)
        if not self.active:
            return decoded, None
        if not isinstance(decoded, DeltaBatch):
            if decoded.get("k") != "seal":
                with self._cond:
                    self._fence = frame.first_lsn
            return decoded, None
        with self._cond:
            while not self._closed and (self._arena is None or self._applied < self._fence):
                self._cond.wait()
            if self._closed:
                return decoded, None
            arena, version = self._arena, self._arena.table_version
        try:
            slots, dest = arena.validate(decoded, shaped=True)
        except MmsbError:
            return decoded, None
        return decoded, (arena, version, slots, dest)

    def built(self, arena: PageArena) -> None:
        with self._cond:
            self._arena = arena
            self._cond.notify_all()

    def applied(self, last_lsn: int) -> None:
        with self._cond:
            self._applied = last_lsn
            if self._fence >= 0:
                self._cond.notify_all()

    def close(self) -> None:
        """The applying thread stopped: nothing waits for it any more."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _put_all(frames: Iterator[Frame], put) -> None:
    """A _ReadAhead producer: every frame of a LogPartition.read."""
    try:
        for frame in frames:
            put(frame)
    finally:
        frames.close()


class _Replica:
    """What replaying frames builds: an arena plus the bookkeeping that travels with it."""

    def __init__(self, arena: PageArena, seals: dict[int, Seal], applied: AppliedSeqs, rebuild,
                 derived: dict | None = None):
        self.arena = arena
        self.seals = seals
        self.applied = applied  # delta ids (client, seq) applied: re-sent batches apply once
        self.rebuild = rebuild  # (epoch, seal) -> _Replica at that epoch, for restore records
        # Derived pages of this shard: child -> (parents, encoded graph.Recompute). Replay keeps
        # the table but never runs a function: recompute results are logged as deltas.
        self.derived: dict[int, tuple[tuple[int, ...], bytes]] = derived or {}

    def apply_frame(self, frame, decoded, where: str, checked: tuple | None = None) -> None:
        """Apply one logged frame, ``decoded`` by _decode_frame; ``checked``: see _ValidateAhead."""
        if isinstance(decoded, DeltaBatch):
            batch = decoded
            try:
                slots, dest = (_still_valid(checked, self.arena)
                               or self.arena.validate(batch, shaped=True))
            except MmsbError as exc:  # it applied once: the log or its replay order is damaged
                raise CorruptionError(f"logged batch at LSN {frame.first_lsn} no longer applies: "
                                      f"{exc}", path=where) from exc
            self.arena.apply_validated(batch, slots, dest, frame.first_lsn + frame.lsn_count - 1)
            if batch.client_id != RECOMPUTE_CLIENT_ID:
                self.applied.add(batch.client_id, batch.seq)
            return
        msg = decoded
        kind = msg["k"]
        if kind == "create":
            self.arena.create_pages(size=msg["size"], dtype=msg["dtype"],
                                    ids=np.frombuffer(msg["ids"], dtype="<u8"))
        elif kind == "free":
            self.arena.free_pages(np.frombuffer(msg["ids"], dtype="<u8"))
        elif kind == "seal":
            self.seals[msg["epoch"]] = Seal(msg["epoch"], msg["cut"], msg["hash"])
        elif kind == "derive":
            self.derived[int(msg["child"])] = (
                tuple(int(p) for p in np.frombuffer(msg["parents"], dtype="<u8")), msg["fn"])
        elif kind == "underive":
            self.derived.pop(int(msg["child"]), None)
        elif kind == "restore":  # the state rolled back to a sealed epoch; history stays
            epoch = msg["epoch"]
            target = self.seals.get(epoch) or _EMPTY_SEAL
            self.arena = self.rebuild(epoch, target).arena
        else:
            raise CorruptionError(f"unknown control record {kind!r} at LSN {frame.first_lsn}",
                                  path=where)


Key = tuple[int, int, int]  # an eager value's key: (incarnation, LSN, version), see _keyed


def _next_incarnation(path: str) -> int:
    """One more than the count of the last process that opened the shard at ``path``, kept
    durably in ``path/incarnation`` (written whole, fsynced, renamed into place). It ranks the
    values a process sends above those of every earlier process, whatever LSNs a crash made the
    log hand out again. A counter that cannot be read restarts from the clock in microseconds,
    far above any count of opens."""
    file = os.path.join(path, "incarnation")
    try:
        with open(file, "rb") as fh:
            last = int(fh.read())
    except FileNotFoundError:
        last = 0
    except (ValueError, OSError):
        last = time.time_ns() // 1000
    tmp = file + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(b"%d\n" % (last + 1))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, file)
    ckpt.fsync_path(path, directory=True)
    return last + 1


class ShardEngine:
    """A durable shard: see the module docstring for the contract.

    ``path`` holds the log (``path/log``) and the count of opens (``path/incarnation``, see
    ``_next_incarnation``); checkpoints go to ``checkpoints`` (a directory or a
    pyarrow.fs URI, default ``path/checkpoints``). Thread-safe: one lock orders log and apply.
    """

    def __init__(self, path, *, shard: int = 0, backend: Backend | str = "auto",
                 fsync: str = "always", fsync_interval_ms: float = 5.0,
                 segment_bytes_max: int | None = None, checkpoints=None, filesystem=None,
                 compression: str | None = None):
        self.path = os.fspath(path)
        self.shard = int(shard)
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.checkpoints = checkpoints or os.path.join(self.path, "checkpoints")
        self._fs = filesystem
        self._lock = threading.RLock()
        self._applied = threading.Condition(self._lock)  # notified when batches are applied
        # Held to change the live page table (inside self._lock) and by prepare to validate
        # against it outside self._lock.
        self._table_lock = threading.Lock()
        log_kw = {} if segment_bytes_max is None else {"segment_bytes_max": segment_bytes_max}
        os.makedirs(self.path, exist_ok=True)
        self.log, self._state = self._open_log(
            os.path.join(self.path, "log"), fsync=fsync, fsync_interval_ms=fsync_interval_ms,
            **log_kw)
        self._writer = ckpt.CheckpointWriter(self.checkpoints, filesystem=filesystem,
                                             compression=compression)
        self._asof: tuple[int, PageArena] | None = None  # the last replayed epoch, for reads
        self._last_snapshot = None  # (future, snapshot): its buffer is reused once written
        self._closed = False
        self._failure: BaseException | None = None  # an overlapped log write failed: see apply_many
        self._watch: dict[int, list[int]] = {}  # parent here -> shards with children of it
        # Parents on other shards: page -> (key, bytes) of the newest value seen (see _keyed).
        self._remote: dict[int, tuple[Key, np.ndarray]] = {}
        self._outbox: dict[int, dict[int, tuple]] = {}  # shard -> {parent: (key, bytes)} to send
        # Orders this shard's page versions across restores and restarts (see _keyed): this
        # process's incarnation and the LSN at which the live state's timeline began.
        self._incarnation = _next_incarnation(self.path)
        self._generation = (self._incarnation, self.log.next_lsn)
        self._changed: set[int] = set()  # watched pages written since the last seal
        self._changed_all = True  # a fresh process does not know what changed before it
        self.eager = True  # propagate on write (False: derived pages change only at barriers)
        self._graph_indexes()

    # ---- recovery and replay --------------------------------------------------------------------

    def _start(self, at_or_before: int | None) -> tuple[_Replica, int]:
        """A replica at the newest checkpoint (at or before an epoch), and the LSN to replay from."""
        loaded = self._read_checkpoint(at_or_before)
        info = loaded[1]
        self._check_meets_log(info, at_or_before, self.log.first_lsn, self.log.next_lsn)
        return self._replica_of(loaded), (0 if info is None else info.lsn)

    def _read_checkpoint(self, at_or_before: int | None):
        """(snapshot, CheckpointInfo) of the newest checkpoint at or before an epoch, read and
        verified; (None, None) when there is none. _replica_of builds the replica."""
        info = ckpt.latest_checkpoint(self.checkpoints, self.shard, at_or_before,
                                      filesystem=self._fs)
        return (None, None) if info is None else ckpt.read_checkpoint(info, filesystem=self._fs)

    def _replica_of(self, loaded) -> _Replica:
        snap, info = loaded
        if info is None:
            return _Replica(PageArena(self.backend), {}, AppliedSeqs(), self._replica_from)
        seals = {e: Seal(e, c, h) for e, c, h in info.extra.get("seals", [])}
        applied = AppliedSeqs.from_json(info.extra.get("applied"), info.extra.get("hwm"))
        derived = {int(c): (tuple(int(p) for p in ps), base64.b64decode(fn))
                   for c, ps, fn in info.extra.get("derived", [])}
        return _Replica(PageArena.from_snapshot(snap, self.backend), seals, applied,
                        self._replica_from, derived)

    def _check_meets_log(self, info, at_or_before: int | None, first_lsn: int,
                         next_lsn: int) -> None:
        """The log must continue from the checkpoint (or, with none, hold everything)."""
        if info is None:
            if first_lsn > 0:
                raise EpochError(f"shard {self.shard}: the log starts at LSN {first_lsn} and no "
                                 "checkpoint covers what came before"
                                 + ("" if at_or_before is None else
                                    f" (epoch {at_or_before} is no longer retained)"))
        elif info.lsn < first_lsn or info.lsn > next_lsn:
            raise CorruptionError(f"checkpoint at LSN {info.lsn} does not meet the log, which "
                                  f"holds [{first_lsn}, {next_lsn})", path=info.path)

    def _open_log(self, path: str, **log_kw) -> tuple[LogPartition, _Replica]:
        """Open the log and recover: the newest checkpoint, then every frame after its cut,
        applied as the log's open verifies it (one pass over the log; a helper thread reads and
        verifies the checkpoint, then reads and decodes the log, while this one builds the arena
        from the checkpoint, then applies)."""
        start: dict = {}  # replica (built here), info (read by the helper)

        def produce(put):
            def recover_into(first_lsn: int):  # the log is locked and listed: load the checkpoint
                loaded = self._read_checkpoint(None)
                start["info"] = loaded[1]
                ahead.hand(loaded)
                lsn = 0 if start["info"] is None else start["info"].lsn
                # A log that does not reach back to the checkpoint: nothing to replay (refused
                # below, once the log is open).
                return None if lsn < first_lsn else (lsn, put)
            return LogPartition(path, recover_into=recover_into, **log_kw)

        replay_again = False
        # With a decode thread, it validates the batches too: this thread only applies them.
        check = _ValidateAhead(_decode_thread_pays())
        # The frames the open hands over are views of the mapped segments (page cache, not heap):
        # the helper may run further ahead while this thread builds the arena.
        ahead = _ReadAhead(produce, limits.open_read_ahead_bytes, check.active, check.decode)
        try:
            with ahead as frames:
                try:
                    for frame, item in frames:
                        if frame is _ReadAhead.HANDED:  # the checkpoint, read by the helper
                            start["replica"] = self._replica_of(item)
                            check.built(start["replica"].arena)
                            continue
                        decoded, checked = item
                        if isinstance(decoded, dict) and decoded["k"] == "restore":
                            # A rollback rebuilds an earlier state from the log, which is not
                            # open yet: let the open finish, then replay from the log.
                            replay_again = True
                            check.close()
                            frames.skip_rest()
                            break
                        start["replica"].apply_frame(frame, decoded, path, checked)
                        check.applied(frame.first_lsn + frame.lsn_count - 1)
                finally:
                    check.close()  # before the helpers are stopped: none may wait for this one
        except BaseException:
            if ahead.value is not None:  # the open finished before the replay failed
                ahead.value.close()
            raise
        log = ahead.value
        try:
            self._check_meets_log(start["info"], None, log.first_lsn, log.next_lsn)
            if not replay_again:
                return log, start["replica"]
            self.log = log
            return log, self._replayed(None)
        except BaseException:
            log.close()
            raise

    def replay(self, epoch: int) -> PageArena:
        """A new arena holding this shard's state at sealed ``epoch`` (checkpoint + log suffix),
        beside the live one. Raises CorruptionError unless it reproduces the recorded hash."""
        seal, replica = self._replica_at(epoch)
        got = replica.arena.state_hash()
        if got != seal.state_hash:
            raise CorruptionError(f"replay of shard {self.shard} to epoch {epoch} gives state hash "
                                  f"{got:016x}, sealed {seal.state_hash:016x}", path=self.log.path)
        return replica.arena

    def _seal(self, epoch: int) -> Seal:
        if epoch == 0:
            return _EMPTY_SEAL
        seal = self._state.seals.get(int(epoch))
        if seal is None:
            raise EpochError(f"epoch {epoch} was never sealed on shard {self.shard} "
                             f"(sealed: up to {self.last_sealed})")
        return seal

    # ---- writes ---------------------------------------------------------------------------------

    @property
    def arena(self) -> PageArena:
        return self._state.arena

    @property
    def last_sealed(self) -> int:
        return max(self._state.seals, default=0)

    @property
    def open_epoch(self) -> int:
        """The epoch new writes belong to."""
        return self.last_sealed + 1

    def apply(self, batch, *, after: int | None = None) -> Ack:
        """Validate, log (durably), apply, acknowledge. ``batch``: a DeltaBatch or its encoded bytes.
        ``after``: the sequence of the same client's batch this one must follow; OrderError,
        changing nothing, while that one is not applied (calls re-sent out of order)."""
        return self.apply_many([batch], after=after)[0]

    def apply_many(self, batches, *, after: int | None = None) -> list[Ack]:
        """Several batches with one log write and one fsync, applied in order; ``after`` as in
        ``apply``, for the first of them. A batch may be a DeltaBatch, its encoded bytes, or what
        ``prepare`` made of either."""
        with self._lock:
            self._check_open()
            items, acks, fresh = [], [], []   # fresh: delta ids of this group, not yet applied
            applied = self._state.applied
            for raw in batches:
                ready = raw if isinstance(raw, Prepared) else self.prepare(raw)
                batch = ready.batch
                if after is not None and not items and not applied.applied(batch.client_id, after):
                    raise OrderError(f"shard {self.shard}: batch {batch.seq} of client "
                                     f"{batch.client_id} arrived before batch {after}, which it "
                                     "must follow")
                delta_id = (batch.client_id, batch.seq)
                identified = is_delta_id(*delta_id)
                if identified and (applied.applied(*delta_id) or delta_id in fresh):
                    items.append(None)
                    continue
                # nothing is logged unless all are valid
                slots, dest = ready.validation(self.arena) or self.arena.validate(batch)
                if self._derived_ids.size:
                    self._refuse_derived(batch.page_ids)
                if identified:
                    fresh.append(delta_id)
                items.append((batch, ready.payload if ready.payload is not None
                              else encode_deltas(batch), slots, dest, ready.crc))
            epoch = self.open_epoch
            frames = [(it[1], epoch, len(it[0]), it[4]) for it in items if it]
            # A large group is applied to the arena while the log writes and syncs it (the lock
            # keeps it unseen until durable); a small one waits for the log first (write-ahead).
            overlap = sum(len(f[0]) for f in frames) >= limits.log_overlap_bytes_min
            if overlap:
                firsts, durable = self.log.append_many_async(frames)
            else:
                firsts, durable = self.log.append_many(frames), None
            try:
                firsts = iter(firsts)
                for it in items:
                    if it is None:
                        acks.append(Ack(-1, 0, epoch, duplicate=True))
                        continue
                    batch, _, slots, dest, _ = it
                    first = next(firsts)
                    self.arena.apply_validated(batch, slots, dest, first + len(batch) - 1)
                    acks.append(Ack(first, len(batch), epoch))
            finally:
                if durable is not None:
                    self._await_durable(durable)
            for delta_id in fresh:
                applied.add(*delta_id)
            self._applied.notify_all()
            if self._watched_ids.size:
                touched = np.concatenate([it[0].page_ids for it in items if it]
                                         or [np.zeros(0, np.uint64)])
                self._touched(touched)
            return acks

    def prepare(self, batch) -> Prepared:
        """The part of applying a batch that needs no engine lock and changes nothing: decode and
        shape-check encoded bytes (typed errors as in ``apply``), start a large batch's log
        checksum, and validate it against the page table (only creates and frees wait for that).
        A shard prepares one batch while the one before it is logged and applied; ``apply`` uses
        the validation if the page table has not changed since, else validates again."""
        payload = None if isinstance(batch, DeltaBatch) else batch
        crc = self._early_checksum(payload)
        if payload is not None:
            batch = decode_deltas(payload)
        if batch.client_id == RECOMPUTE_CLIENT_ID:
            raise InvalidDeltaError(f"client id {RECOMPUTE_CLIENT_ID} is reserved for recompute "
                                    "results")
        with self._table_lock:
            arena = self.arena
            try:
                checked = (arena, arena.table_version,
                           *arena.validate(batch, shaped=payload is not None))  # decoded: shaped
            except MmsbError:
                checked = None  # apply validates again, under its lock, and raises the error
        return Prepared(batch, payload, crc, checked)

    def wait_applied(self, client_id: int, seq: int, timeout: float) -> bool:
        """Wait up to ``timeout`` s until batch ``seq`` of ``client_id`` is applied (a batch that
        must follow it arrived first); whether it is."""
        with self._applied:
            return self._applied.wait_for(lambda: self._state.applied.applied(client_id, seq),
                                          timeout)

    @staticmethod
    def _early_checksum(payload):
        """A Future of a large encoded batch's log checksum, started before the batch is decoded
        and validated (they overlap); None for small payloads and for anything that is not one
        contiguous buffer (decoding reports what is wrong with it)."""
        if payload is None:
            return None
        try:
            view = memoryview(payload)
        except TypeError:
            return None
        if view.nbytes < limits.log_overlap_bytes_min or not view.c_contiguous:
            return None
        return checksum_async(view)

    def _await_durable(self, durable) -> None:
        """Wait for an overlapped log write. If it failed, the arena holds a batch the log may
        not: the engine fails for good (every later call raises); reopening recovers from the
        log, where the batch is whole or absent, and it was never acknowledged."""
        try:
            durable.result()
        except BaseException as exc:
            self._failure = exc
            raise

    def create_pages(self, n: int | None = None, size: int = 4096, dtype="uint8",
                     ids=None) -> np.ndarray:
        """Create zeroed pages (logged first); returns their ids."""
        with self._lock:
            self._check_open()
            ids, code, size = self.arena.check_create(n, size, dtype, ids)
            if ids.size:
                self._log_control("create", ids=ids.astype("<u8").tobytes(), size=size,
                                  dtype=DTYPES[code])
                with self._table_lock:
                    self.arena.create_validated(ids, code, size)
            return ids

    def free_pages(self, page_ids) -> None:
        with self._lock:
            self._check_open()
            ids, slots = self.arena.check_free(page_ids)
            busy = np.isin(ids, np.concatenate([self._derived_ids, self._watched_ids]))
            if busy.any():
                page = int(ids[int(np.argmax(busy))])
                raise InvalidPageError(f"page {page} is in the dependency graph: undepend first",
                                       page=page)
            if ids.size:
                self._log_control("free", ids=ids.astype("<u8").tobytes())
                with self._table_lock:
                    self.arena.free_validated(ids, slots)

    def _log_control(self, kind: str, **fields) -> int:
        return self.log.append(pack_control(kind, **fields), epoch=self.open_epoch, lsn_count=1)

    def restore(self, epoch: int) -> None:
        """Roll the live state back to sealed ``epoch`` (explicitly; nothing else ever does). A
        restore record is logged first, so recovery and replay roll back at the same point; the
        log and the seals after ``epoch`` stay, as history. The record of applied delta ids stays too:
        a batch retried from before the restore is not applied again."""
        with self._lock:
            self._check_open()
            seal = self._seal(epoch)
            self._generation = (self._incarnation, self._log_control("restore", epoch=int(epoch)))
            self._state.arena = self._replica_from(int(epoch), seal).arena
            self._asof = None
            self._changed_all = True  # derived pages follow their restored parents at the barrier

    # ---- epochs and checkpoints -----------------------------------------------------------------

    def seal(self, epoch: int | None = None) -> Seal:
        """Close the open epoch (or seal ``epoch``, which must be past the last sealed one):
        records (cut, state hash) durably and returns them."""
        with self._lock:
            self._check_open()
            epoch = self.open_epoch if epoch is None else int(epoch)
            if epoch <= self.last_sealed:
                raise EpochError(f"epoch {epoch} is not after the last sealed epoch "
                                 f"{self.last_sealed} of shard {self.shard}")
            seal = Seal(epoch, self.log.next_lsn, self.arena.state_hash())
            self._log_control("seal", epoch=seal.epoch, cut=seal.cut, hash=seal.state_hash)
            self.log.sync()  # a seal is durable whatever the fsync policy of writes
            self._state.seals[epoch] = seal
            self._changed, self._changed_all = set(), False
            return seal

    def checkpoint(self, epoch: int | None = None, *, wait: bool = True):
        """Checkpoint sealed ``epoch`` (default: the last). The live arena is copied when nothing
        was written since that seal, else the epoch is replayed into a scratch arena first. Returns
        the CheckpointInfo (or a Future of it with ``wait=False``)."""
        future = None
        with self._lock:
            self._check_open()
            epoch = self.last_sealed if epoch is None else int(epoch)
            seal = self._seal(epoch)
            seals = [[s.epoch, s.cut, s.state_hash] for s in self._state.seals.values()
                     if s.epoch <= epoch]
            # The live arena is that epoch's state if nothing was logged after its seal record
            # (which lies at LSN cut). Its copy is written as it is made: the writer gets the
            # snapshot first and follows the copy chunk by chunk (when it has a free slot; else
            # the copy is made whole and submitted outside the lock, as a replayed one is).
            if epoch == self.last_sealed > 0 and self.log.next_lsn == seal.cut + 1:
                snap, copy = self.arena.begin_snapshot(self._reusable_buffer())
                extra = self._checkpoint_extra(seals, self._state.applied.copy(),
                                               dict(self._state.derived))
                fill = SnapshotFill(snap.data.size)
                try:
                    future = self._writer.submit(snap, shard=self.shard, epoch=epoch,
                                                 lsn=seal.cut, state_hash=seal.state_hash,
                                                 extra=extra, fill=fill, timeout=0)
                except TimeoutError:
                    pass
                try:
                    copy(fill)
                except BaseException as exc:
                    fill.fail(exc)
                    raise
            else:
                snap = None
        if snap is None:  # outside the lock: replay reads the log and older checkpoints only
            snap, applied, derived = self._replayed_snapshot(epoch)
            extra = self._checkpoint_extra(seals, applied, derived)
        if future is None:
            future = self._writer.submit(snap, shard=self.shard, epoch=epoch, lsn=seal.cut,
                                         state_hash=seal.state_hash, extra=extra)
        self._last_snapshot = (future, snap)
        return future.result() if wait else future

    @staticmethod
    def _checkpoint_extra(seals, applied: AppliedSeqs, derived) -> dict:
        return {"seals": seals, "applied": applied.to_json(),
                "derived": [[c, list(ps), base64.b64encode(fn).decode()]
                            for c, (ps, fn) in sorted(derived.items())]}

    def _reusable_buffer(self):
        """The last snapshot's buffer, once its checkpoint is written (nobody reads it then)."""
        last, self._last_snapshot = self._last_snapshot, None
        if last is not None and last[0].done():
            return last[1].data
        return None

    def _replayed_snapshot(self, epoch: int):
        _, replica = self._replica_at(epoch)
        return replica.arena.snapshot(), replica.applied, replica.derived

    def _replica_at(self, epoch: int) -> tuple[Seal, _Replica]:
        """The newest checkpoint at or before ``epoch`` plus the log up to the epoch's cut."""
        with self._lock:
            seal = self._seal(epoch)
        return seal, self._replica_from(epoch, seal)

    def _replica_from(self, epoch: int, seal: Seal) -> _Replica:
        return self._replayed(epoch, seal.cut)

    def _replayed(self, at_or_before: int | None, cut: int | None = None) -> _Replica:
        """The newest checkpoint at or before an epoch (None: the newest), plus the open log from
        its cut up to LSN ``cut`` (None: to the end)."""
        replica, lsn = self._start(at_or_before)
        with _ReadAhead(lambda put: _put_all(self.log.read(lsn, cut), put)) as frames:
            for frame, decoded in frames:
                replica.apply_frame(frame, decoded, self.log.path)
        return replica

    def compact(self, retain_epochs: int) -> list[str]:
        """Drop what time travel to the last ``retain_epochs`` sealed epochs does not need: log
        segments below the newest checkpoint at or before that window, and older checkpoints.
        Returns the removed log segments."""
        horizon = self.last_sealed - int(retain_epochs)
        keep = ckpt.latest_checkpoint(self.checkpoints, self.shard, max(horizon, 0),
                                      filesystem=self._fs) if horizon > 0 else None
        if keep is None:
            return []
        for info in ckpt.list_checkpoints(self.checkpoints, self.shard, filesystem=self._fs):
            if info.epoch < keep.epoch:
                ckpt.delete_checkpoint(info, filesystem=self._fs)
        return self.log.drop_before(keep.lsn)

    # ---- derived pages (mmsb_dist/graph.py) -----------------------------------------------------

    def derive(self, child: int, parents, fn: bytes) -> None:
        """Make ``child`` (a page of this shard) derived: ``fn`` (an encoded graph.Recompute) of
        ``parents`` (pages of any shard). Logged, so recovery and checkpoints keep it. The
        coordinator checks cycles and shapes over the whole graph before it calls this."""
        from mmsb_dist.graph import Recompute

        child = int(child)
        parents = np.ascontiguousarray(parents, dtype="<u8").reshape(-1)
        recompute = Recompute.decode(fn)  # a malformed record is refused before it is logged
        if recompute.kind == "user":  # and a function this shard cannot load, too
            from mmsb_dist.graph import _unpickle

            _unpickle(recompute.blob)
        with self._lock:
            self._check_open()
            self.arena.slots_of([child])
            if child in self._state.derived:
                raise InvalidPageError(f"page {child} is already derived (undepend it first)",
                                       page=child)
            self._log_control("derive", child=child, parents=parents.tobytes(), fn=bytes(fn))
            self._state.derived[child] = (tuple(int(p) for p in parents), bytes(fn))
            self._changed.add(child)  # computed at the next barrier
            self._graph_indexes()

    def underive(self, child: int) -> None:
        """``child`` becomes an ordinary page again (its bytes stay)."""
        child = int(child)
        with self._lock:
            self._check_open()
            if child not in self._state.derived:
                raise InvalidPageError(f"page {child} is not derived on shard {self.shard}",
                                       page=child)
            self._log_control("underive", child=child)
            del self._state.derived[child]
            self._graph_indexes()

    def derivations(self) -> list[tuple[int, tuple[int, ...]]]:
        """(child, parents) of every derived page of this shard."""
        with self._lock:
            return [(c, ps) for c, (ps, _) in sorted(self._state.derived.items())]

    def set_watch(self, table: dict) -> None:
        """Which of this shard's pages have children on other shards (``{page: [shards]}``), so
        that a write to one sends its bytes there (eager cross-shard propagation). Not logged: the
        coordinator pushes it again after a restart."""
        with self._lock:
            self._watch = {int(p): [int(s) for s in ss] for p, ss in table.items()}
            self._graph_indexes()

    def page_info(self, page_ids) -> list[tuple[int, str]]:
        """(size in bytes, dtype) of each page; UnknownPageError for a missing one."""
        with self._lock:
            return [(i.size, i.dtype) for i in (self.arena.info(int(p)) for p in page_ids)]

    def changes(self) -> tuple[np.ndarray, bool]:
        """Pages with children (here or elsewhere) written since the last seal, and whether that
        is unknown (True after a restart: then every such page counts as changed)."""
        with self._lock:
            return np.array(sorted(self._changed), np.uint64), self._changed_all

    def read_cut(self, page_ids) -> list[tuple[Key, np.ndarray]]:
        """(key, bytes) of each page, for the barrier to carry to the shards of its children:
        ``recompute``'s ``remote``. The key orders the page's values (see ``_keyed``)."""
        with self._lock:
            self._check_open()
            return self._read_keyed(page_ids)

    def _read_keyed(self, page_ids) -> list[tuple[Key, np.ndarray]]:
        return self._keyed(page_ids, self.arena.read_many(page_ids))

    def _keyed(self, page_ids, values) -> list[tuple[Key, np.ndarray]]:
        """Each value of ``page_ids`` with its key (incarnation, LSN, version): eager messages
        may arrive late and in any order, so a shard keeps, per remote parent, the value with the
        greatest key. Versions are the LSNs of last writes, which a restore sets back, and which a
        crash that lost the log's unsynced tail hands out again: the LSN of the restore or open
        puts every value written since a restore above every value from before it, and the
        incarnation (see ``_next_incarnation``) every value written since an open above every
        value from an earlier process."""
        versions = self.arena.versions(page_ids).tolist()
        return [((*self._generation, v), a.reshape(-1).view(np.uint8))
                for v, a in zip(versions, values)]

    @staticmethod
    def _unpack_remote(values: dict) -> dict[int, tuple]:
        return {int(p): (tuple(int(x) for x in k),
                         np.ascontiguousarray(v).reshape(-1).view(np.uint8))
                for p, (k, v) in values.items()}

    def recompute(self, children, remote: dict | None = None) -> dict:
        """The barrier's recompute of ``children`` (derived pages of this shard, in topological
        order) from the current state of their parents: local pages, earlier children of this
        call, and ``remote`` (page -> (key, bytes) of parents on other shards, from ``read_cut``
        at the cut: they replace whatever eager messages brought). The results are logged as one
        masked delta batch (the diff kernel) and applied; a function that fails leaves its page
        as it was and is reported in ``errors``."""
        remote = self._unpack_remote(remote or {})
        with self._lock:
            self._check_open()
            self._remote.update(remote)
            return self._recompute([int(c) for c in children], remote, barrier=True)

    def remote_changed(self, values: dict) -> dict:
        """Parents on other shards changed (eager propagation, ``take_outbox``'s page -> (key,
        bytes)): recompute their children here. A value whose key is not above the one this shard
        has is stale (a message that arrived late) and is dropped."""
        values = self._unpack_remote(values)
        with self._lock:
            self._check_open()
            newer = [p for p, (k, _) in values.items()
                     if p not in self._remote or k > self._remote[p][0]]
            for p in newer:
                self._remote[p] = values[p]
            order = self._local_downstream(newer) if newer else None
            return self._recompute(order, self._remote, barrier=False) if order else \
                {"changed": 0, "errors": []}

    def take_outbox(self) -> dict[int, dict[int, tuple]]:
        """What eager propagation wants sent: shard -> {page: (key, bytes)}; emptied."""
        with self._lock:
            out, self._outbox = self._outbox, {}
            return out

    def _graph_indexes(self) -> None:
        from mmsb_dist.graph import DependencyGraph

        derived = self._state.derived
        self._derived_ids = np.array(sorted(derived), np.uint64)
        # This shard's part of the graph: its derived pages and their parents (of any shard).
        self._local = DependencyGraph.from_edges((c, ps) for c, (ps, _) in derived.items())
        self._watched_ids = np.array(sorted(set(self._local.children) | set(self._watch)),
                                     np.uint64)
        self._downstream: dict[int, list[int]] = {}

    def _refuse_derived(self, page_ids) -> None:
        hit = np.isin(page_ids, self._derived_ids)
        if hit.any():
            page = int(page_ids[int(np.argmax(hit))])
            raise DerivedPageError(f"page {page} is derived: only its recompute function writes "
                                   "it (undepend it first)", page=page)

    def _touched(self, page_ids) -> None:
        """After client writes: note changed parents, recompute children here (eagerly), queue
        the bytes of parents with children elsewhere."""
        hit = np.unique(page_ids[np.isin(page_ids, self._watched_ids)])
        if not hit.size:
            return
        hit = [int(p) for p in hit]
        self._changed.update(hit)
        if not self.eager:
            return
        watched = [p for p in hit if p in self._watch]
        if watched:
            self._queue_remote(dict(zip(watched, self._read_keyed(watched))))
        order = self._local_downstream(hit)
        if order:
            self._recompute(order, self._remote, barrier=False)

    def _local_downstream(self, pages) -> list[int]:
        """This shard's derived pages downstream of ``pages`` over its edges, in topological
        order (one page's list is cached until the graph changes: writes hit the same pages)."""
        pages = list(pages)
        if len(pages) != 1:
            return self._local.affected(pages)
        order = self._downstream.get(pages[0])
        if order is None:
            order = self._downstream[pages[0]] = self._local.affected(pages)
        return order

    def _queue_remote(self, values: dict) -> None:
        """Queue the values of watched pages (page -> (key, bytes)) for the shards of their
        children."""
        for p, v in values.items():
            for s in self._watch[p]:
                self._outbox.setdefault(s, {})[p] = v

    def _recompute(self, order: list[int], remote: dict, *, barrier: bool) -> dict:
        """Recompute ``order`` (topological) and log what changed; ``remote``: page -> (key,
        bytes) of parents on other shards. ``barrier``: a parent that is not available is an
        error (eagerly, the child just waits for the barrier), and no eager messages are queued
        (the barrier carries values across shards itself)."""
        from mmsb_dist.graph import Recompute, evaluate

        arena, be = self.arena, self.backend
        xp = be.xp
        derived = self._state.derived
        where = arena.spans(sorted({p for c in order for p in derived[c][0]} | set(order)))
        buf = arena.buffer
        # Results are arrays that may share memory with their parents (a copy or a slice is the
        # parent's bytes): nothing is written until all of them are copied out at once below.
        done: dict[int, object] = {}
        errors: list[tuple[int, str]] = []
        for c in order:
            parents, fn = derived[c]
            args = []
            for p in parents:
                v = done.get(p)
                if v is None:
                    if p in where:
                        off, size, _ = where[p]
                        v = buf[off:off + size]
                    elif p in remote:
                        v = be.upload(remote[p][1])
                    else:
                        break
                args.append(v)
            if len(args) != len(parents):
                if barrier:
                    errors.append((c, f"parent {p} of derived page {c} is not available"))
                continue
            _, size, dtype = where[c]
            try:
                done[c] = evaluate(Recompute.decode(fn), args, c, size, dtype, xp)
            except MmsbError as exc:
                errors.append((c, str(exc)))
        if not done:
            return {"changed": 0, "errors": errors}
        # Old and new bytes of every recomputed page side by side, each range starting on a mask
        # byte (8 bytes), so that one compare diffs them all.
        ids = list(done)
        sizes = np.array([where[c][1] for c in ids], np.int64)
        pads = (-sizes) % 8
        starts = np.zeros(len(ids) + 1, np.int64)
        np.cumsum(sizes + pads, out=starts[1:])
        old_all = be.zeros(int(starts[-1]))
        be.copy_runs(old_all, starts[:-1], buf,
                     np.array([where[c][0] for c in ids], np.int64), sizes)
        pieces = []
        for c, pad in zip(ids, pads.tolist()):
            pieces.append(done[c])
            if pad:
                pieces.append(xp.zeros(pad, xp.uint8))
        new_all = xp.concatenate(pieces)
        rows, host = self._log_recompute(ids, old_all, new_all, starts, sizes)
        watched = [r for r in rows if ids[r] in self._watch]
        if watched and not barrier:
            pages = [ids[r] for r in watched]
            self._queue_remote(dict(zip(pages, self._keyed(
                pages, [host[starts[r]:starts[r] + sizes[r]] for r in watched]))))
        return {"changed": len(rows), "errors": errors}

    def _log_recompute(self, ids, old_all, new_all, starts, sizes) -> tuple:
        """One masked batch turning each changed page of ``ids`` into its bytes in ``new_all``
        (the diff kernel over all of them at once); logged, then applied. Returns the rows of
        ``ids`` that changed and ``new_all`` on the host."""
        be = self.backend
        mask = be.to_host(be.compare(old_all, new_all))
        mstarts = starts // 8
        changed = np.add.reduceat(mask.astype(np.int64), mstarts[:-1]) > 0 if mask.size else \
            np.zeros(len(ids), bool)
        rows = np.flatnonzero(changed)
        if not rows.size:
            return (), None
        from mmsb_dist.delta import _gather, _starts

        host = be.to_host(new_all)
        lengths, mlengths = sizes[rows], (sizes[rows] + 7) // 8
        dstarts, mst = _starts(lengths), _starts(mlengths)
        batch = DeltaBatch(np.array([ids[r] for r in rows], np.uint64),
                           np.zeros(rows.size, np.int64), dstarts,
                           _gather(host, starts[rows], lengths, dstarts),
                           np.ones(rows.size, bool), mst,
                           _gather(mask, mstarts[rows], mlengths, mst),
                           client_id=RECOMPUTE_CLIENT_ID)
        slots, dest = self.arena.validate(batch)
        first = self.log.append(encode_deltas(batch), epoch=self.open_epoch,
                                lsn_count=len(batch))
        self.arena.apply_validated(batch, slots, dest, first + len(batch) - 1)
        return rows.tolist(), host

    # ---- reads ----------------------------------------------------------------------------------

    def read(self, page_id: int, epoch: int | None = None) -> np.ndarray:
        return self.read_many([page_id], epoch)[0]

    def read_many(self, page_ids, epoch: int | None = None) -> list[np.ndarray]:
        """Host copies of pages, live or as of a sealed epoch (without touching the live state)."""
        if epoch is None:
            with self._lock:
                self._check_open()
                return self.arena.read_many(page_ids)
        cached = self._asof
        if cached is None or cached[0] != epoch:
            cached = (epoch, self.replay(epoch))
            self._asof = cached
        return cached[1].read_many(page_ids)

    def state_hash(self) -> int:
        with self._lock:
            return self.arena.state_hash()

    def seals(self) -> list[Seal]:
        with self._lock:
            return sorted(self._state.seals.values(), key=lambda s: s.epoch)

    def statistics(self) -> dict:
        with self._lock:
            return {"shard": self.shard, "backend": self.backend.name,
                    "pages": self.arena.page_count, "page_bytes": self.arena.live_bytes,
                    "arena_bytes": self.arena.capacity_bytes, "open_epoch": self.open_epoch,
                    "last_sealed": self.last_sealed, "next_lsn": self.log.next_lsn,
                    "log": self.log.statistics(), "checkpoints": self._writer.statistics()}

    def validate_state(self) -> None:
        self.arena.validate_state()
        cuts = [s.cut for s in self.seals()]
        assert cuts == sorted(cuts) and all(c <= self.log.next_lsn for c in cuts)

    # ---- events and tracking (mmsb_dist/events.py) ----------------------------------------------

    def events(self, from_lsn: int = 0, page_ids=None, *, with_deltas: bool = False,
               rows_max: int | None = None, bytes_max: int | None = None, epoch_min: int = 0):
        """What the log holds from ``from_lsn``, as one bounded event batch and the LSN to resume
        from (an ``events.EventRead``). Reads the log only (no lock held against writers);
        LogCompactedError below the first retained LSN. See docs/events.md."""
        from mmsb_dist import events, limits

        self._check_open()
        return events.read_events(
            self.log, from_lsn, page_ids, with_deltas=with_deltas, epoch_min=epoch_min,
            rows_max=limits.event_rows_max if rows_max is None else rows_max,
            bytes_max=limits.event_bytes_max if bytes_max is None else bytes_max)

    def epoch_start_lsn(self, epoch: int) -> int:
        """The LSN where the events of ``epoch`` start (the cut of the newest seal before it)."""
        from mmsb_dist import events

        return events.epoch_start_lsn(self.seals(), epoch)

    def track(self, page_id: int, *, client_id: int = 0, seq: int = 0):
        """A context manager: a writable copy of the page (a CuPy array on the CuPy backend) whose
        difference from its twin is applied as one masked delta, with delta id (client_id, seq),
        when the block ends normally; nothing on an exception. See events.PageTrack."""
        from dataclasses import replace

        from mmsb_dist import events

        def load():
            with self._lock:
                return self.arena.view(page_id).copy()

        def write(delta):
            delta = replace(delta, client_id=client_id, seq=seq)
            return delta, self.apply(delta)

        return events.PageTrack(page_id, load, write, self.backend)

    # ---- lifecycle ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise MmsbError(f"shard engine {self.path} is closed")
        if self._failure is not None:
            raise LogFailedError(f"shard engine {self.path} failed ({self._failure!r}); its "
                                 "memory may hold an unlogged batch: reopen it to recover "
                                 "from the log") from self._failure

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._writer.close()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
