"""Propagation of derived pages: same-shard hops, cross-shard hops, fan-out 1000, in one run.

    python benchmarks/bench_propagation.py [--quick] [--no-ray] [--backend numpy|cupy]
                                           [--out bench-results/propagation.json]

Every figure sits beside its baseline, measured in the same run:

  same-shard hop   a chain of CHAIN derived pages (64-byte pages, "copy" and a user function
                   x + 1) on one ShardEngine (fsync "always"): one write to the root, eager
                   propagation recomputes the whole chain in the same call, logs the results as
                   one masked batch (one fsync) and applies them. Amortized hop = (write with the
                   chain - the same write to a page without children) / CHAIN. Also the barrier's
                   recompute of the same chain (engine.recompute, what a commit runs).
                   Baseline: a plain Python call chain, v = fn(v), CHAIN times, with the same fn
                   on the same NumPy arrays (no logging, no diff: the floor of any propagation
                   that calls a Python function per hop; on the CuPy backend, on CuPy arrays).
                   Target: <= 10 us per hop (the original
                   MMSB's own target, which it missed at 170-300 us).
  fan-out 1000     one parent with FANOUT derived children ("copy"): a write to the parent
                   recomputes all of them (eager), and the barrier's recompute of the same set.
                   Baseline: the same FANOUT copies in a Python loop (no logging, no diff; CuPy
                   arrays on the CuPy backend).
  cross-shard hop  (Ray, 3 NumPy shards on a local Ray) a chain of HOPS derived pages whose every
                   edge crosses shards: latency from a durable write to the root until the chain's
                   end reads the new value (eager messages between shard actors, polled), per
                   hop; and a commit that recomputes the chain at the barrier vs a commit with
                   nothing to recompute. Baseline: one Ray actor call round trip (ping) measured
                   in the same run.

Medians over ROUNDS rounds; JSON with every sample summary goes to --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import write_json                     # noqa: E402
from mmsb_dist.delta import DeltaBatch                         # noqa: E402
from mmsb_dist.engine import ShardEngine                       # noqa: E402
from mmsb_dist.graph import make_fn                            # noqa: E402

PAGE = 64


def _plus_one(x):
    return x + np.uint32(1)


def _median(fn, rounds: int) -> tuple[float, float, float]:
    xs = []
    for _ in range(rounds):
        xs.append(fn())
    return statistics.median(xs), min(xs), max(xs)


class _Shard:
    """One ShardEngine plus what every same-shard measurement needs: timed writes, the backend's
    array module for the baselines, and a device sync around them."""

    def __init__(self, path: str, backend: str, rounds: int):
        self.eng = ShardEngine(path, backend=backend, fsync="always")
        self.xp = self.eng.backend.xp  # baselines run on the same array module as the shard
        self.rng = np.random.default_rng(7)
        self.rounds = rounds

    def sync(self) -> None:
        if self.xp is not np:
            self.xp.cuda.Stream.null.synchronize()

    def write(self, page: int, *, eager: bool = True) -> float:
        """Seconds of one durable 64-byte write to ``page``; ``eager=False``: the write only
        marks its page changed, as while a barrier is pending."""
        data = self.rng.integers(0, 1 << 31, PAGE // 4, dtype=np.uint32)
        batch = DeltaBatch.runs([page], [0], [data.view(np.uint8)])
        self.eng.eager = eager
        try:
            t0 = time.perf_counter()
            self.eng.apply(batch)
            return time.perf_counter() - t0
        finally:
            self.eng.eager = True

    def timed_recompute(self, pages) -> float:
        t0 = time.perf_counter()
        self.eng.recompute(pages)
        return time.perf_counter() - t0

    def python_loop(self, step, n: int) -> float:
        """Seconds of ``n`` plain calls of ``step`` (chained: each gets the last one's result)."""
        v = self.xp.asarray(self.rng.integers(0, 1 << 31, PAGE // 4, dtype=np.uint32))
        self.sync()
        t0 = time.perf_counter()
        for _ in range(n):
            v = step(v)
        self.sync()
        return time.perf_counter() - t0

    def measure(self, fn) -> tuple[float, float, float]:
        fn()  # warm-up
        return _median(fn, self.rounds)


def _chain(s: _Shard, fn, chain: int) -> dict:
    eng = s.eng
    ids = eng.create_pages(chain + 2, PAGE, "uint32")
    root, lone, links = int(ids[0]), int(ids[1]), [int(p) for p in ids[2:]]
    enc = make_fn(fn).encode()
    for parent, child in zip([root] + links, links):
        eng.derive(child, [parent], enc)
    eng.recompute(links)  # first computation (and warm-up of every path)

    def barrier():
        s.write(root, eager=False)
        return s.timed_recompute(links) / chain

    step = (lambda v: v.copy()) if fn == "copy" else _plus_one
    h, hlo, hhi = s.measure(lambda: (s.write(root) - s.write(lone)) / chain)
    b, blo, bhi = s.measure(barrier)
    pc, pclo, pchi = s.measure(lambda: s.python_loop(step, chain) / chain)
    assert np.array_equal(eng.read(links[-1]),
                          eng.read(root) if fn == "copy" else eng.read(root) + np.uint32(chain))
    for p in reversed(links):
        eng.underive(p)
    return {"eager_hop_us": h * 1e6, "eager_hop_us_range": [hlo * 1e6, hhi * 1e6],
            "barrier_hop_us": b * 1e6, "barrier_hop_us_range": [blo * 1e6, bhi * 1e6],
            "python_chain_hop_us": pc * 1e6, "python_chain_hop_us_range": [pclo * 1e6, pchi * 1e6]}


def _fanout(s: _Shard, fanout: int) -> dict:
    eng = s.eng
    ids = eng.create_pages(fanout + 1, PAGE, "uint32")
    parent, kids = int(ids[0]), [int(p) for p in ids[1:]]
    enc = make_fn("copy").encode()
    for k in kids:
        eng.derive(k, [parent], enc)
    eng.recompute(kids)

    def barrier():
        s.write(parent, eager=False)
        return s.timed_recompute(kids)

    fe, felo, fehi = s.measure(lambda: s.write(parent))
    fb, fblo, fbhi = s.measure(barrier)
    kept: list = []  # the copies are kept, as recomputed children are

    def copy_kept(v):
        kept.append(v.copy())
        return v

    fp, _, _ = s.measure(lambda: (kept.clear(), s.python_loop(copy_kept, fanout))[1])
    assert all(np.array_equal(a, eng.read(parent)) for a in eng.read_many(kids[:50]))
    return {"children": fanout, "eager_children_per_s": fanout / fe,
            "eager_s_range": [felo, fehi], "barrier_children_per_s": fanout / fb,
            "barrier_s_range": [fblo, fbhi], "python_loop_children_per_s": fanout / fp}


def same_shard(root_dir: str, chain: int, fanout: int, rounds: int, backend: str) -> dict:
    s = _Shard(os.path.join(root_dir, "hop"), backend, rounds)
    try:
        out = {name: _chain(s, fn, chain) for name, fn in (("copy", "copy"),
                                                             ("user x+1", _plus_one))}
        out["fanout"] = _fanout(s, fanout)
        return out
    finally:
        s.eng.close()


def cross_shard(root_dir: str, hops: int, rounds: int) -> dict:
    import ray

    from mmsb_dist import runtime
    from mmsb_dist.placement import shards_of

    ns = "mmsb-bench-propagation"
    ray.init(num_cpus=4, include_dashboard=False, namespace=ns, log_to_driver=False)
    try:
        bus = runtime.start(shards=3, data_dir=os.path.join(root_dir, "ray"), namespace=ns,
                            config={"backend": "numpy"})
        ids = bus.create_pages(hops * 12, PAGE, "uint32")
        owners = shards_of(ids, 3)
        pools = [list(ids[owners == s]) for s in range(3)]
        chain = [int(pools[0].pop())]
        for i in range(hops):
            chain.append(int(pools[(i + 1) % 3].pop()))
        for parent, child in zip(chain, chain[1:]):
            bus.depend(child, [parent], _plus_one)
        bus.commit()
        rng = np.random.default_rng(3)
        ping = bus.shards[0].ping

        def rtt():
            t0 = time.perf_counter()
            ray.get(ping.remote())
            return time.perf_counter() - t0

        def eager():
            v = rng.integers(0, 1 << 30, PAGE // 4, dtype=np.uint32)
            want = v + np.uint32(hops)
            t0 = time.perf_counter()
            bus.write(chain[0], 0, v)
            deadline = t0 + 30
            while time.perf_counter() < deadline:
                if np.array_equal(bus.read(chain[-1]).view(np.uint32), want):
                    return (time.perf_counter() - t0) / hops
            raise RuntimeError("eager propagation did not reach the end of the chain in 30 s")

        def commit_dirty():
            bus.write(chain[0], 0, rng.integers(0, 1 << 30, PAGE // 4, dtype=np.uint32))
            time.sleep(0.05)
            t0 = time.perf_counter()
            bus.commit()
            return time.perf_counter() - t0

        def commit_clean():
            t0 = time.perf_counter()
            bus.commit()
            return time.perf_counter() - t0

        for f in (rtt, eager, commit_dirty, commit_clean):
            f()
        r = _median(rtt, rounds * 5)
        e = _median(eager, rounds)
        cd = _median(commit_dirty, rounds)
        cc = _median(commit_clean, rounds)
        runtime.stop(namespace=ns)
        return {"hops": hops, "ray_rtt_ms": r[0] * 1e3,
                "eager_hop_ms": e[0] * 1e3, "eager_hop_ms_range": [e[1] * 1e3, e[2] * 1e3],
                "commit_with_chain_ms": cd[0] * 1e3, "commit_clean_ms": cc[0] * 1e3,
                "barrier_ms_per_hop": (cd[0] - cc[0]) / hops * 1e3}
    finally:
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and a shorter cross-shard chain")
    ap.add_argument("--no-ray", action="store_true", help="skip the cross-shard (Ray) part")
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    ap.add_argument("--out", default="bench-results/propagation.json")
    ap.add_argument("--dir", default=None, help="parent of the temp dir")
    args = ap.parse_args()
    chain, fanout, rounds, hops = (1000, 1000, 5, 9) if args.quick else (1000, 1000, 9, 30)
    root = tempfile.mkdtemp(prefix="mmsb-bench-prop-", dir=args.dir)
    t0 = time.perf_counter()
    try:
        same = same_shard(root, chain, fanout, rounds, args.backend)
        cross = None if args.no_ray else cross_shard(root, hops, max(3, rounds // 2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nPropagation ({args.backend} backend, chain {chain}, fan-out {fanout})")
    print(f"{'measure':44} {'value':>12}  {'baseline':>12}  note")
    for name in ("copy", "user x+1"):
        r = same[name]
        ok = "PASS" if r["eager_hop_us"] <= 10 else "MISS"
        print(f"{'same-shard hop, eager, ' + name:44} {r['eager_hop_us']:9.2f} us  "
              f"{r['python_chain_hop_us']:9.2f} us  python call chain; target <= 10 us: {ok}")
        print(f"{'same-shard hop, barrier, ' + name:44} {r['barrier_hop_us']:9.2f} us  "
              f"{r['python_chain_hop_us']:9.2f} us")
    f = same["fanout"]
    print(f"{'fan-out 1000, eager (children/s)':44} {f['eager_children_per_s']:12.3g}  "
          f"{f['python_loop_children_per_s']:12.3g}  python loop of copies")
    print(f"{'fan-out 1000, barrier (children/s)':44} {f['barrier_children_per_s']:12.3g}  "
          f"{f['python_loop_children_per_s']:12.3g}")
    if cross:
        print(f"{'cross-shard hop, eager (ms)':44} {cross['eager_hop_ms']:12.2f}  "
              f"{cross['ray_rtt_ms']:9.2f} ms  Ray actor round trip")
        print(f"{'cross-shard hop, barrier (ms per hop)':44} {cross['barrier_ms_per_hop']:12.2f}  "
              f"{cross['ray_rtt_ms']:9.2f} ms  (commit {cross['commit_with_chain_ms']:.1f} ms vs "
              f"{cross['commit_clean_ms']:.1f} ms clean)")
    write_json(args.out, {"backend": args.backend, "chain": chain, "fanout": fanout,
                          "rounds": rounds, "same_shard": same, "cross_shard": cross},
               time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
