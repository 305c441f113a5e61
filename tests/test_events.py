"""Events: what the log holds, as bounded Arrow batches, resumable at an exact LSN.

Without Ray (Hypothesis, against an oracle built from the operations themselves, not from the log):
random creates, frees, writes (runs and masked), seals and restores on one ShardEngine; events from
any LSN are exactly the expected rows from there; resuming at every returned position, with tiny
row and byte budgets, yields the whole sequence once; a page filter keeps exactly its pages (and the
markers); from an epoch starts at the right LSN; compacted LSNs raise LogCompactedError.

On Ray (one local instance for the module, its own namespace): a subscriber reads while a writer
writes, a shard actor is killed mid-stream, and the rows it collects are exactly the acknowledged
writes to its pages, each once, in LSN order; a saved position resumes with nothing lost or
repeated; a subscription re-sends a failed call itself from the last LSN it received.
"""

import os
import tempfile
import threading
import time

import numpy as np
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmsb_dist import DeltaBatch, EventKind, LogCompactedError, decode_events
from mmsb_dist.engine import ShardEngine
from mmsb_dist.events import encode_event_read
from mmsb_dist.placement import shards_of

ALL = EventKind.ALL_PAGES


def _rows(batch):
    d = batch.to_pydict()
    return list(zip(d["epoch"], d["lsn"], d["page_id"], d["kind"], d["offset"], d["payload"],
                    d["mask"]))


def _bare(rows):
    """Rows as a subscriber without deltas sees them (offsets stay)."""
    return [r[:5] + (None, None) for r in rows]


class Model:
    """The expected event rows of the operations run on an engine, one LSN at a time."""

    def __init__(self):
        self.rows, self.lsn, self.epoch = [], 0, 1
        self.live: dict[int, int] = {}       # page -> size
        self.sealed_live: dict[int, dict] = {0: {}}
        self.cuts: dict[int, int] = {}

    def create(self, ids, size):
        for p in ids:
            self.live[int(p)] = size
            self.rows.append((self.epoch, self.lsn, int(p), EventKind.CREATE, None, None, None))
        self.lsn += 1

    def free(self, ids):
        for p in ids:
            del self.live[int(p)]
            self.rows.append((self.epoch, self.lsn, int(p), EventKind.FREE, None, None, None))
        self.lsn += 1

    def write(self, batch, ack):
        assert ack.first_lsn == self.lsn and ack.epoch == self.epoch
        for i in range(len(batch)):
            page, off, data, mask = batch.delta(i)
            self.rows.append((self.epoch, self.lsn + i, page, EventKind.WRITE, off, data, mask))
        self.lsn += len(batch)

    def seal(self, seal):
        assert seal.epoch == self.epoch and seal.cut == self.lsn
        self.rows.append((self.epoch, self.lsn, ALL, EventKind.SEAL, None, None, None))
        self.cuts[self.epoch] = self.lsn
        self.sealed_live[self.epoch] = dict(self.live)
        self.lsn += 1
        self.epoch += 1

    def restore(self, epoch):
        self.rows.append((self.epoch, self.lsn, ALL, EventKind.RESTORE, None, None, None))
        self.live = dict(self.sealed_live[epoch])
        self.lsn += 1


def _random_batch(rng, live, n):
    ids = np.array(sorted(live), np.uint64)
    parts = []
    for _ in range(n):
        pid = int(ids[rng.integers(ids.size)])
        off = int(rng.integers(live[pid]))
        length = int(rng.integers(1, min(live[pid] - off, 40) + 1))
        data = rng.integers(0, 256, length, dtype=np.uint8)
        if rng.random() < 0.3:
            mask = np.packbits(rng.random(length) < 0.5, bitorder="little")
            parts.append(DeltaBatch.masked_deltas([pid], [off], [mask], [data]))
        else:
            parts.append(DeltaBatch.runs([pid], [off], [data]))
    return DeltaBatch.concat(parts)


