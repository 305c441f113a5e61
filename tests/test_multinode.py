"""The runtime on a multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head
and two worker nodes, 2 CPUs each, one data directory at the same local path for all of them).

Three shards spread over the nodes. After writes, commits and a checkpoint, a worker node that
hosts a shard (not the coordinator) is removed while a writer keeps going: Ray restarts the
detached shard on a remaining node, it recovers from the shared data directory (checkpoint + log),
and then nothing acknowledged is lost, every committed epoch reads and replays as before, and new
commits work. Seed: MMSB_SEED.
"""

import os
import secrets
import warnings

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from _raykit import (CALL_TIMEOUT_S, EpochBook, WriteLog, Writer, bounded, commit, ping_all,
                     random_batch, wait_until)
from mmsb_dist import runtime
from mmsb_dist.runtime import COORDINATOR

SEED = int(os.environ.get("MMSB_SEED", "20261122"))
SHARDS, PAGES, PAGE_BYTES = 3, 48, 4096
NODE_CPUS = 2  # a shard takes 1 CPU: after losing a node, the others still have room for it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if ray.is_initialized():  # another module's instance left behind: never share it
        ray.shutdown()
    namespace = f"mmsb-multinode-{secrets.token_hex(4)}"
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": NODE_CPUS, "include_dashboard": False})
    try:
        workers = [c.add_node(num_cpus=NODE_CPUS) for _ in range(2)]
        c.wait_for_nodes(timeout=CALL_TIMEOUT_S)
        ray.init(address=c.address, namespace=namespace, log_to_driver=False)
        data_dir = str(tmp_path_factory.mktemp("multinode"))  # the same path on every node
        bus = runtime.start(shards=SHARDS, data_dir=data_dir, config={"backend": "numpy"},
                            namespace=namespace)
        yield c, workers, bus
    finally:
        try:
            if ray.is_initialized():
                bounded(runtime.stop, namespace, timeout_s=30, what="runtime.stop")
        except Exception as exc:  # the cluster goes next, and every actor with it
            warnings.warn(f"runtime.stop: {exc!r}")
        finally:
            ray.shutdown()
            c.shutdown()


def _coordinator_node(c: Cluster, namespace: str) -> str | None:
    actors = c.global_state.actor_table(None).values()
    alive = [a for a in actors if a["Name"] == COORDINATOR and a["State"] == "ALIVE"
             and a.get("RayNamespace") in (None, namespace)]
    return alive[0]["Address"]["NodeID"] if alive else None


def _alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_shards_spread_and_survive_losing_a_node(cluster):
    c, workers, bus = cluster
    namespace = ray.get_runtime_context().namespace
    before = ping_all(bus, timeout_s=CALL_TIMEOUT_S)
    where = {p["shard"]: p["node"] for p in bounded(bus.stats, what="stats")["shards"]}
    assert where == {p["shard"]: p["node"] for p in before}
    assert len(set(where.values())) > 1, f"all {SHARDS} shards on one node: {where}"

    rng = np.random.default_rng(SEED)
    ids = bounded(bus.create_pages, PAGES, PAGE_BYTES, what="create_pages")
    log = WriteLog(ids, PAGE_BYTES, SHARDS)
    book = EpochBook(bus, log)
    for phase in range(3):  # committed + checkpointed, committed, then only logged
        for _ in range(4):
            bounded(log.write, bus, *random_batch(rng, ids, 256, PAGE_BYTES), what="write_many")
        if phase < 2:
            epoch = commit(bus)
            book.observe(f"commit {phase}")
            book.record(epoch, log.acked, log.acked, f"commit {phase}")
        if phase == 0:
            ray.get(bus.coordinator.checkpoint.remote(), timeout=CALL_TIMEOUT_S)

    # A worker node with a shard on it; one without the coordinator when there is one, so that
    # this is the loss of shards alone.
    by_id = {w.node_id: w for w in workers}
    hosts = [n for n in by_id if n in where.values()]
    assert hosts, f"no worker node hosts a shard: {where}"
    coordinator_at = _coordinator_node(c, namespace)
    victim = next((n for n in hosts if n != coordinator_at), hosts[0])
    moved = sorted(s for s, n in where.items() if n == victim)
    what = f"node {victim[:8]} removed (shards {moved}, seed {SEED})"

    writer = Writer(bus, log, seed=SEED + 1, batch_deltas=128)
    writer.start()
    try:
        writer.wait_progress(5, f"{what}: before")
        c.remove_node(by_id[victim])
        # Writes to the moved shards are re-sent to their restarted incarnations.
        writer.wait_progress(20, f"{what}: writes through the restart")

        def moved_and_serving():
            pings = ping_all(bus)
            return None if any(p["node"] == victim for p in pings) else {p["shard"]: p
                                                                          for p in pings}

        now = wait_until(moved_and_serving, timeout_s=CALL_TIMEOUT_S,
                         what=f"{what}: shards serving again")
        alive = _alive_nodes()
        assert victim not in alive and all(now[s]["node"] in alive for s in now)
        pids = {p["shard"]: p["pid"] for p in before}
        assert all(now[s]["pid"] != pids[s] for s in moved), f"{what}: {now}"
        writer.pause(what)
        log.check_live(bus, what)
        book.verify(what)
        lo = log.acked
        writer.resume()
        epoch = commit(bus)
        hi = log.started
        book.observe(f"{what}: commit after")
        book.record(epoch, lo, hi, f"{what}: commit after")
        writer.pause(f"{what}: after")
        log.check_live(bus, f"{what}: after")
        book.verify(f"{what}: after")
    finally:
        writer.stop(what)
    assert len(book.seen) >= 3
    print(f"{what}: coordinator on {str(coordinator_at)[:8]}, shards "
          f"{ {s: n[:8] for s, n in where.items()} } -> "
          f"{ {s: p['node'][:8] for s, p in now.items()} }, {log.acked} batches, "
          f"epochs {book.seen}")
