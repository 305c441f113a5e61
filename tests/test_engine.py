"""ShardEngine: write-ahead apply, duplicates, epochs, checkpoints, replay and time travel.

Replay determinism: for random workloads with several sealed epochs and checkpoints, replay(e) and
read(epoch=e) reproduce exactly the state hash and bytes recorded when e was sealed, for every e,
also after reopening the shard (recovery from checkpoint + log).
"""

import threading
import time

import numpy as np
import pytest

from mmsb_dist import (DeltaBatch, EpochError, InvalidDeltaError, SerializationError,
                       UnknownPageError, limits)
from mmsb_dist.formats import encode_deltas
from mmsb_dist.engine import ShardEngine, _next_incarnation
from oracle import random_batch


def _engine(tmp_path, backend, **kw):
    return ShardEngine(tmp_path / "shard", backend=backend, **kw)


@pytest.mark.parametrize("seed,decode_thread", [(1, False), (2, True), (3, False)])
def test_replay_and_time_travel_reproduce_every_sealed_epoch(tmp_path, backend, seed,
                                                             decode_thread, monkeypatch):
    # Replays decode on a thread of their own from limits.replay_decode_thread_cpus_min CPUs on.
    monkeypatch.setattr(limits, "replay_decode_thread_cpus_min", 1 if decode_thread else 10**6)
    rng = np.random.default_rng(seed)
    e = _engine(tmp_path, backend)
    sizes = {}
    recorded = {}  # epoch -> (hash, bytes of every page right after the seal)
    for epoch in range(1, 9):
        if epoch in (1, 4):  # pages come and go between epochs
            for size in rng.integers(1, 5000, 4):
                for pid in e.create_pages(3, int(size)):
                    sizes[int(pid)] = int(size)
        if epoch == 6:
            victim = int(rng.choice(list(sizes)))
            e.free_pages([victim])
            del sizes[victim]
        for _ in range(int(rng.integers(1, 5))):
            e.apply(random_batch(rng, sizes, int(rng.integers(1, 60))))
        seal = e.seal()
        assert seal.epoch == epoch
        recorded[epoch] = (seal.state_hash, {p: e.read(p).tobytes() for p in sizes})
        if epoch % 3 == 0:
            e.checkpoint()
    e.apply(random_batch(rng, sizes, 30))  # unsealed writes after the last epoch
    live = e.state_hash()
    for _reopen in range(2):
        for epoch, (h, pages) in recorded.items():
            assert e.replay(epoch).state_hash() == h
            as_of = e.read_many(list(pages), epoch=epoch)
            assert {p: a.tobytes() for p, a in zip(pages, as_of)} == pages
        assert e.state_hash() == live  # time travel never disturbs the live state
        e.checkpoint(5)                 # an older epoch: replayed into a scratch arena
        e.close()
        e = _engine(tmp_path, backend)
        assert e.state_hash() == live and e.last_sealed == 8
    e.validate_state()
    e.close()