def _run_program(engine, seed, steps):
    rng = np.random.default_rng(seed)
    m = Model()
    for _ in range(steps):
        op = rng.choice(["create", "write", "write", "write", "free", "seal", "restore"])
        if op == "create" or not m.live:
            size = int(rng.integers(1, 200))
            m.create(engine.create_pages(int(rng.integers(1, 4)), size), size)
        elif op == "write":
            batch = _random_batch(rng, m.live, int(rng.integers(1, 12)))
            m.write(batch, engine.apply(batch))
        elif op == "free":
            victims = rng.choice(sorted(m.live), int(rng.integers(1, len(m.live) + 1)),
                                 replace=False)
            engine.free_pages(victims)
            m.free(victims)
        elif op == "seal":
            m.seal(engine.seal())
        elif op == "restore" and m.cuts:
            epoch = int(rng.choice(sorted(m.cuts)))
            engine.restore(epoch)
            m.restore(epoch)
    return m


def _drain(engine, start, **kw):
    """Every row from ``start`` through repeated bounded calls, each resumed at the returned LSN;
    returns the rows and the positions returned."""
    rows, positions, lsn = [], [], start
    for _ in range(engine.log.next_lsn - start + 2):   # each call makes progress: bounded loop
        read = engine.events(lsn, **kw)
        rows += _rows(read.batch)
        assert read.next_lsn >= lsn
        assert read.next_lsn > lsn or read.batch.num_rows == 0
        lsn = read.next_lsn
        positions.append(lsn)
        if not read.more:
            break
    else:
        raise AssertionError("events did not reach the end of the log")
    assert lsn == engine.log.next_lsn
    return rows, positions


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 40),
       rows_max=st.integers(1, 9), bytes_max=st.integers(1, 120))
def test_events_match_the_oracle_from_any_lsn_and_resume_exactly(seed, steps, rows_max, bytes_max):
    with tempfile.TemporaryDirectory() as d:
        engine = ShardEngine(os.path.join(d, "s"), backend="numpy", fsync="none")
        try:
            m = _run_program(engine, seed, steps)
            full = engine.events(0, with_deltas=True)
            assert not full.more and full.next_lsn == m.lsn == engine.log.next_lsn
            assert _rows(full.batch) == m.rows
            assert _rows(engine.events(0).batch) == _bare(m.rows)
            # Tiny budgets: the concatenation of the resumed reads is the whole sequence, once.
            rows, positions = _drain(engine, 0, with_deltas=True, rows_max=rows_max,
                                     bytes_max=bytes_max)
            assert rows == m.rows
            # From every position returned, and from every LSN: exactly the suffix.
            for lsn in sorted(set(positions) | set(range(0, m.lsn + 1, 3))):
                got = _rows(engine.events(lsn, with_deltas=True).batch)
                assert got == [r for r in m.rows if r[1] >= lsn], lsn
            # From an epoch: what was logged after the previous seal, that seal excluded.
            for epoch in range(1, m.epoch + 1):
                start = engine.epoch_start_lsn(epoch)
                assert start == m.cuts.get(epoch - 1, 0)
                got = _rows(engine.events(start, epoch_min=epoch).batch)
                assert got == _bare([r for r in m.rows if r[0] >= epoch])
        finally:
            engine.close()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 40), rows_max=st.integers(1, 5),
       pick=st.floats(0, 1))
def test_page_filter_keeps_exactly_its_pages_and_the_markers(seed, steps, rows_max, pick):
    with tempfile.TemporaryDirectory() as d:
        engine = ShardEngine(os.path.join(d, "s"), backend="numpy", fsync="none")
        try:
            m = _run_program(engine, seed, steps)
            pages = sorted({r[2] for r in m.rows if r[2] != ALL})
            rng = np.random.default_rng(seed)
            mine = [p for p in pages if rng.random() < pick] + [10**12]  # one that never exists
            want = [r for r in m.rows if r[2] in mine or r[2] == ALL]
            rows, _ = _drain(engine, 0, page_ids=mine, with_deltas=True, rows_max=rows_max)
            assert rows == want
            assert _rows(engine.events(0, page_ids=[]).batch) == \
                [r[:5] + (None, None) for r in m.rows if r[2] == ALL]
        finally:
            engine.close()


