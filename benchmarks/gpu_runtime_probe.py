"""Where a shard actor's ingest time goes on Ray: a timeline of its write path, beside the raw disk.

    python benchmarks/gpu_runtime_probe.py [--backend cupy] [--calls 3] [--writers 1]
                                           [--dir PARENT] [--out bench-results/runtime-probe.json]

Starts a local Ray and a one-shard runtime (fsync "always"; backend cupy by default, numpy to try
it without a GPU) over 65,536 pages of 4 KiB, then makes ``--calls`` Bus.write_many calls of 4 Mi
64-byte runs at random 64-byte-aligned offsets from each of ``--writers`` writers at once (threads,
one client each). Inside the shard process (through Ray's ``__ray_call__``) the engine's steps are
wrapped with timers: prepare (decode + checksum start), the wait for the batch a batch follows,
the engine call under the gate, validation, the log write from submission until durable, the
arena apply. Reported per batch and in total: how much of the wall time the log was writing (the
disk's share: what the target is about), and where the time between log writes went. Raw disk:
sequential 1 MiB writes + one fsync, in the same run. A diagnostic for bench_ingest.py's GPU rows.
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
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_log                                              # noqa: E402
from _common import run_at_once, write_json                   # noqa: E402
from mmsb_dist import runtime                                 # noqa: E402

PAGES, PAGE_BYTES, DELTA = 65_536, 4096, 64
CALL = 4 << 20


def _install_tracer(actor) -> None:
    """Wrap the shard's engine steps with timers (wall clock, comparable across processes)."""
    def install(shard):
        import threading as th
        import time as tm

        trace = shard.__dict__.setdefault("_probe_trace", [])
        engine = shard.engine

        def timed(obj, name, label):
            inner = getattr(obj, name)

            def wrapper(*a, **kw):
                t0 = tm.time()
                try:
                    return inner(*a, **kw)
                finally:
                    trace.append((label, th.get_ident(), t0, tm.time()))
            setattr(obj, name, wrapper)

        for name in ("prepare", "wait_applied", "apply"):
            timed(engine, name, name)
        timed(engine.arena, "validate", "validate")
        timed(engine.arena, "apply_validated", "arena_apply")
        submit = engine.log.append_many_async

        def append_many_async(frames):
            t0 = tm.time()
            firsts, durable = submit(frames)
            durable.add_done_callback(
                lambda _f: trace.append(("log", th.get_ident(), t0, tm.time())))
            return firsts, durable
        engine.log.append_many_async = append_many_async
        return True
    ray.get(actor.__ray_call__.remote(install))


def _take_trace(actor) -> list:
    def take(shard):
        out = list(shard._probe_trace)
        shard._probe_trace.clear()
        return out
    return ray.get(actor.__ray_call__.remote(take))


def _union(intervals) -> float:
    total, end = 0.0, -1e300
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _report(args, wall: float, trace: list, spans: list, log_bytes: int, disk: float) -> dict:
    """Summarize and print the traced run: rates against the raw disk (``disk`` GB/s), each
    step's count, median and share of the wall time, and the start of the timeline."""
    deltas = args.writers * args.calls * CALL
    by = {}
    for label, _tid, a, b in trace:
        by.setdefault(label, []).append((a, b))
    busy = {k: _union(v) for k, v in by.items()}
    res = {"backend": args.backend, "writers": args.writers, "calls": args.calls,
           "call_deltas": CALL, "wall_s": wall, "deltas_per_s": deltas / wall,
           "payload_gb_per_s": deltas * DELTA / wall / 1e9, "raw_disk_gb_per_s": disk,
           "busy_fraction": {k: v / wall for k, v in busy.items()},
           "median_ms": {k: 1e3 * statistics.median([b - a for a, b in v]) for k, v in by.items()},
           "count": {k: len(v) for k, v in by.items()},
           "call_ms": sorted(1e3 * (b - a) for a, b in spans)}
    res["log_gb_per_s"] = log_bytes / wall / 1e9
    res["log_of_disk"] = res["log_gb_per_s"] / disk
    print(f"{args.writers} writer(s) x {args.calls} calls of {CALL >> 20} Mi deltas, backend "
          f"{args.backend}: {wall:.3f} s, {deltas / wall / 1e6:.2f} M deltas/s, payload "
          f"{res['payload_gb_per_s']:.2f} GB/s; raw disk {disk:.2f} GB/s; log "
          f"{res['log_gb_per_s']:.2f} GB/s = {res['log_of_disk']:.0%} of raw disk")
    print(f"{'step':>14} {'count':>6} {'median ms':>10} {'busy % of wall':>15}")
    for k in sorted(by, key=lambda k: -busy[k]):
        print(f"{k:>14} {len(by[k]):6d} {res['median_ms'][k]:10.1f} {100 * busy[k] / wall:14.0f}%")
    # the timeline of the first call's batches, relative to the first prepare
    t_base = min(a for _, _, a, _ in trace)
    print("timeline (ms from the first prepare; label thread start-end):")
    for label, tid, a, b in sorted(trace, key=lambda r: r[2])[:60]:
        print(f"  {label:>13} {tid % 1000:4d} {1e3 * (a - t_base):8.1f} - {1e3 * (b - t_base):8.1f}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="cupy")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--writers", type=int, default=1)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default="bench-results/runtime-probe.json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="mmsb-runtime-probe-", dir=args.dir)
    ns = f"mmsb-probe-{os.getpid()}"
    ray.init(address="local", namespace=ns, include_dashboard=False, log_to_driver=False)
    try:
        bus = runtime.start(shards=1, data_dir=os.path.join(work, "data"),
                            config={"backend": args.backend, "fsync": "always"}, namespace=ns)
        ids = bus.create_pages(PAGES, PAGE_BYTES)
        buses = [bus] + [runtime.connect(namespace=ns) for _ in range(args.writers - 1)]
        rng = np.random.default_rng(5)
        pool = rng.integers(1, 256, (CALL, DELTA), dtype=np.uint8)

        def call_args(k):
            return (ids[rng.integers(0, PAGES // args.writers, CALL) * args.writers + k],
                    rng.integers(0, PAGE_BYTES // DELTA, CALL) * DELTA, pool)

        bus.write_many(*call_args(0))   # warm-up: kernels, pinned buffers, log segment
        _install_tracer(bus.shards[0])
        before = bus.stats()["shards"][0]["log"]["bytes"]
        todo = [[call_args(k) for _ in range(args.calls)] for k in range(args.writers)]
        spans: list = []

        def writer(b, mine):
            for a in mine:
                t0 = time.time()
                b.write_many(*a)
                spans.append((t0, time.time()))

        wall = run_at_once(writer, list(zip(buses, todo)))
        trace = _take_trace(bus.shards[0])
        log_bytes = bus.stats()["shards"][0]["log"]["bytes"] - before
        runtime.stop(namespace=ns)
        raw = bench_log.bench_raw(work, 1024, False, 30.0)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    res = _report(args, wall, trace, spans, log_bytes, raw["mb_per_s"] / 1e3)
    write_json(args.out, res, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