def test_an_open_that_validates_ahead_meets_creates_frees_and_a_rollback(tmp_path, backend,
                                                                        monkeypatch):
    """On a machine with the CPUs for it, the open's decode thread also validates batches ahead of
    the applying thread. Pages created and freed after the checkpoint, batches on them, and a
    rollback record all come out as written; most batches arrive validated."""
    from mmsb_dist import engine as engine_mod
    monkeypatch.setattr(limits, "replay_decode_thread_cpus_min", 1)
    rng = np.random.default_rng(12)
    e = _engine(tmp_path, backend)
    sizes = {int(p): 512 for p in e.create_pages(8, 512)}
    e.apply(random_batch(rng, sizes, 20))
    e.seal()
    e.checkpoint()
    for step in range(12):
        if step % 4 == 1:
            for p in e.create_pages(2, 64 * (step + 1)):
                sizes[int(p)] = 64 * (step + 1)
        if step % 4 == 3:
            victim = sorted(sizes)[step % len(sizes)]
            e.free_pages([victim])
            del sizes[victim]
        e.apply(random_batch(rng, sizes, 30))
        if step == 5:
            e.seal()
    live = e.state_hash()
    seen = {"checked": 0, "batches": 0}
    real = engine_mod._Replica.apply_frame

    def spy(self, frame, decoded, where, checked=None):
        if isinstance(decoded, DeltaBatch):
            seen["batches"] += 1
            seen["checked"] += checked is not None
        return real(self, frame, decoded, where, checked)

    monkeypatch.setattr(engine_mod._Replica, "apply_frame", spy)
    e.close()
    e = _engine(tmp_path, backend)
    assert e.state_hash() == live
    assert seen["batches"] == 12 and seen["checked"] >= 6, seen
    e.validate_state()
    e.restore(1)                        # a rollback record in the suffix: replayed after the open
    e.apply(random_batch(rng, {p: 512 for p in list(sizes)[:4]}, 10))
    live = e.state_hash()
    e.close()
    e = _engine(tmp_path, backend)
    assert e.state_hash() == live
    e.close()


def test_batches_with_seq_zero_carry_no_delta_id_and_always_apply(tmp_path, backend):
    e = _engine(tmp_path, backend)
    pid = int(e.create_pages(1, 16)[0])
    acks = e.apply_many([DeltaBatch.runs([pid], [k], [bytes([k + 1])], client_id=9, seq=0)
                         for k in range(3)])
    assert not any(a.duplicate for a in acks)
    assert e.apply(DeltaBatch.runs([pid], [3], [b"\x07"], client_id=9, seq=0)).duplicate is False
    assert e.read(pid)[:4].tolist() == [1, 2, 3, 7]
    e.close()


def test_duplicate_delta_ids_apply_once(tmp_path, backend):
    e = _engine(tmp_path, backend)
    pid = int(e.create_pages(1, 16)[0])
    first = e.apply(DeltaBatch.runs([pid], [0], [b"\x01"], client_id=9, seq=1))
    again = e.apply(DeltaBatch.runs([pid], [0], [b"\x02"], client_id=9, seq=1))
    assert not first.duplicate and again.duplicate
    assert e.read(pid)[0] == 1
    e.apply(DeltaBatch.runs([pid], [1], [b"\x03"], client_id=9, seq=2))
    e.close()
    e = _engine(tmp_path, backend)  # the high-water marks survive recovery
    assert e.apply(DeltaBatch.runs([pid], [0], [b"\x04"], client_id=9, seq=2)).duplicate
    assert e.read(pid)[:2].tolist() == [1, 3]
    e.close()


def test_a_batch_before_the_one_it_follows_is_refused(tmp_path, backend):
    from mmsb_dist.errors import OrderError

    e = _engine(tmp_path, backend)
    pid = int(e.create_pages(1, 16)[0])
    lsn = e.log.next_lsn
    with pytest.raises(OrderError):
        e.apply(DeltaBatch.runs([pid], [0], [b"\x02"], client_id=9, seq=2), after=1)
    assert e.log.next_lsn == lsn and e.read(pid)[0] == 0
    e.apply(DeltaBatch.runs([pid], [0], [b"\x01"], client_id=9, seq=1))
    e.apply(DeltaBatch.runs([pid], [0], [b"\x02"], client_id=9, seq=2), after=1)
    assert e.read(pid)[0] == 2
    e.close()


