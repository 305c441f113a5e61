"""The coordinator's epoch protocol (mmsb_dist/protocol.py) and page placement, without Ray.

A small synchronous shell drives EpochProtocol against real ShardEngines and a real DecisionLog,
so commit, abort, timeouts and coordinator restarts are checked end to end on disk; a seeded random
schedule checks the invariants: epochs only increase, a committed epoch never changes, an aborted
epoch is never committed, and every committed epoch replays to its recorded hashes on every shard.
"""

import random

import numpy as np
import pytest

from mmsb_dist import DeltaBatch, EpochError
from mmsb_dist.engine import ShardEngine
from mmsb_dist.placement import shards_of
from mmsb_dist.protocol import (Abort, Commit, Committed, DecisionLog, EpochProtocol, Prepare,
                                RecordDecision)


class Shell:
    """Carries out instructions the way the Ray coordinator will: log before acting."""

    def __init__(self, proto, dlog, engines):
        self.proto, self.dlog, self.engines = proto, dlog, engines
        self.committed, self.aborted = [], []

    def run(self, instructions, *, fail_shard=None, stop_after=None):
        queue = list(instructions)
        while queue:
            ins = queue.pop(0)
            if isinstance(ins, Prepare):
                self.dlog.attempt(ins.epoch)
                if stop_after == "attempt":
                    return "stopped"
                for s in ins.shards:
                    if s == fail_shard:
                        queue += self.proto.shard_failed(s, now=0.0)
                        break
                    seal = self.engines[s].seal(ins.epoch)
                    queue += self.proto.prepared(s, ins.epoch, seal.cut, seal.state_hash)
            elif isinstance(ins, RecordDecision):
                self.dlog.decide(ins.epoch, ins.cuts)
                if stop_after == "decide":
                    return "stopped"
                queue += self.proto.decision_recorded(ins.epoch)
            elif isinstance(ins, Commit):
                for s in ins.shards:
                    queue += self.proto.commit_acked(s, ins.epoch)
            elif isinstance(ins, Committed):
                self.dlog.committed(ins.epoch)
                self.committed.append(ins.epoch)
            elif isinstance(ins, Abort):
                self.aborted.append(ins.epoch)
        return "done"


@pytest.fixture
def cluster(tmp_path):
    engines = {s: ShardEngine(tmp_path / f"shard{s}", shard=s, backend="numpy") for s in range(3)}
    for s, e in engines.items():
        e.create_pages(ids=np.arange(4) + 100 * s, size=256)
    dlog = DecisionLog(tmp_path / "coordinator")
    yield engines, dlog, tmp_path
    for e in engines.values():
        e.close()
    dlog.close()


def _write(engines, rng):
    for s, e in engines.items():
        e.apply(DeltaBatch.runs(np.arange(4) + 100 * s, rng.integers(0, 200, 4),
                                rng.integers(1, 256, (4, 50), dtype=np.uint8)))


def test_two_phase_commit_end_to_end(cluster):
    engines, dlog, _ = cluster
    shell = Shell(EpochProtocol(engines), dlog, engines)
    rng = np.random.default_rng(0)
    for _ in range(3):
        _write(engines, rng)
        assert shell.run(shell.proto.begin(now=0.0)) == "done"
    assert shell.committed == [1, 2, 3]
    for epoch, cuts in shell.proto.committed.items():
        for s, (cut, h) in cuts.items():
            assert engines[s].replay(epoch).state_hash() == h


def test_failed_shard_aborts_and_the_number_is_never_reused(cluster):
    engines, dlog, _ = cluster
    shell = Shell(EpochProtocol(engines), dlog, engines)
    shell.run(shell.proto.begin(now=0.0))
    shell.run(shell.proto.begin(now=0.0), fail_shard=1)
    shell.run(shell.proto.begin(now=0.0))
    assert shell.committed == [1, 3] and shell.aborted == [2]
    assert 2 not in shell.proto.committed
    with pytest.raises(EpochError):  # one attempt at a time
        shell.proto.begin(now=0.0)
        shell.proto.begin(now=0.0)


def test_prepare_timeout_aborts():
    proto = EpochProtocol([0, 1], prepare_timeout_s=5.0)
    (prep,) = proto.begin(now=100.0)
    assert proto.prepared(0, prep.epoch, 10, 7) == []
    assert proto.tick(now=104.9) == []
    (abort,) = proto.tick(now=105.0)
    assert isinstance(abort, Abort) and "[1]" in abort.reason
    assert proto.prepared(1, prep.epoch, 11, 8) == []  # a late report changes nothing
    assert proto.begin(now=106.0)[0].epoch == prep.epoch + 1