def test_a_create_record_is_never_split_and_a_big_delta_still_goes_through(tmp_path):
    engine = ShardEngine(tmp_path / "s", backend="numpy", fsync="none")
    ids = engine.create_pages(10, 4096)              # one record, one LSN, ten rows
    engine.apply(DeltaBatch.runs([ids[0]], [0], [np.ones(4000, np.uint8)]))
    read = engine.events(0, rows_max=3)
    assert read.batch.num_rows == 10 and read.next_lsn == 1 and read.more
    read = engine.events(1, with_deltas=True, bytes_max=100)  # one delta over the budget: alone
    assert read.batch.num_rows == 1 and read.next_lsn == 2
    assert len(read.batch.column("payload")[0].as_py()) == 4000
    engine.close()


def test_compacted_lsns_raise_a_typed_error(tmp_path):
    engine = ShardEngine(tmp_path / "s", backend="numpy", fsync="none", segment_bytes_max=512)
    pid = int(engine.create_pages(1, 64)[0])
    for epoch in range(1, 5):
        for i in range(5):
            engine.apply(DeltaBatch.runs([pid], [i], [bytes([epoch, i])]))
        engine.seal()
        engine.checkpoint()
    assert engine.compact(retain_epochs=1)           # segments were dropped
    first = engine.log.first_lsn
    assert first > 0
    with pytest.raises(LogCompactedError, match=f"from {first} on") as err:
        engine.events(0)
    assert err.value.first_lsn == first
    with pytest.raises(LogCompactedError):
        engine.events(first - 1)
    rows = _rows(engine.events(first).batch)
    assert rows and rows[0][1] >= first
    assert engine.events(engine.log.next_lsn).batch.num_rows == 0
    from mmsb_dist.errors import LogError
    with pytest.raises(LogError, match="past the end"):
        engine.events(engine.log.next_lsn + 1)
    engine.close()


def test_records_without_rows_spend_their_lsn_and_unknown_records_are_refused(tmp_path):
    from mmsb_dist import CorruptionError
    from mmsb_dist.events import read_events
    from mmsb_dist.formats import pack_control
    from mmsb_dist.log import LogPartition

    with LogPartition(tmp_path / "log", fsync="none") as log:
        log.append(pack_control("create", ids=np.array([4], "<u8").tobytes(), size=8,
                                dtype="uint8"), epoch=1, lsn_count=1)
        log.append(pack_control("derive", child=4, parents=b"", fn=b""), epoch=1, lsn_count=1)
        log.append(pack_control("free", ids=np.array([4], "<u8").tobytes()), epoch=1, lsn_count=1)
        read = read_events(log, 0)
        assert read.batch.column("lsn").to_pylist() == [0, 2] and read.next_lsn == 3
        log.append(pack_control("bogus"), epoch=1, lsn_count=1)
        with pytest.raises(CorruptionError, match="unknown control record 'bogus' at LSN 3"):
            read_events(log, 0)


def test_the_shard_actor_encoding_round_trips(tmp_path):
    engine = ShardEngine(tmp_path / "s", backend="numpy", fsync="none")
    ids = engine.create_pages(2, 64)
    engine.apply(DeltaBatch.runs(ids, [1, 2], [b"xy", b"z"]))
    read = engine.events(0, with_deltas=True)
    data, next_lsn, more = encode_event_read(read, shard=5)
    got = decode_events(data)
    assert got.equals(read.batch) and next_lsn == 3 and not more
    assert got.schema.metadata[b"mmsb.shard"] == b"5"
    engine.close()


# ---- on Ray --------------------------------------------------------------------------------------

NS = "mmsb-events-test"
BACKEND = os.environ.get("MMSB_TEST_BACKEND", "numpy")
WAIT_S = 90.0   # a bound on waits that a shard restart is inside of (not a timing assertion)


@pytest.fixture(scope="module")
def bus(tmp_path_factory):
    from mmsb_dist import runtime

    ray.init(num_cpus=3, include_dashboard=False, namespace=NS, log_to_driver=False)
    b = runtime.start(shards=2, data_dir=str(tmp_path_factory.mktemp("events")), namespace=NS,
                      config={"backend": BACKEND, "gpus_per_shard": 0.25})
    yield b
    runtime.stop(namespace=NS)
    ray.shutdown()


def _collect(sub, rows_by_shard, until, what):
    deadline = time.monotonic() + WAIT_S
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {WAIT_S:g} s")
        batch = sub.poll(timeout_s=0.5)
        if batch is not None:
            shard = int(batch.schema.metadata[b"mmsb.shard"])
            assert shard == sub.last_shard
            rows_by_shard.setdefault(shard, []).extend(_rows(batch))


