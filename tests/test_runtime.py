"""The runtime on a real local Ray instance (one per module): write, read, commit, time travel,
replay, restore, auto-commit, and recovery after killing a shard actor and the coordinator.

MMSB_TEST_BACKEND=cupy runs the same tests with CuPy shards (shards share one GPU)."""

import os

import numpy as np
import pytest
import ray

from mmsb_dist import limits, runtime
from mmsb_dist.runtime import COORDINATOR, _shard_name


BACKEND = os.environ.get("MMSB_TEST_BACKEND", "numpy")


@pytest.fixture(scope="module")
def bus(tmp_path_factory):
    # Logical CPUs: two shards of the module's runtime plus one of the auto-commit test's.
    ray.init(num_cpus=4, include_dashboard=False, namespace="mmsb-test", log_to_driver=False)
    data = tmp_path_factory.mktemp("runtime")
    b = runtime.start(shards=2, data_dir=str(data), namespace="mmsb-test",
                      config={"backend": BACKEND, "gpus_per_shard": 0.25})
    yield b
    runtime.stop(namespace="mmsb-test")
    ray.shutdown()


def _random_writes(bus, ids, rng, n=2000):
    pids = ids[rng.integers(0, ids.size, n)]
    offs = rng.integers(0, 4096 - 64, n)
    data = rng.integers(1, 256, (n, 64), dtype=np.uint8)
    bus.write_many(pids, offs, data)
    return pids, offs, data


def _apply_local(model, pids, offs, data):
    for p, o, d in zip(pids, offs, data):
        model[int(p)][o:o + 64] = d


def test_write_read_commit_time_travel_and_replay(bus):
    rng = np.random.default_rng(0)
    ids = bus.create_pages(64, 4096)
    model = {int(p): np.zeros(4096, np.uint8) for p in ids}
    stats = bus.stats()["shards"]
    assert {s["shard"] for s in stats} == {0, 1}
    assert {s["backend"] for s in stats} == {BACKEND}
    after = {}
    for _ in range(3):
        _apply_local(model, *_random_writes(bus, ids, rng))
        epoch = bus.commit()
        after[epoch] = {p: m.copy() for p, m in model.items()}
    bus.write(int(ids[0]), 0, b"live only")
    model[int(ids[0])][:9] = np.frombuffer(b"live only", np.uint8)
    got = bus.read_many(ids)
    assert all(np.array_equal(g, model[int(p)]) for p, g in zip(ids, got))
    for epoch, state in after.items():
        as_of = bus.read_many(ids, epoch=epoch)
        assert all(np.array_equal(g, state[int(p)]) for p, g in zip(ids, as_of))
        assert len(bus.replay(epoch)) == 2
    assert bus.committed_epochs() == sorted(after)


def test_large_write_many_is_cut_into_pipelined_batches_in_order(bus, monkeypatch):
    """A call over limits.write_batch_deltas goes out as several batches per shard, several in
    flight; per page the last write in the call wins, as in one batch."""
    monkeypatch.setattr(limits, "write_batch_deltas", 37)
    monkeypatch.setattr(limits, "inflight_batches_max", 3)
    rng = np.random.default_rng(7)
    ids = bus.create_pages(5, 4096)
    model = {int(p): np.zeros(4096, np.uint8) for p in ids}
    for target in (ids[:1], ids):  # one shard (sliced, no copy), then every shard (gathered)
        n = 1000
        pids = target[rng.integers(0, target.size, n)]
        offs = rng.integers(0, 8, n) * 64     # few slots: many writes overwrite earlier ones
        data = rng.integers(1, 256, (n, 64), dtype=np.uint8)
        before = bus.stats()["shards"]
        assert bus.write_many(pids, offs, data) == n
        after = bus.stats()["shards"]
        assert sum(a["next_lsn"] - b["next_lsn"] for a, b in zip(after, before)) == n
        assert sum(a["log"]["frames"] - b["log"]["frames"]
                   for a, b in zip(after, before)) >= n // 37
        _apply_local(model, pids, offs, data)
        got = bus.read_many(ids)
        assert all(np.array_equal(g, model[int(p)]) for p, g in zip(ids, got))


