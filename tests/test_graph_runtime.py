"""Derived pages on Ray: chains across 3 shards (recompute at the barrier and eager propagation
between commits), diamonds, refused writes and registrations, a killed shard, and replay of
committed epochs after every function was removed.

MMSB_TEST_BACKEND=cupy runs the same tests with CuPy shards (they share one GPU)."""

import os
import time

import numpy as np
import pytest
import ray

from _raykit import bounded
from mmsb_dist import runtime
from mmsb_dist.errors import DerivedPageError, GraphCycleError, InvalidPageError, UnknownPageError
from mmsb_dist.placement import shards_of
from mmsb_dist.runtime import _shard_name

BACKEND = os.environ.get("MMSB_TEST_BACKEND", "numpy")
NS = "mmsb-graph-test"
SHARDS = 3
SIZE = 64  # 16 uint32 lanes


@pytest.fixture(scope="module")
def bus(tmp_path_factory):
    ray.init(num_cpus=4, include_dashboard=False, namespace=NS, log_to_driver=False)
    b = runtime.start(shards=SHARDS, data_dir=str(tmp_path_factory.mktemp("graph")), namespace=NS,
                      config={"backend": BACKEND, "gpus_per_shard": 0.25})
    yield b
    runtime.stop(namespace=NS)
    ray.shutdown()


def _pages_by_shard(bus, per_shard: int) -> list[list[int]]:
    ids = bus.create_pages(per_shard * SHARDS * 4, SIZE, "uint32")
    owners = shards_of(ids, SHARDS)
    out = [[int(p) for p in ids[owners == s][:per_shard]] for s in range(SHARDS)]
    assert all(len(o) == per_shard for o in out)
    return out


def _u32(a):
    return np.asarray(a).reshape(-1).view(np.uint32)


# A lambda is pickled by value: the shards need not import this test module.
_plus_one = lambda x: x + np.uint32(1)  # noqa: E731


def _eventually(probe, what, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s:g} s")