def _writes_of(rows):
    return [r for r in rows if r[3] == EventKind.WRITE]


def test_subscriber_sees_each_acknowledged_write_once_in_order_across_a_shard_restart(bus):
    rng = np.random.default_rng(7)
    ids = bus.create_pages(24, 256)
    owners = shards_of(ids, bus.n)
    assert set(owners.tolist()) == {0, 1}
    mine = ids[::2]
    sub = bus.subscribe(page_ids=mine, with_deltas=True, prefetch_batches=2)
    acked: list = []          # (page, offset, bytes) of acknowledged writes, in send order
    done = threading.Event()

    def writer():
        try:
            for _ in range(60):
                n = 50
                pids = ids[rng.integers(0, ids.size, n)]
                offs = rng.integers(0, 256 - 16, n)
                data = rng.integers(0, 256, (n, 16), dtype=np.uint8)
                bus.write_many(pids, offs, data)
                acked.extend(zip(pids.tolist(), offs.tolist(), map(bytes, data)))
        finally:
            done.set()

    rows: dict = {}
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    _collect(sub, rows, lambda: sum(len(_writes_of(r)) for r in rows.values()) >= 50,
             "first events")
    victim = bus.shards[1]
    pid_before = ray.get(victim.ping.remote(), timeout=WAIT_S)["pid"]
    ray.kill(victim, no_restart=False)            # mid-stream: the subscriber must resume
    assert done.wait(WAIT_S), "writer did not finish"
    t.join()
    assert ray.get(victim.ping.remote(), timeout=WAIT_S)["pid"] != pid_before
    mine_set = set(mine.tolist())
    expected = [w for w in acked if w[0] in mine_set]
    _collect(sub, rows, lambda: sum(len(_writes_of(r)) for r in rows.values()) >= len(expected),
             "all acknowledged writes")
    # Whatever else is still coming (a duplicate would) arrives before an empty poll round.
    assert sub.poll(timeout_s=1.0) is None
    sub.close()
    for shard, got in rows.items():
        lsns = [r[1] for r in got]
        assert lsns == sorted(set(lsns)), f"shard {shard}: not strictly increasing"
        assert all(r[2] in mine_set for r in got)
    # Per page, the writes seen are the acknowledged ones, in the order they were sent.
    for page in mine_set:
        seen = [(r[4], r[5]) for s in rows.values() for r in _writes_of(s) if r[2] == page]
        sent = [(o, d) for p, o, d in expected if p == page]
        assert seen == sent, page
    assert sum(len(_writes_of(r)) for r in rows.values()) == len(expected)


def test_a_saved_position_resumes_without_gap_or_duplicate(bus):
    ids = bus.create_pages(6, 64)
    sub = bus.subscribe(page_ids=ids)
    for i, p in enumerate(ids):
        bus.write(int(p), 0, bytes([i + 1]))
    rows: dict = {}
    _collect(sub, rows, lambda: sum(len(r) for r in rows.values()) >= 6, "first writes")
    saved = sub.position
    sub.close()
    for i, p in enumerate(ids):
        bus.write(int(p), 1, bytes([i + 101]))   # while nobody listens
    again = bus.subscribe(page_ids=ids, from_lsn=saved, with_deltas=True)
    more: dict = {}
    _collect(again, more, lambda: sum(len(r) for r in more.values()) >= 6, "resumed writes")
    assert again.poll(timeout_s=1.0) is None
    again.close()
    got = sorted((r[2], r[4], r[5]) for r in sum(more.values(), []))
    assert got == sorted((int(p), 1, bytes([i + 101])) for i, p in enumerate(ids))