def test_coordinator_restart_during_prepare_aborts_in_flight_epoch(cluster):
    engines, dlog, path = cluster
    shell = Shell(EpochProtocol(engines), dlog, engines)
    shell.run(shell.proto.begin(now=0.0))
    assert shell.run(shell.proto.begin(now=0.0), stop_after="attempt") == "stopped"
    dlog.close()  # the coordinator dies; a new one reads its decision log
    dlog = DecisionLog(path / "coordinator")
    proto, todo = EpochProtocol.recover(engines, dlog.records(), now=0.0)
    assert [type(i) for i in todo] == [Abort] and todo[0].epoch == 2
    shell = Shell(proto, dlog, engines)
    shell.run(todo)
    shell.run(proto.begin(now=0.0))
    assert sorted(proto.committed) == [1, 3]
    dlog.close()


def test_coordinator_restart_after_decision_redrives_commit(cluster):
    engines, dlog, path = cluster
    rng = np.random.default_rng(1)
    _write(engines, rng)
    shell = Shell(EpochProtocol(engines), dlog, engines)
    assert shell.run(shell.proto.begin(now=0.0), stop_after="decide") == "stopped"
    decided = dict(shell.proto.attempt.reports)
    dlog.close()
    dlog = DecisionLog(path / "coordinator")
    proto, todo = EpochProtocol.recover(engines, dlog.records(), now=0.0)
    assert [type(i) for i in todo] == [Commit] and todo[0].epoch == 1
    assert proto.committed[1] == decided  # the committed epoch is exactly what was decided
    shell = Shell(proto, dlog, engines)
    shell.run(todo)
    assert shell.committed == [1] and proto.attempt is None
    assert proto.begin(now=0.0)[0].epoch == 2
    dlog.close()


def test_random_schedules_keep_the_invariants(tmp_path):
    rng = random.Random(1122)
    nprng = np.random.default_rng(1122)
    engines = {s: ShardEngine(tmp_path / f"s{s}", shard=s, backend="numpy") for s in range(3)}
    for s, e in engines.items():
        e.create_pages(ids=np.arange(4) + 100 * s, size=256)
    dlog = DecisionLog(tmp_path / "coord")
    proto = EpochProtocol(engines)
    decided, aborted, last_begun = {}, set(), 0
    for step in range(60):
        _write(engines, nprng)
        choice = rng.random()
        shell = Shell(proto, dlog, engines)
        if choice < 0.15:
            shell.run(proto.begin(now=0.0), stop_after=rng.choice(["attempt", "decide"]))
            dlog.close()
            dlog = DecisionLog(tmp_path / "coord")
            proto, todo = EpochProtocol.recover(engines, dlog.records(), now=0.0)
            shell = Shell(proto, dlog, engines)
            shell.run(todo)
        else:
            fail = rng.choice([None, None, None, 0, 2])
            shell.run(proto.begin(now=0.0), fail_shard=fail)
        aborted |= set(shell.aborted)
        assert proto.last_epoch >= last_begun
        last_begun = proto.last_epoch
        for epoch, cuts in proto.committed.items():
            assert decided.setdefault(epoch, cuts) == cuts, "a committed epoch changed"
    assert not aborted & set(decided), "an aborted epoch was committed"
    order = list(decided)  # in the order decisions first appeared
    assert order == sorted(order) and len(decided) > 20, order
    for epoch in sorted(decided)[-5:]:
        for s, (cut, h) in decided[epoch].items():
            assert engines[s].replay(epoch).state_hash() == h
    for e in engines.values():
        e.close()
    dlog.close()


def test_placement_is_balanced_and_moves_little_when_shards_grow():
    ids = np.arange(200_000, dtype=np.uint64) * 7919
    before = shards_of(ids, 8)
    counts = np.bincount(before, minlength=8)
    assert counts.min() > 0.9 * ids.size / 8 and counts.max() < 1.1 * ids.size / 8
    after = shards_of(ids, 9)
    moved = before != after
    assert abs(moved.mean() - 1 / 9) < 0.01 and set(after[moved].tolist()) == {8}
    assert np.array_equal(shards_of(ids, 8), before)  # deterministic
    with pytest.raises(ValueError):
        shards_of(ids, 0)