def test_chain_across_three_shards(bus, rng):
    by = _pages_by_shard(bus, 4)
    root = by[0][0]
    chain = [by[(i + 1) % SHARDS][i // SHARDS + (1 if (i + 1) % SHARDS == 0 else 0)]
             for i in range(9)]  # shard 1, 2, 0, 1, 2, 0, ...: every hop crosses shards
    assert len(set(chain)) == 9 and root not in chain
    prev = root
    for p in chain:
        bus.depend(p, [prev], _plus_one)
        prev = p
    data = rng.integers(0, 1 << 30, SIZE // 4, dtype=np.uint32)
    bus.write(root, 0, data)
    bus.commit()
    got = bus.read_many(chain)
    for k, page in enumerate(got, start=1):
        assert np.array_equal(_u32(page), data + np.uint32(k))
    # Between commits, eager propagation carries a write down the chain across the shards.
    data2 = data ^ np.uint32(0x5A5A5A5A)
    bus.write(root, 0, data2)
    _eventually(lambda: np.array_equal(_u32(bus.read(chain[-1])), data2 + np.uint32(9)),
                "eager propagation to the end of the chain")
    e = bus.commit()
    for k, page in enumerate(bus.read_many(chain, epoch=e), start=1):
        assert np.array_equal(_u32(page), data2 + np.uint32(k))


def test_diamond_fan_in_and_refusals(bus, rng):
    by = _pages_by_shard(bus, 3)
    a, b, c, d = by[0][0], by[1][0], by[2][0], by[0][1]
    bus.depend(b, [a], "copy")
    bus.depend(c, [a], _plus_one)
    bus.depend(d, [b, c], "sum")
    fan = by[1][1]
    bases = [by[s][2] for s in range(SHARDS)]
    bus.depend(fan, bases + [d], "max")
    for _ in range(3):
        va = rng.integers(0, 1 << 20, SIZE // 4, dtype=np.uint32)
        bus.write(a, 0, va)
        vb = [rng.integers(0, 1 << 22, SIZE // 4, dtype=np.uint32) for _ in bases]
        bus.write_many(bases, [0] * len(bases), np.stack(vb).view(np.uint8))
        bus.commit()
        want_d = va + va + np.uint32(1)
        assert np.array_equal(_u32(bus.read(d)), want_d)
        assert np.array_equal(_u32(bus.read(fan)), np.maximum.reduce(vb + [want_d]))
    before = _u32(bus.read(d)).copy()
    with pytest.raises(DerivedPageError):
        bus.write(d, 0, b"\x01\x02\x03\x04")
    with pytest.raises(DerivedPageError):
        bus.write_many([a, d], [0, 0], [b"\x09" * 4, b"\x09" * 4])
    assert np.array_equal(_u32(bus.read(d)), before)
    with pytest.raises(GraphCycleError):
        bus.depend(a, [d], "copy")
    with pytest.raises(UnknownPageError):
        bus.depend(by[2][1], [1 << 60], "copy")
    with pytest.raises(InvalidPageError):
        bus.depend(by[2][1], [a, b], "copy")
    assert bus.stats()["graph"]["derived_pages"] >= 4


def test_a_function_the_shard_cannot_load_is_refused(bus):
    by = _pages_by_shard(bus, 1)

    def by_reference(x):  # pickled by reference to this module, which shards cannot import
        return x

    by_reference.__qualname__ = "by_reference"  # importable-looking: test_graph_runtime.by_reference
    globals()["by_reference"] = by_reference
    with pytest.raises(Exception, match="cannot load the user recompute function"):
        bus.depend(by[1][0], [by[0][0]], by_reference)
    bus.write(by[1][0], 0, b"\x01")  # nothing was registered: still an ordinary page


def test_killed_shard_recomputes_after_restart(bus, rng):
    by = _pages_by_shard(bus, 2)
    root, mid, tail = by[0][0], by[1][0], by[2][0]
    bus.depend(mid, [root], _plus_one)
    bus.depend(tail, [mid], _plus_one)
    bus.commit()
    victim = ray.get_actor(_shard_name(1), namespace=NS)
    pid = ray.get(victim.ping.remote())["pid"]
    ray.kill(victim, no_restart=False)
    _eventually(lambda: ray.get(victim.ping.remote(), timeout=5)["pid"] != pid,
                "the shard restarted", timeout_s=60)
    v = rng.integers(0, 1 << 30, SIZE // 4, dtype=np.uint32)
    bus.write(root, 0, v)
    bus.commit()
    assert np.array_equal(_u32(bus.read(tail)), v + np.uint32(2))
    with pytest.raises(DerivedPageError):  # the restarted shard still knows mid is derived
        bus.write(mid, 0, b"\x00" * 4)


def test_replay_without_the_functions(bus, rng):
    by = _pages_by_shard(bus, 2)
    root, x, y = by[0][0], by[1][0], by[2][0]
    bus.depend(x, [root], lambda r: r * np.uint32(3))  # a closure: pickled by value
    bus.depend(y, [x, root], "xor")
    want = {}
    for _ in range(3):
        v = rng.integers(0, 1 << 30, SIZE // 4, dtype=np.uint32)
        bus.write(root, 0, v)
        e = bus.commit()
        want[e] = {root: v, x: v * np.uint32(3), y: (v * np.uint32(3)) ^ v}
    bus.checkpoint()
    for child in (y, x):
        bus.undepend(child)
    graph = bus.stats()["graph"]
    assert graph["recompute_errors"] == []
    for e, pages in want.items():
        bus.replay(e)  # every shard rebuilds epoch e and checks the recorded hash
        got = bus.read_many(list(pages), epoch=e)
        for (page, expect), arr in zip(pages.items(), got):
            assert np.array_equal(_u32(arr), expect), (e, page)
    bus.write(x, 0, b"\x07" * 4)  # an ordinary page again


def test_held_writes_wait_for_the_barrier_and_a_stale_barrier_lets_go(bus):
    import threading

    from mmsb_dist.errors import EpochError

    by = _pages_by_shard(bus, 1)
    page, shard = by[0][0], bus.shards[0]
    ray.get(shard.freeze.remote(10**9, 60.0))  # a barrier that no coordinator will finish
    done = threading.Event()
    writer = threading.Thread(target=lambda: (bus.write(page, 0, b"\x2a"), done.set()),
                              daemon=True)
    writer.start()
    assert not done.wait(0.5)  # held, in order, not refused
    ray.get(shard.thaw.remote())
    assert done.wait(30) and _u32(bus.read(page)).view(np.uint8)[0] == 0x2A
    # A barrier whose coordinator died: the shard lets writes go after its hold and refuses
    # that barrier's seal (its recompute may be stale by then).
    ray.get(shard.freeze.remote(10**9, 0.2))
    bus.write(page, 0, b"\x2b")
    with pytest.raises(EpochError, match="not held"):
        ray.get(shard.seal.remote(10**9, True))
    assert bus.commit() > 0  # the runtime's own epochs go on


def test_a_restarted_coordinator_releases_writes_its_predecessor_held(bus):
    from mmsb_dist.runtime import COORDINATOR

    by = _pages_by_shard(bus, 1)
    page, shard = by[2][0], bus.shards[2]
    ray.get(shard.freeze.remote(10**9, 600.0))  # as if a barrier were in progress
    coordinator = ray.get_actor(COORDINATOR, namespace=NS)
    ray.kill(coordinator, no_restart=False)
    # The write is held until the restarted coordinator releases it (long before the 600 s hold).
    bounded(bus.write, page, 0, b"\x33", timeout_s=60, what="a write held by a dead barrier")
    assert _u32(bus.read(page)).view(np.uint8)[0] == 0x33
    assert bus.commit() > 0