def test_prepared_batches_apply_in_the_order_they_follow_when_threads_race(tmp_path, backend):
    """The shard actor's write threads: each prepares (decodes) a batch without the lock, waits
    until the batch it follows is applied, then applies. Threads started in reverse order still
    apply a client's batches in sequence; a batch whose predecessor never comes is refused."""
    from mmsb_dist.errors import OrderError

    e = _engine(tmp_path, backend)
    pid = int(e.create_pages(1, 64)[0])
    encoded = [encode_deltas(DeltaBatch.runs([pid], [0], [bytes([k]) * 64], client_id=5, seq=k))
               for k in range(1, 9)]
    order, errors = [], []

    def send(k):
        ready = e.prepare(encoded[k - 1])   # no lock taken, nothing changed
        try:
            if k > 1:
                assert e.wait_applied(5, k - 1, timeout=30)
            e.apply(ready, after=k - 1 if k > 1 else None)
            order.append(k)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8, 0, -1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and order == list(range(1, 9))
    assert e.read(pid).tobytes() == bytes([8]) * 64
    assert not e.wait_applied(5, 10, timeout=0.05)
    with pytest.raises(OrderError):
        e.apply(e.prepare(DeltaBatch.runs([pid], [0], [b"\x63"], client_id=5, seq=10)), after=9)
    with pytest.raises(SerializationError):
        e.prepare(b"not arrow")
    assert e.read(pid).tobytes() == bytes([8]) * 64
    e.close()


def test_a_clients_batches_in_any_order_apply_once_each_across_checkpoint_and_reopen(tmp_path,
                                                                                       backend):
    """Concurrent requests of one client (the gateway) and calls Ray re-sends to a restarted shard
    arrive in any order: a batch behind a newer one of its client is applied, not mistaken for a
    duplicate; a batch sent again is a duplicate, also after a checkpoint and after recovery."""
    e = _engine(tmp_path, backend)
    ids = e.create_pages(3, 8)
    b = {k: DeltaBatch.runs([ids[k - 1]], [0], [bytes([k])], client_id=4, seq=k) for k in (1, 2, 3)}
    assert not e.apply(b[3]).duplicate and not e.apply(b[1]).duplicate   # 2 still on its way
    e.seal()
    e.checkpoint()
    e.close()
    e = _engine(tmp_path, backend)     # from the checkpoint
    assert not e.apply(b[2]).duplicate
    assert all(e.apply(b[k]).duplicate for k in (1, 2, 3))
    e.close()
    e = _engine(tmp_path, backend)     # the checkpoint, then b[2] from the log
    assert all(e.apply(b[k]).duplicate for k in (1, 2, 3))
    assert [int(e.read(int(i))[0]) for i in ids] == [1, 2, 3]
    e.close()


def test_a_batch_prepared_before_the_page_table_changed_is_validated_again(tmp_path, backend):
    """prepare validates outside the engine's lock; a free or a create (growth moves pages)
    between prepare and apply makes apply validate again against the table as it is."""
    e = _engine(tmp_path, backend)
    ids = e.create_pages(2, 16)
    gone = e.prepare(DeltaBatch.runs([ids[0]], [0], [b"x"]))
    assert gone.checked is not None
    e.free_pages([ids[0]])
    with pytest.raises(UnknownPageError):
        e.apply(gone)
    moved = e.prepare(DeltaBatch.runs([ids[1]], [3], [b"y"]))
    before = e.arena.table_version
    e.create_pages(4096, 4096)     # the arena grows and packs its pages
    assert e.arena.table_version != before
    e.apply(moved)
    assert bytes(e.read(int(ids[1]))[:4]) == b"\0\0\0y"
    e.validate_state()
    e.close()


