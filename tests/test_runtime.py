"""The runtime on a real local Ray instance (one per module): write, read, commit, time travel,
replay, and recovery after killing a shard actor and the coordinator."""

import numpy as np
import pytest
import ray

from mmsb_dist import runtime
from mmsb_dist.runtime import COORDINATOR, _shard_name


@pytest.fixture(scope="module")
def bus(tmp_path_factory):
    ray.init(num_cpus=2, include_dashboard=False, namespace="mmsb-test", log_to_driver=False)
    data = tmp_path_factory.mktemp("runtime")
    b = runtime.start(shards=2, data_dir=str(data), config={"backend": "numpy"},
                      namespace="mmsb-test")
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
    shards = {s["shard"] for s in bus.stats()["shards"]}
    assert shards == {0, 1}
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