def test_from_epoch_starts_after_the_previous_commit(bus):
    ids = bus.create_pages(4, 64)
    bus.write(int(ids[0]), 0, b"old")
    epoch = bus.commit()
    for p in ids:
        bus.write(int(p), 0, b"new")
    sub = bus.subscribe(page_ids=ids, from_epoch=epoch + 1, with_deltas=True)
    rows: dict = {}
    _collect(sub, rows, lambda: sum(len(_writes_of(r)) for r in rows.values()) >= 4, "epoch")
    assert sub.poll(timeout_s=1.0) is None
    sub.close()
    flat = sum(rows.values(), [])
    assert sorted(r[2] for r in _writes_of(flat)) == sorted(ids.tolist())
    assert all(r[5] == b"new" and r[0] >= epoch + 1 for r in _writes_of(flat))
    assert not [r for r in flat if r[3] == EventKind.SEAL]   # the seal of `epoch` is before


def _engine_actor():
    """A class defined in a function: Ray ships it by value (workers cannot import tests/)."""

    class _EngineActor:
        """A shard as bare as it gets (the runtime's ShardActor less its barrier and metrics),
        so that calls can be made to fail: Ray does not retry them here (max_task_retries=0)."""

        def __init__(self, path):
            from mmsb_dist.errors import LogBusyError

            for _ in range(300):   # the killed process may still hold the log's lock for a moment
                try:
                    self.engine = ShardEngine(path, backend="numpy")
                    return
                except LogBusyError:
                    time.sleep(0.1)
            raise AssertionError("log stayed busy")

        def create_pages(self, ids, size, dtype):
            ids = np.asarray(ids, np.uint64)
            todo = ids[~self.engine.arena.present(ids)]
            if todo.size:
                self.engine.create_pages(ids=todo, size=size, dtype=dtype)

        def apply(self, payload):
            return self.engine.apply(payload).first_lsn

        def events(self, from_lsn, page_ids=None, *, with_deltas=False, rows_max=None,
                   epoch_min=0):
            read = self.engine.events(from_lsn, page_ids, with_deltas=with_deltas,
                                      rows_max=rows_max, epoch_min=epoch_min)
            return encode_event_read(read, self.engine.shard)

    return _EngineActor


def test_subscription_retries_a_failed_shard_from_its_last_lsn(bus, tmp_path):
    """Shard calls that fail (no Ray-level retry here) are re-sent by the subscription itself,
    from the last LSN it received: the killed shard recovers and nothing is lost or repeated."""
    from mmsb_dist.events import Subscription
    from mmsb_dist.formats import encode_deltas

    actor = ray.remote(_engine_actor()).options(max_restarts=-1, max_task_retries=0,
                                             num_cpus=0).remote(str(tmp_path / "shard"))
    gone = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

    def call(method, *args):   # the writer's own bounded retry (the delta id de-duplicates)
        for _ in range(200):
            try:
                return ray.get(getattr(actor, method).remote(*args), timeout=WAIT_S)
            except gone:
                time.sleep(0.1)
        raise AssertionError(f"{method} kept failing")

    ids = np.arange(8, dtype=np.uint64)
    call("create_pages", ids, 64, "uint8")
    sub = Subscription({0: actor}, {0: 0}, with_deltas=True, poll_s=0.02, retry_s=WAIT_S)
    rng = np.random.default_rng(3)
    sent, rows = [], {}
    try:
        for seq in range(1, 41):
            batch = DeltaBatch.runs(ids[rng.integers(0, 8, 5)], rng.integers(0, 60, 5),
                                    rng.integers(0, 256, (5, 4), dtype=np.uint8),
                                    client_id=99, seq=seq)
            call("apply", encode_deltas(batch).to_pybytes())
            sent += [batch.delta(i)[:3] for i in range(len(batch))]
            if seq == 15:
                _collect(sub, rows, lambda: len(_writes_of(rows.get(0, []))) >= 20, "first")
                ray.kill(actor, no_restart=False)
        _collect(sub, rows, lambda: len(_writes_of(rows.get(0, []))) >= len(sent), "all")
        assert sub.poll(timeout_s=1.0) is None
    finally:
        sub.close()
        ray.kill(actor, no_restart=True)
    got = rows[0]
    assert [r[3] for r in got[:8]] == [EventKind.CREATE] * 8 and {r[1] for r in got[:8]} == {0}
    got = got[8:]
    assert [r[1] for r in got] == list(range(1, 1 + len(sent)))    # LSN 0: the create
    assert [(r[2], r[4], r[5]) for r in got] == sent
    assert sub.retries >= 1        # the kill was seen by the subscription, not hidden by Ray
