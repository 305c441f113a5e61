"""Crash safety of the shard engine, by SIGKILL (tests/crashkit.py).

A child applies seeded batches through ShardEngine (fsync="always") and acknowledges each; the
parent kills it at seeded moments. After every kill the parent recovers the shard and checks:

* every acknowledged batch is in the log;
* the recovered state equals a per-byte oracle that replays, in log order, the whole batches the
  log holds (each rebuilt from its delta id, not from the log's bytes): so no batch is partly there,
  and unacknowledged batches are either wholly there or absent;
* every sealed epoch replays to its recorded state hash.
"""

import os
import sys

from crashkit import run_kill_loop
from _enginechild import PAGE_SIZES, batch_for
from oracle import PageOracle

from mmsb_dist.engine import ShardEngine
from mmsb_dist.formats import decode_deltas

KILLS = int(os.environ.get("MMSB_ENGINE_KILLS", "25"))
SEED = 20261122


def _logged_seqs(engine: ShardEngine) -> list[int]:
    seqs = []
    for frame in engine.log.read(0):
        if bytes(frame.payload[:4]) == b"\xff\xff\xff\xff":
            seqs.append(decode_deltas(frame.payload).seq)
    return seqs


def _warm_kernel_cache(path) -> None:
    """Compile (and cache on disk) every kernel the child uses, so that children spend their short
    lives writing rather than compiling: a child killed mid-compile never saves its cache."""
    with ShardEngine(path, backend="numpy") as engine:
        for pid, size in enumerate(PAGE_SIZES):
            engine.create_pages(ids=[pid], size=size)
        engine.apply(batch_for(SEED, 0))
        engine.seal()
        engine.checkpoint()
    with ShardEngine(path, backend="numpy") as engine:
        engine.replay(1)


def test_engine_survives_sigkill_with_every_ack(tmp_path):
    _warm_kernel_cache(tmp_path / "warm")
    data = tmp_path / "shard"
    acked: set[int] = set()
    rnd = {"n": 0}
    checks = {"rounds": 0, "batches": 0, "sealed": 0}

    def on_line(line: str) -> None:
        if line.startswith("ack "):
            acked.add(int(line.split()[1]))

    def after_kill(_round) -> None:
        rnd["n"] += 1
        if not data.exists():
            return
        with ShardEngine(data, backend="numpy") as engine:
            seqs = _logged_seqs(engine)
            missing = acked - set(seqs)
            assert not missing, f"acknowledged batches lost: {sorted(missing)[:5]}"
            oracle = PageOracle()
            for pid, size in enumerate(PAGE_SIZES):
                if pid in set(engine.arena.page_ids().tolist()):
                    oracle.create(pid, size)
            for seq in seqs:
                oracle.apply(batch_for(SEED, seq))
            for pid in oracle.pages:
                assert engine.read(pid).tobytes() == oracle.bytes_of(pid), f"page {pid} differs"
            for seal in engine.seals()[-3:]:   # the newest epochs replay to their hashes
                assert engine.replay(seal.epoch).state_hash() == seal.state_hash
            engine.validate_state()
            checks["rounds"] += 1
            checks["batches"] = len(seqs)
            checks["sealed"] = engine.last_sealed

    argv = [sys.executable, os.path.join(os.path.dirname(__file__), "_enginechild.py"), str(data),
            str(SEED)]
    rounds = []
    for i in range(KILLS):  # one child per round, with its round number in its delta ids
        # Most kills land a random moment after recovery (the "ready" line), in the workload; the
        # rest a random moment after spawn, which may be during start-up or recovery.
        rounds += run_kill_loop(argv + [str(i + 1)], on_line, kills=1, seed=SEED + i,
                                trigger=lambda line: line == "ready", trigger_fraction=0.8,
                                trigger_delay_s=1.0, max_delay_s=2.0, after_kill=after_kill)
    killed = sum(r.returncode < 0 for r in rounds)
    assert killed >= KILLS - 1, f"only {killed} of {KILLS} rounds ended in a kill"
    assert checks["rounds"] >= KILLS - 2 and checks["batches"] > 20 and checks["sealed"] >= 1, checks
    print(f"\nengine crash test: {killed} kills, {len(acked)} acknowledged batches, "
          f"{checks['batches']} logged, {checks['sealed']} epochs sealed")