def test_a_batch_arriving_before_the_one_it_follows_is_refused_and_resent(bus, monkeypatch):
    """Ray may re-send the calls in flight to a restarted shard out of order. A batch of a
    write_many names the one it follows; the shard refuses it (OrderError, nothing applied) while
    that one is not applied, and the client re-sends what was refused, in order."""
    from mmsb_dist.delta import DeltaBatch
    from mmsb_dist.errors import OrderError

    ids = bus.create_pages(1, 4096)
    shard = int(runtime.shards_of(ids, bus.n)[0])
    first = bus._stamp(DeltaBatch.runs(ids, [0], [b"first"]))
    second = bus._stamp(DeltaBatch.runs(ids, [0], [b"second"]))
    before = bus.stats()["shards"][shard]["next_lsn"]
    with pytest.raises(OrderError):   # it arrived first: refused
        ray.get(bus._submit(shard, second, after=first.seq))
    assert bus.stats()["shards"][shard]["next_lsn"] == before
    ray.get(bus._submit(shard, first))
    ray.get(bus._submit(shard, second, after=first.seq))
    assert bytes(bus.read(int(ids[0]))[:6]) == b"second"

    # the client's side: the first constrained batch of a call is refused as if it had overtaken
    # its predecessor; write_many re-sends it after the calls in flight and returns normally
    monkeypatch.setattr(limits, "write_batch_deltas", 50)
    submit, refused = bus._submit, []

    def overtaking(shard, part, after=None):
        if after is not None and not refused:
            refused.append(part.seq)
            after = 1 << 62
        return submit(shard, part, after)
    monkeypatch.setattr(bus, "_submit", overtaking)
    rng = np.random.default_rng(3)
    n = 400
    offs = rng.integers(0, 4, n) * 64
    data = rng.integers(1, 256, (n, 64), dtype=np.uint8)
    assert bus.write_many(np.repeat(ids, n), offs, data) == n
    assert refused
    model = np.zeros(4096, np.uint8)
    model[:6] = np.frombuffer(b"second", np.uint8)
    _apply_local({0: model}, np.zeros(n, np.int64), offs, data)
    assert np.array_equal(bus.read(int(ids[0])), model)


def test_concurrent_batches_of_one_client_all_apply(bus):
    """Batches of one client in flight together (the gateway's concurrent requests): the shard's
    write threads may apply them in any order, and none is taken for a duplicate of a newer one."""
    from mmsb_dist.delta import DeltaBatch

    ids = bus.create_pages(96, 64)
    shards = runtime.shards_of(ids, bus.n)
    rng = np.random.default_rng(11)
    data = rng.integers(1, 256, (ids.size, 64), dtype=np.uint8)
    refs = [bus._submit(int(s), bus._stamp(DeltaBatch.runs([pid], [0], [row])))
            for pid, s, row in zip(ids, shards, data)]
    acks = ray.get(refs)
    assert not any(duplicate for *_, duplicate in acks)
    assert all(np.array_equal(got, row) for got, row in zip(bus.read_many(ids), data))


def test_killed_shard_recovers_without_losing_acknowledged_writes(bus):
    rng = np.random.default_rng(1)
    ids = bus.create_pages(32, 4096)
    model = {int(p): np.zeros(4096, np.uint8) for p in ids}
    _apply_local(model, *_random_writes(bus, ids, rng))
    bus.commit()
    bus.checkpoint()
    _apply_local(model, *_random_writes(bus, ids, rng))
    victim = ray.get_actor(_shard_name(1), namespace="mmsb-test")
    pid_before = ray.get(victim.ping.remote())["pid"]
    ray.kill(victim, no_restart=False)   # Ray restarts it; it recovers from checkpoint + log
    _apply_local(model, *_random_writes(bus, ids, rng))  # sent while it restarts: retried
    assert ray.get(victim.ping.remote())["pid"] != pid_before
    got = bus.read_many(ids)
    assert all(np.array_equal(g, model[int(p)]) for p, g in zip(ids, got))
    epoch = bus.commit()
    bus.replay(epoch)


def test_restarted_coordinator_keeps_epochs_and_ids(bus):
    before = bus.committed_epochs()
    ids = bus.create_pages(4, 64)
    coordinator = ray.get_actor(COORDINATOR, namespace="mmsb-test")
    ray.kill(coordinator, no_restart=False)
    epoch = bus.commit()  # retried by Ray on the restarted coordinator
    assert epoch > max(before) and bus.committed_epochs() == before + [epoch]
    more = bus.create_pages(4, 64)
    assert not set(more.tolist()) & set(ids.tolist())


def test_restore_rolls_every_shard_back_and_commits_it(bus):
    rng = np.random.default_rng(2)
    ids = bus.create_pages(16, 4096)
    _random_writes(bus, ids, rng)
    epoch = bus.commit()
    at_epoch = bus.read_many(ids)
    _random_writes(bus, ids, rng)
    bus.commit()
    new = bus.restore(epoch)
    assert new > epoch and new in bus.committed_epochs()
    assert all(np.array_equal(a, b) for a, b in zip(bus.read_many(ids), at_epoch))
    assert bus.replay(new) == bus.replay(epoch)  # the same state, hash for hash


def test_auto_commit_closes_epochs_on_its_own(tmp_path):
    ns = "mmsb-auto"
    b = runtime.start(shards=1, data_dir=str(tmp_path), namespace=ns,
                      config={"backend": BACKEND, "auto_commit_s": 0.2, "gpus_per_shard": 0.25})
    try:
        import time
        deadline = time.monotonic() + 30
        while len(b.committed_epochs()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(b.committed_epochs()) >= 2
    finally:
        runtime.stop(namespace=ns)