def test_bad_batch_is_neither_logged_nor_applied(tmp_path, backend):
    e = _engine(tmp_path, backend)
    ids = e.create_pages(2, 32)
    e.apply(DeltaBatch.runs(ids, [0, 0], [b"ok", b"ok"]))
    lsn, h = e.log.next_lsn, e.state_hash()
    for bad, err in [(DeltaBatch.runs([ids[0], 999], [0, 0], [b"x", b"y"]), UnknownPageError),
                     (DeltaBatch.runs([ids[0]], [31], [b"xy"]), InvalidDeltaError)]:
        with pytest.raises(err):
            e.apply(bad)
        with pytest.raises(err):  # in a group, one bad batch refuses the whole group
            e.apply_many([DeltaBatch.runs([ids[1]], [0], [b"zz"]), bad])
    # encoded payloads, large ones too (their checksum starts before they are decoded)
    good = np.frombuffer(encode_deltas(DeltaBatch.runs(
        np.repeat(ids[:1], 3000), np.zeros(3000, np.int64), np.ones((3000, 30), np.uint8))),
        dtype=np.uint8)
    assert good.nbytes >= limits.log_overlap_bytes_min
    for bad in ["not a buffer", good[: good.size // 2], good.copy()[::2], np.zeros((2, 3))]:
        with pytest.raises(SerializationError):
            e.apply(bad)
    assert (e.log.next_lsn, e.state_hash()) == (lsn, h)
    e.close()


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failed_log_write_fails_the_engine_until_reopened(tmp_path, backend, monkeypatch,
                                                            overlap):
    """With ``overlap`` the batch is applied to the arena while the log writes it: when the fsync
    then fails, the engine refuses every later call (its memory may hold an unlogged batch), and a
    reopened engine holds the batch whole or not at all, never acknowledged."""
    from mmsb_dist import limits
    from mmsb_dist import log as logmod
    from mmsb_dist.errors import LogFailedError

    monkeypatch.setattr(limits, "log_overlap_bytes_min", 0 if overlap else 1 << 62)
    e = _engine(tmp_path, backend)
    ids = e.create_pages(64, 4096)
    e.apply(DeltaBatch.runs(ids, np.zeros(64, np.int64), np.full((64, 8), 1, np.uint8)))
    before = [p.copy() for p in e.read_many(ids)]
    bad = DeltaBatch.runs(ids, np.full(64, 8), np.full((64, 100), 7, np.uint8))

    def broken(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(logmod, "_datasync", broken)
    with pytest.raises(LogFailedError):
        e.apply(bad)
    monkeypatch.undo()
    for call in (lambda: e.apply(DeltaBatch.runs([ids[0]], [0], [b"x"])), lambda: e.seal()):
        with pytest.raises(LogFailedError):
            call()
    if overlap:  # the arena may be ahead of the log: nothing is served from it
        with pytest.raises(LogFailedError):
            e.read(int(ids[0]))
    else:        # the batch never reached the arena
        assert all(np.array_equal(a, b) for a, b in zip(e.read_many(ids), before))
    e.close()
    e = _engine(tmp_path, backend)
    after = e.read_many(ids)
    expect_bad = [b.copy() for b in before]
    for b in expect_bad:
        b[8:108] = 7
    whole = all(np.array_equal(a, x) for a, x in zip(after, expect_bad))
    none = all(np.array_equal(a, x) for a, x in zip(after, before))
    assert whole or none
    e.close()


def test_epochs_are_monotonic_and_unknown_epochs_refused(tmp_path, backend):
    e = _engine(tmp_path, backend)
    e.create_pages(1, 8)
    assert e.seal().epoch == 1
    assert e.seal(5).epoch == 5
    with pytest.raises(EpochError):
        e.seal(5)
    with pytest.raises(EpochError):
        e.replay(3)
    assert e.replay(0).page_count == 0
    e.close()


def test_compaction_keeps_the_retention_window(tmp_path, backend):
    rng = np.random.default_rng(5)
    e = _engine(tmp_path, backend, segment_bytes_max=64 << 10)
    sizes = {int(p): 4096 for p in e.create_pages(8, 4096)}
    hashes = {}
    for epoch in range(1, 11):
        for _ in range(5):
            e.apply(random_batch(rng, sizes, 40, masked_fraction=0.0))
        hashes[epoch] = e.seal().state_hash
        if epoch % 2 == 0:
            e.checkpoint()
    dropped = e.compact(retain_epochs=3)
    assert dropped, "old segments should go"
    assert e.log.first_lsn > 0
    for epoch in range(6, 11):  # the checkpoint at 6 and the log after it keep these
        assert e.replay(epoch).state_hash() == hashes[epoch]
    with pytest.raises(EpochError):
        e.replay(3)
    e.close()
    e = _engine(tmp_path, backend, segment_bytes_max=64 << 10)
    assert e.replay(10).state_hash() == hashes[10]
    e.close()


def test_restore_rolls_back_durably_and_keeps_history(tmp_path, backend):
    rng = np.random.default_rng(9)
    e = _engine(tmp_path, backend)
    sizes = {int(p): 2048 for p in e.create_pages(6, 2048)}
    states, hashes = {}, {}
    for epoch in range(1, 5):
        e.apply(random_batch(rng, sizes, 40))
        hashes[epoch] = e.seal().state_hash
        states[epoch] = {p: e.read(p).tobytes() for p in sizes}
        if epoch == 2:
            e.checkpoint()
    e.apply(random_batch(rng, sizes, 40))       # unsealed, rolled back below
    e.restore(2)
    assert e.state_hash() == hashes[2]
    assert {p: e.read(p).tobytes() for p in sizes} == states[2]
    e.apply(random_batch(rng, sizes, 10))
    after = e.seal()
    live = e.state_hash()
    e.close()
    e = _engine(tmp_path, backend)               # recovery meets the restore record in the log
    assert e.state_hash() == live
    for epoch, h in hashes.items():              # history before the restore still replays
        assert e.replay(epoch).state_hash() == h
    assert e.replay(after.epoch).state_hash() == after.state_hash
    e.checkpoint()                               # a checkpoint after the restore, then reopen
    e.close()
    e = _engine(tmp_path, backend)
    assert e.state_hash() == live
    with pytest.raises(EpochError):
        e.restore(99)
    e.close()


def test_checkpoints_are_exact_while_writes_go_on_and_a_full_writer_stalls_no_write(
        tmp_path, backend, monkeypatch):
    """The live arena's copy is handed to the checkpoint writer as it is made. With every writer
    slot taken, checkpoint() copies whole under the engine's lock and waits for a slot outside it:
    writes go on meanwhile, and every checkpoint still holds its epoch exactly."""
    from mmsb_dist import checkpoint as ck

    monkeypatch.setattr(ck.limits, "inflight_checkpoints_max", 1)
    monkeypatch.setattr(ck.limits, "checkpoint_io_chunk_bytes", 32 << 10)  # many copy chunks
    gate, real = threading.Event(), ck.write_checkpoint

    def gated(*a, **kw):
        assert gate.wait(60)
        return real(*a, **kw)

    monkeypatch.setattr(ck, "write_checkpoint", gated)
    rng = np.random.default_rng(4)
    e = _engine(tmp_path, backend)
    sizes = {int(p): 4096 for p in e.create_pages(64, 4096)}
    hashes, futures = {}, {}
    for epoch in (1, 2):
        e.apply(random_batch(rng, sizes, 200))
        hashes[epoch] = e.seal().state_hash
        if epoch == 1:
            futures[1] = e.checkpoint(wait=False)  # takes the only slot, held by the gate
    second = threading.Thread(target=lambda: futures.__setitem__(2, e.checkpoint()))
    second.start()
    time.sleep(0.3)  # the second checkpoint copies, then waits for the slot
    assert second.is_alive()
    write = threading.Thread(target=e.apply, args=(random_batch(rng, sizes, 50),))
    write.start()
    write.join(30)
    stalled = write.is_alive()  # held up by the waiting checkpoint
    gate.set()
    write.join(60)
    assert not stalled
    second.join(60)
    assert not second.is_alive()
    for epoch in (1, 2):
        info = futures[epoch] if epoch == 2 else futures[epoch].result(60)
        assert info.epoch == epoch and info.state_hash == hashes[epoch]
        snap, _ = ck.read_checkpoint(info)  # page hashes recomputed from the bytes
        assert snap.state_hash() == hashes[epoch]
    e.close()


def _control_frame(lsn: int, pad: int = 0):
    from mmsb_dist.formats import pack_control
    from mmsb_dist.log import Frame
    return Frame(lsn, 1, 0, memoryview(pack_control("seal", epoch=lsn, cut=lsn, hash=0,
                                                    pad=b"x" * pad)))


@pytest.mark.parametrize("decode_thread", [False, True])
def test_read_ahead_keeps_order_bounds_what_it_holds_and_raises_in_place(monkeypatch,
                                                                          decode_thread):
    from mmsb_dist.engine import _ReadAhead
    from mmsb_dist.log import Frame
    monkeypatch.setattr(limits, "replay_read_ahead_bytes", 5000)
    produced = []

    def produce(put):
        for lsn in range(40):
            produced.append(lsn)
            put(_control_frame(lsn, pad=1000) if lsn != 30 else Frame(30, 1, 0, memoryview(b"?")))
        return "done"

    got = []
    with pytest.raises(SerializationError), _ReadAhead(produce,
                                                       decode_thread=decode_thread) as frames:
        for frame, decoded in frames:
            threading.Event().wait(0.002)           # a slow applier: the helper gets ahead
            # Held: at most ~5000 bytes of ~1 KiB frames, plus the one being decoded.
            assert len(produced) - len(got) <= 7, (len(produced), len(got))
            assert decoded["epoch"] == frame.first_lsn == len(got)
            got.append(frame.first_lsn)
    assert got == list(range(30))                   # everything before the bad frame, in order


def test_read_ahead_hands_other_values_over_in_order_with_the_frames():
    from mmsb_dist.engine import _ReadAhead

    def produce(put):
        ahead.hand("checkpoint")
        for lsn in range(5):
            put(_control_frame(lsn, pad=100))
            if lsn == 2:
                ahead.hand({"between": lsn})

    ahead = _ReadAhead(produce, hold_bytes=150)  # one frame at a time
    with ahead as frames:
        got = [value if frame is _ReadAhead.HANDED else frame.first_lsn
               for frame, value in frames]
    assert got == ["checkpoint", 0, 1, 2, {"between": 2}, 3, 4]


def test_read_ahead_stops_its_helper_when_the_caller_leaves():
    from mmsb_dist.engine import _ReadAhead
    finished = threading.Event()

    def produce(put):
        try:
            for lsn in range(10**6):
                put(_control_frame(lsn))
        finally:
            finished.set()

    ahead = _ReadAhead(produce)
    with ahead as frames:
        for frame, _ in frames:
            if frame.first_lsn == 3:
                break
    assert finished.is_set() and not ahead._thread.is_alive() and ahead.value is None

    ahead = _ReadAhead(lambda put: [put(_control_frame(lsn)) for lsn in range(50)] and "all")
    with ahead as frames:
        frames.skip_rest()                          # queue nothing more, let produce finish
    assert ahead.value == "all" and not ahead._thread.is_alive()


def test_every_open_has_a_greater_incarnation_even_after_a_damaged_counter(tmp_path):
    """The incarnation orders eager values across processes: it must grow at every open, and a
    counter that cannot be read must not send it back."""
    assert [_next_incarnation(str(tmp_path)) for _ in range(3)] == [1, 2, 3]
    assert (tmp_path / "incarnation").read_bytes() == b"3\n"
    (tmp_path / "incarnation").write_bytes(b"\x00\xffnot a number")
    n = _next_incarnation(str(tmp_path))
    assert n > 3 and _next_incarnation(str(tmp_path)) == n + 1
    with ShardEngine(tmp_path / "shard", fsync="none") as e:
        first = e._generation
    with ShardEngine(tmp_path / "shard", fsync="none") as e:
        assert e._generation > first
