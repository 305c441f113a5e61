"""Ingest into the runtime on Ray (Bus.write, Bus.write_many, Bus.commit) against its baselines,
all measured in one run on one machine.

    python benchmarks/bench_ingest.py [--quick] [--out bench-results/ingest.json] [--shards 1,2]
                                      [--dir PARENT]

Workload (the issue's): 64-byte writes of random non-zero bytes at random 64-byte-aligned offsets of
65,536 pages of 4 KiB (16,384 with --quick). Each configuration gets a fresh runtime:
ray.init(address="local"), runtime.start(shards=N, data_dir=<temp dir>,
config={"backend": ..., "fsync": "always"}, namespace=<unique>), the pages created, then
runtime.stop + ray.shutdown. Ray is initialized here (not by runtime.start) with num_cpus =
max(cores, shards), because every CPU shard actor asks for one CPU and 4 shards never get scheduled
on a 2-core machine otherwise. On a GPU machine the CPU
configurations name backend "numpy" (with "auto" every shard would ask for a GPU of its own).

Configurations and rows:
  write, N shards     (for N in --shards) naive client: one Bus.write() per delta, one actor
                      call each (deltas/s, p50/p99 latency of one write); Bus.write_many of
                      BATCHES deltas per call (deltas/s, MB/s of payload); WRITERS writers at once
                      (threads, each its own client, on disjoint pages), calls of min(BATCHES).
  commit, 4 shards    Bus.commit() p50/p99 with 4 shards, each epoch preceded by a write_many of
                      COMMIT_BATCH deltas (not timed in the commit figure).
  gpu, 1 shard        only when mmsb_dist.backend.gpu_available(): one CuPy shard (backend "cupy"),
                      write_many of GPU_BATCH deltas per call, and of GPU_STREAM_CALL per call (cut
                      into limits.write_batch_deltas batches, several in flight), and WRITERS
                      writers at once making one such call each; GB/s of log
                      written (log_frame_bytes_per_delta / 64 times the payload: what the disk
                      must carry) against the raw disk, payload beside it; host->device copy bandwidth with
                      CuPy (256 MiB, pinned and pageable), raw disk (GPU_RAW_MIB) beside it.
  baselines           raw disk: sequential 1 MiB writes + one fsync (bench_log.bench_raw); redis:
                      redis-benchmark -P 64 -c 50 SETRANGE of 64-byte values over 65,536 keys,
                      appendonly yes + appendfsync always (bench_log.bench_redis). Both are measured
                      in every round of every configuration, so they share the runtime's conditions.
Every configuration runs ROUNDS interleaved rounds (the phase order rotates each round, os.sync()
before every phase) and reports medians (latencies: over all samples), since this VM is noisy.

Correctness of what was timed, once per configuration: a local model applies every acknowledged
write in order (same bytes: last wins); a sample of pages is read back with Bus.read_many and
compared byte for byte (commit config: also read as of the last committed epoch, which replays and
checks the sealed state hash). A mismatch is reported and the exit status is 1.

A profile (first write configuration) splits one write_many call into its parts: client side
(DeltaBatch.runs + check, shards_of, take, encode_deltas), the Ray round trip of the same payload to
a no-op actor, and the shard's engine.apply (decode, log append + fsync, scatter) timed on a local
ShardEngine, beside the live shard actor's apply call with a ready payload. What-ifs bound a change:
the round trip of a no-op call (the write() floor), 10k-delta batches sent straight to the shard
actor with 1 vs limits.inflight_batches_max in flight (a write window spanning calls), and
engine.apply vs engine.apply_many (group commit). The commit configuration profiles DecisionLog
appends, engine.seal, round trips, and in situ the seal fan-out and the commit after it.

Targets (PASS/MISS): write_many >= 3x redis always-fsync deltas/s (durable acks both);
single write() p50 <= 2 ms; commit p50 <= 10 ms with 4 shards; GPU shard >= 10 GB/s of payload or
its log written at >= 80% of the raw disk's write bandwidth (writes are durable: fsync always).
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # benchmarks/ (bench_log, _common)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_log                                             # noqa: E402
from _common import run_at_once, write_json                  # noqa: E402
from mmsb_dist import limits, runtime                        # noqa: E402
from mmsb_dist.backend import gpu_available                  # noqa: E402
from mmsb_dist.delta import DeltaBatch                       # noqa: E402
from mmsb_dist.engine import ShardEngine                     # noqa: E402
from mmsb_dist.formats import decode_deltas, encode_deltas   # noqa: E402
from mmsb_dist.log import LogPartition                       # noqa: E402
from mmsb_dist.placement import shards_of                    # noqa: E402
from mmsb_dist.protocol import DecisionLog                   # noqa: E402

PAGE_BYTES = 4096
DELTA_BYTES = 64
SLOTS = PAGE_BYTES // DELTA_BYTES

# (quick, full) sizes. Each phase is small; the rounds give the medians.
PAGES = (16_384, 65_536)
ROUNDS = (3, 5)
BATCHES = (10_000, 50_000, 100_000)
WM_DELTAS = (100_000, 300_000)      # deltas per write_many phase (at least 2 calls of a size)
NAIVE_WRITES = (500, 2_000)         # Bus.write() calls per configuration, spread over the rounds
COMMITS = (20, 50)                  # per configuration, spread over the rounds
COMMIT_BATCH = 1_000                # deltas written before each commit
VERIFY_PAGES = (2_048, 4_096)
RAW_MIB = (128, 256)
REDIS_OPS = (200_000, 500_000)
PHASE_SECONDS_MAX = (5.0, 15.0)
PROFILE_SIZES = (1, 10_000, 100_000)
PROFILE_REPS = (5, 9)
WHATIF_BATCH = 10_000               # what-ifs: batch size, batches per pipelined run, group size
WHATIF_BATCHES = 40
GROUP = 8
# GPU configuration
GPU_BATCH = 1 << 20                 # 1 Mi deltas x 64 B = 64 MiB of payload per call
GPU_CALLS = (2, 3)                  # write_many calls per round
GPU_STREAM_CALL = 4 * GPU_BATCH     # a larger call: limits.write_batch_deltas batches in flight
GPU_RAW_MIB = (512, 1024)
WRITERS = 2                         # concurrent writers (threads, one client each) of the *_writers rows
H2D_BYTES = 256 << 20

TARGET_WM_VS_REDIS = 3.0
TARGET_WRITE_P50_MS = 2.0
TARGET_COMMIT_P50_MS = 10.0
TARGET_GPU_GB_S = 10.0
TARGET_GPU_OF_DISK = 0.8


def _pct(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def _median_by(samples: list[dict], key: str) -> dict:
    ordered = sorted(samples, key=lambda r: r[key])
    return {**ordered[len(ordered) // 2], "samples": [r[key] for r in samples]}


# ---- workload and the local model ----------------------------------------------------------------

class Workload:
    """Random 64-byte writes on the created pages, and a model of the pages that applies every
    acknowledged write in order (writes to the same bytes: last wins)."""

    def __init__(self, ids: np.ndarray, pool_rows: int, seed: int):
        self.ids = ids
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.integers(1, 256, (pool_rows, DELTA_BYTES), dtype=np.uint8)
        self.model = np.zeros((ids.size, SLOTS, DELTA_BYTES), np.uint8)

    def draw(self, n: int, part: tuple[int, int] = (0, 1)) -> tuple:
        """(page index, slot, payload rows) of ``n`` writes; the rows are a window of the pool.
        ``part`` (k, parts): only pages whose index is k modulo parts (writers on disjoint pages)."""
        start = int(self.rng.integers(0, self.pool.shape[0] - n + 1))
        k, parts = part
        return (self.rng.integers(0, self.ids.size // parts, n) * parts + k,
                self.rng.integers(0, SLOTS, n), self.pool[start:start + n])

    def args(self, pages, slots, data) -> tuple:
        return self.ids[pages], slots.astype(np.int64) * DELTA_BYTES, data

    def apply(self, pages, slots, data) -> None:
        key = pages.astype(np.int64) * SLOTS + slots
        # last occurrence of each (page, slot) wins: first occurrence in the reversed order
        _, first_rev = np.unique(key[::-1], return_index=True)
        keep = key.size - 1 - first_rev
        self.model.reshape(-1, DELTA_BYTES)[key[keep]] = data[keep]

    def verify(self, bus, count: int, epoch: int | None = None) -> dict:
        sample = np.sort(self.rng.choice(self.ids.size, min(count, self.ids.size), replace=False))
        got = bus.read_many(self.ids[sample], epoch)
        bad = [int(self.ids[i]) for i, g in zip(sample, got)
               if not np.array_equal(np.asarray(g).view(np.uint8).reshape(-1),
                                     self.model[i].reshape(-1))]
        touched = int(np.count_nonzero(self.model[sample].any(axis=(1, 2))))
        return {"pages_read": int(sample.size), "pages_written": touched,
                "mismatched": len(bad), "first_mismatched_ids": bad[:5], "epoch": epoch,
                "ok": not bad}


# ---- phases --------------------------------------------------------------------------------------

def phase_write_many(bus, wl: Workload, size: int, total: int) -> dict:
    calls = max(2, -(-total // size))
    times = []
    for _ in range(calls):
        pages, slots, data = wl.draw(size)
        args = wl.args(pages, slots, data)
        t0 = time.perf_counter()
        bus.write_many(*args)
        times.append(time.perf_counter() - t0)
        wl.apply(pages, slots, data)
    seconds = sum(times)
    deltas = calls * size
    return {"batch": size, "calls": calls, "deltas": deltas, "seconds": seconds,
            "deltas_per_s": deltas / seconds, "mb_per_s": deltas * DELTA_BYTES / seconds / 1e6,
            "gb_per_s": deltas * DELTA_BYTES / seconds / 1e9,
            "call_ms_p50": 1e3 * statistics.median(times)}


def phase_writers(buses: list, wl: Workload, size: int, calls: int) -> dict:
    """len(buses) writers at once (threads of this process, each its own client), each making
    ``calls`` write_many calls of ``size`` deltas on its own share of the pages (so that what the
    model applies does not depend on how the writers interleave). Rate: all deltas / wall time."""
    n = len(buses)
    draws = [[wl.draw(size, (k, n)) for _ in range(calls)] for k in range(n)]

    def writer(bus, mine):
        for d in mine:
            bus.write_many(*wl.args(*d))

    seconds = run_at_once(writer, list(zip(buses, draws)))
    for mine in draws:
        for d in mine:
            wl.apply(*d)
    deltas = n * calls * size
    return {"writers": n, "batch": size, "calls": n * calls, "deltas": deltas,
            "seconds": seconds, "deltas_per_s": deltas / seconds,
            "mb_per_s": deltas * DELTA_BYTES / seconds / 1e6,
            "gb_per_s": deltas * DELTA_BYTES / seconds / 1e9}


def phase_naive(bus, wl: Workload, count: int, lat_ms: list) -> dict:
    pages, slots, data = wl.draw(count)
    ids, offs, _ = wl.args(pages, slots, data)
    times = []
    for i in range(count):
        payload = data[i].tobytes()
        t0 = time.perf_counter()
        bus.write(int(ids[i]), int(offs[i]), payload)
        times.append(time.perf_counter() - t0)
        wl.model[pages[i], slots[i]] = data[i]
    lat_ms += [1e3 * t for t in times]
    return {"writes": count, "seconds": sum(times), "deltas_per_s": count / sum(times),
            "p50_ms": 1e3 * statistics.median(times)}


def phase_commit(bus, wl: Workload, count: int, lat_ms: list, epochs: list) -> dict:
    times, write_times = [], []
    for _ in range(count):
        pages, slots, data = wl.draw(COMMIT_BATCH)
        t0 = time.perf_counter()
        bus.write_many(*wl.args(pages, slots, data))
        write_times.append(time.perf_counter() - t0)
        wl.apply(pages, slots, data)
        t0 = time.perf_counter()
        epochs.append(bus.commit())
        times.append(time.perf_counter() - t0)
    lat_ms += [1e3 * t for t in times]
    return {"commits": count, "p50_ms": 1e3 * statistics.median(times),
            "write_many_ms_p50": 1e3 * statistics.median(write_times),
            "deltas_per_s": count / sum(times)}


def h2d_bandwidth(nbytes: int, reps: int = 5) -> dict:
    """Host->device copy of ``nbytes`` with CuPy: from pinned memory (cupyx.empty_pinned +
    cudaMemcpy) and from pageable memory (ndarray.set); medians of ``reps`` after a warm-up."""
    import cupy as cp
    import cupyx

    pinned = cupyx.empty_pinned((nbytes,), dtype=np.uint8)
    pinned[:] = 0x5A
    pinned[-1] = 0xA5
    pageable = np.full(nbytes, 0x3C, np.uint8)
    dev = cp.empty(nbytes, dtype=cp.uint8)
    dev_sync = cp.cuda.Device().synchronize

    def from_pinned():
        cp.cuda.runtime.memcpy(dev.data.ptr, pinned.ctypes.data, nbytes,
                               cp.cuda.runtime.memcpyHostToDevice)

    def from_pageable():
        dev.set(pageable)

    out = {}
    for name, copy, expect in (("pinned", from_pinned, (0x5A, 0xA5)),
                               ("pageable", from_pageable, (0x3C, 0x3C))):
        copy()
        dev_sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            copy()
            dev_sync()
            times.append(time.perf_counter() - t0)
        got = (int(dev[0].get()), int(dev[-1].get()))
        assert got == expect, f"h2d {name}: device holds {got}, expected {expect}"
        s = statistics.median(times)
        out[name] = {"bytes": nbytes, "seconds": s, "gb_per_s": nbytes / s / 1e9}
    return {"gb_per_s": out["pinned"]["gb_per_s"], "pinned": out["pinned"],
            "pageable": out["pageable"]}


# ---- profile: where one call's time goes ---------------------------------------------------------

class _Sink:
    """A no-op actor: the Ray round trip of a payload, without the engine."""

    def apply(self, payload) -> tuple:
        return 0, len(payload), 0, False

    def ping(self) -> int:
        return 0


def _timed(fn, reps: int, warm: int = 1) -> tuple[float, object]:
    """(median ms of ``reps`` calls fn(warm), ..., fn(warm + reps - 1), the last result), after
    ``warm`` untimed calls fn(0), ...: steady state (on this VM the first touch of fresh memory
    runs at ~0.7 GB/s, so first calls of large sizes can be 10x slower)."""
    times, out = [], None
    for i in range(warm + reps):
        t0 = time.perf_counter()
        out = fn(i)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), out


def profile_write(bus, wl: Workload, work: str, reps: int) -> dict:
    """Per-call costs of write_many at PROFILE_SIZES on a 1-shard runtime's client, a no-op actor
    and a local ShardEngine (same backend, fsync always) holding the same pages."""
    sink = ray.remote(_Sink).options(num_cpus=0).remote()
    ray.get(sink.ping.remote())
    path = tempfile.mkdtemp(prefix="profile-engine-", dir=work)
    engine = ShardEngine(path, backend="numpy", fsync="always")
    engine.create_pages(ids=wl.ids, size=PAGE_BYTES)
    logpath = tempfile.mkdtemp(prefix="profile-log-", dir=work)
    log = LogPartition(logpath, fsync="always")
    out = {}
    seq = 0
    try:
        for size in PROFILE_SIZES:
            pages, slots, data = wl.draw(size)
            ids, offs, data = wl.args(pages, slots, data)

            def runs_check(_):
                b = DeltaBatch.runs(ids, offs, data)
                b.check()
                return b

            def with_seq(b, seq, client=7):
                return DeltaBatch(b.page_ids, b.offsets, b.data_starts, b.payload, b.masked,
                                  b.mask_starts, b.masks, client, seq)

            row: dict = {}
            row["runs_check_ms"], batch = _timed(runs_check, reps)
            row["shards_of_ms"], owners = _timed(lambda _: shards_of(batch.page_ids, bus.n), reps)
            row["split_take_ms"], part = _timed(
                lambda _: batch.take(np.flatnonzero(owners == 0)), reps)
            row["encode_ms"], payload = _timed(
                lambda i: np.frombuffer(encode_deltas(with_seq(part, i + 1)), dtype=np.uint8),
                reps)
            row["client_total_ms"] = (row["runs_check_ms"] + row["shards_of_ms"]
                                      + row["split_take_ms"] + row["encode_ms"])
            row["ray_roundtrip_ms"], _ = _timed(lambda _: ray.get(sink.apply.remote(payload)),
                                                reps)
            row["decode_ms"], _ = _timed(lambda _: decode_deltas(payload), reps)
            row["log_append_fsync_ms"], _ = _timed(
                lambda _: log.append(payload, epoch=1, lsn_count=size), reps)
            # distinct delta ids (the engine drops a re-sent batch), encoded before the clock
            fresh = [np.frombuffer(encode_deltas(with_seq(part, seq + i + 1)), dtype=np.uint8)
                     for i in range(reps + 1)]
            seq += reps + 1
            row["engine_apply_ms"], _ = _timed(lambda i: engine.apply(fresh[i]), reps)
            row["engine_other_ms"] = (row["engine_apply_ms"] - row["decode_ms"]
                                      - row["log_append_fsync_ms"])
            row["sum_ms"] = (row["client_total_ms"] + row["ray_roundtrip_ms"]
                             + row["engine_apply_ms"])
            # the live shard actor's apply with a ready payload: Ray + the shard, no client work
            # (the same writes as bus_write_many below: the model takes them once)
            live = [np.frombuffer(encode_deltas(with_seq(part, seq + i + 1, 11)), dtype=np.uint8)
                    for i in range(reps + 1)]
            seq += reps + 1
            row["shard_call_ms"], _ = _timed(
                lambda i: ray.get(bus.shards[0].apply.remote(live[i])), reps)
            row["bus_write_many_ms"], _ = _timed(lambda _: bus.write_many(ids, offs, data), reps)
            wl.apply(pages, slots, data)
            row["payload_bytes"] = int(payload.size)
            out[str(size)] = row
        out["what_if"] = what_ifs(bus, wl, engine, sink, reps)
    finally:
        ray.kill(sink)
        engine.close()
        log.close()
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(logpath, ignore_errors=True)
    return out


def what_ifs(bus, wl: Workload, engine: ShardEngine, sink, reps: int) -> dict:
    """Bounds on what a change to the runtime could save (1-shard runtime):
    - write() floor: the round trip of a no-op actor call without arguments, and with the encoded
      1-delta payload as an ndarray (what Bus sends) and as bytes;
    - pipelined ingest: WHATIF_BATCHES batches of WHATIF_BATCH deltas sent straight to the shard
      actor, encoded by the client while up to limits.inflight_batches_max earlier ones are in
      flight (a write_many whose window spans calls), against the same with one in flight;
    - group commit: the local engine applying GROUP batches with one apply_many (one log write,
      one fsync) against GROUP apply calls."""
    assert bus.n == 1, "the pipelined what-if sends every batch to shard 0"
    out: dict = {}
    pages, slots, data = wl.draw(1)
    ids, offs, data = wl.args(pages, slots, data)
    one = np.frombuffer(encode_deltas(DeltaBatch.runs(ids, offs, data, client_id=5, seq=1)),
                        dtype=np.uint8)
    one_bytes = one.tobytes()
    n = 10 * reps
    out["roundtrip_noarg_ms"], _ = _timed(lambda _: ray.get(sink.ping.remote()), n)
    out["roundtrip_1delta_ndarray_ms"], _ = _timed(lambda _: ray.get(sink.apply.remote(one)), n)
    out["roundtrip_1delta_bytes_ms"], _ = _timed(lambda _: ray.get(sink.apply.remote(one_bytes)),
                                                 n)
    client = secrets.randbits(62) | 1
    seq = 0
    for window_max in (1, limits.inflight_batches_max):
        draws, window = [], []
        t0 = time.perf_counter()
        for _ in range(WHATIF_BATCHES):
            pages, slots, data = wl.draw(WHATIF_BATCH)
            seq += 1
            payload = np.frombuffer(encode_deltas(DeltaBatch.runs(
                *wl.args(pages, slots, data), client_id=client, seq=seq)), dtype=np.uint8)
            if len(window) >= window_max:
                ray.get(window.pop(0))
            # each names the batch it follows, as write_many's do: the shard's write threads
            # may take them out of order
            window.append(bus.shards[0].apply.remote(payload, after=seq - 1 if seq > 1 else None))
            draws.append((pages, slots, data))
        ray.get(window)
        seconds = time.perf_counter() - t0
        for d in draws:   # applied in the order sent
            wl.apply(*d)
        out[f"pipelined_window_{window_max}_deltas_per_s"] = WHATIF_BATCHES * WHATIF_BATCH / seconds
    batches = []
    for k in range(2 * GROUP + 1):
        pages, slots, data = wl.draw(WHATIF_BATCH)
        batches.append(np.frombuffer(encode_deltas(DeltaBatch.runs(
            *wl.args(pages, slots, data), client_id=client + 2, seq=k + 1)), dtype=np.uint8))
    engine.apply(batches[0])  # warm
    t0 = time.perf_counter()
    for b in batches[1:GROUP + 1]:
        engine.apply(b)
    t1 = time.perf_counter()
    engine.apply_many(batches[GROUP + 1:])
    t2 = time.perf_counter()
    out["engine_apply_each_ms_per_batch"] = 1e3 * (t1 - t0) / GROUP
    out["engine_apply_many_ms_per_batch"] = 1e3 * (t2 - t1) / GROUP
    out["batch"] = WHATIF_BATCH
    out["group"] = GROUP
    return out


def profile_commit(bus, wl: Workload, work: str, reps: int) -> dict:
    """The parts of one commit: the driver->coordinator and driver->shards round trips (no-op
    calls), DecisionLog appends (3 per commit, fsync each), engine.seal after a batch of
    COMMIT_BATCH / shards deltas on a local engine holding 1/shards of the pages; and in situ, the
    seal fan-out to the live shards and the commit of the already-sealed epoch after it."""
    out = {}
    out["coordinator_roundtrip_ms"], _ = _timed(lambda _: ray.get(bus.coordinator.info.remote()),
                                                reps * 3)
    out["shard_roundtrip_ms"], _ = _timed(lambda _: ray.get(bus.shards[0].ping.remote()), reps * 3)
    out["shard_fanout_roundtrip_ms"], _ = _timed(
        lambda _: ray.get([s.ping.remote() for s in bus.shards]), reps * 3)
    dpath = tempfile.mkdtemp(prefix="profile-dlog-", dir=work)
    dlog = DecisionLog(dpath)
    out["decision_log_append_ms"], _ = _timed(lambda i: dlog.attempt(i + 1), reps * 3)
    dlog.close()
    path = tempfile.mkdtemp(prefix="profile-seal-", dir=work)
    engine = ShardEngine(path, backend="numpy", fsync="always")
    mine = wl.ids[shards_of(wl.ids, bus.n) == 0]
    engine.create_pages(ids=mine, size=PAGE_BYTES)
    rng = np.random.default_rng(5)
    n = COMMIT_BATCH // bus.n
    seal_ms, write_ms = [], []
    try:
        for _ in range(reps * 3):
            b = DeltaBatch.runs(mine[rng.integers(0, mine.size, n)],
                                rng.integers(0, SLOTS, n) * DELTA_BYTES, wl.pool[:n])
            t0 = time.perf_counter()
            engine.apply(b)
            t1 = time.perf_counter()
            engine.seal()
            t2 = time.perf_counter()
            write_ms.append(1e3 * (t1 - t0))
            seal_ms.append(1e3 * (t2 - t1))
    finally:
        engine.close()
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(dpath, ignore_errors=True)
    # In situ: seal the next epoch on every shard from here (what the coordinator's PREPARE does),
    # then commit it (the coordinator finds the seals already there and reuses them).
    fan, rest = [], []
    for _ in range(reps):
        pages, slots, data = wl.draw(COMMIT_BATCH)
        bus.write_many(*wl.args(pages, slots, data))
        wl.apply(pages, slots, data)
        epoch = ray.get(bus.coordinator.info.remote())["last_committed"] + 1
        t0 = time.perf_counter()
        ray.get([s.seal.remote(epoch) for s in bus.shards])
        t1 = time.perf_counter()
        got = bus.commit()
        t2 = time.perf_counter()
        assert got == epoch, f"committed epoch {got}, sealed {epoch} ahead"
        fan.append(1e3 * (t1 - t0))
        rest.append(1e3 * (t2 - t1))
    out["seal_fanout_in_situ_ms"] = statistics.median(fan)
    out["commit_of_presealed_ms"] = statistics.median(rest)
    out["engine_seal_ms"] = statistics.median(seal_ms)
    out["engine_apply_small_batch_ms"] = statistics.median(write_ms)
    out["estimate_ms"] = (out["coordinator_roundtrip_ms"] + 3 * out["decision_log_append_ms"]
                          + out["shard_fanout_roundtrip_ms"] + out["engine_seal_ms"])
    return out


# ---- one configuration ---------------------------------------------------------------------------

def _phases(kind: str, bus, wl: Workload, q: int, work: str, redis: bool, ns: str,
            lat_ms: list, epochs: list) -> dict:
    """name -> the timed phase of one round: the baselines and this configuration's phases
    (latencies go to ``lat_ms``, committed epochs to ``epochs``)."""
    phases: dict = {"raw_disk": lambda: bench_log.bench_raw(
        work, (GPU_RAW_MIB if kind == "gpu" else RAW_MIB)[q], False, PHASE_SECONDS_MAX[q])}
    if redis:
        phases["redis"] = lambda: bench_log.bench_redis(work, REDIS_OPS[q], PHASE_SECONDS_MAX[q])
    if kind == "write":
        per_round = -(-NAIVE_WRITES[q] // ROUNDS[q])
        phases["naive"] = lambda: phase_naive(bus, wl, per_round, lat_ms)
        for size in BATCHES:
            phases[f"write_many_{size}"] = (
                lambda size=size: phase_write_many(bus, wl, size, WM_DELTAS[q]))
        writers = [runtime.connect(namespace=ns) for _ in range(WRITERS)]
        phases[f"writers_{WRITERS}x{min(BATCHES)}"] = lambda: phase_writers(
            writers, wl, min(BATCHES), WM_DELTAS[q] // min(BATCHES) // WRITERS)
    elif kind == "commit":
        per_round = -(-COMMITS[q] // ROUNDS[q])
        phases["commit"] = lambda: phase_commit(bus, wl, per_round, lat_ms, epochs)
    elif kind == "gpu":
        writers = [runtime.connect(namespace=ns) for _ in range(WRITERS)]
        phases["gpu_write_many"] = lambda: phase_write_many(bus, wl, GPU_BATCH,
                                                            GPU_CALLS[q] * GPU_BATCH)
        phases["gpu_write_many_stream"] = lambda: phase_write_many(
            bus, wl, GPU_STREAM_CALL, GPU_STREAM_CALL)
        phases["gpu_writers"] = lambda: phase_writers(writers, wl, GPU_STREAM_CALL, 1)
        phases["h2d"] = lambda: h2d_bandwidth(H2D_BYTES)
    return phases


def _rounds(tag: str, phases: dict, rounds: int) -> dict:
    """name -> samples of ``rounds`` interleaved rounds (the order rotates each round; os.sync()
    before every phase), each round printed."""
    samples: dict = {name: [] for name in phases}
    order = list(phases.items())
    for rnd in range(rounds):
        for name, phase in order[rnd % len(order):] + order[:rnd % len(order)]:
            os.sync()
            samples[name].append(phase())
        print(f"  {tag} round {rnd + 1}/{rounds}: " + ", ".join(
            f"{name} {_brief(name, s[-1])}" for name, s in samples.items()), flush=True)
    return samples


def run_config(kind: str, shards: int, backend: str, q: int, work: str, redis: bool,
               baselines: dict) -> dict:
    """Start a fresh runtime, run ROUNDS interleaved rounds of this configuration's phases and
    the baselines, verify, profile, stop."""
    tag = f"{kind}-{shards}"
    ns = f"mmsb-ingest-{os.getpid()}-{tag}"
    data_dir = tempfile.mkdtemp(prefix=f"runtime-{tag}-", dir=work)
    pages = PAGES[q]
    t_start = time.perf_counter()
    # address="local": a new instance of our own even where another Ray cluster runs on this host
    # (a plain ray.init(), and runtime.start, would join that one)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, shards), namespace=ns,
             include_dashboard=False, log_to_driver=False)
    res: dict = {"kind": kind, "shards": shards, "backend": backend, "namespace": ns}
    try:
        bus = runtime.start(shards=shards, data_dir=data_dir,
                            config={"backend": backend, "fsync": "always"}, namespace=ns)
        ids = bus.create_pages(pages, PAGE_BYTES)
        res["start_seconds"] = time.perf_counter() - t_start
        res["shard_backends"] = sorted({s["backend"] for s in bus.stats()["shards"]})
        big = GPU_STREAM_CALL if kind == "gpu" else max(BATCHES)
        wl = Workload(ids, 2 * big, seed=shards * 7 + len(kind))
        # warm-up (numba kernels load in each new shard process, the threaded scatter starts
        # from limits.cpu_parallel_runs_min runs): not timed, but in the model
        for size in sorted({1_000, 10_000, big}):
            phase_write_many(bus, wl, size, 2 * size)
        phase_naive(bus, wl, 5, [])

        lat_ms: list = []
        epochs: list = []
        phases = _phases(kind, bus, wl, q, work, redis, ns, lat_ms, epochs)
        samples = _rounds(tag, phases, ROUNDS[q])
        for name in ("raw_disk", "redis"):
            baselines.setdefault(name, []).extend(samples.pop(name, []))
        for name, s in samples.items():
            key = "gb_per_s" if name == "h2d" else (
                "p50_ms" if name == "commit" else "deltas_per_s")
            res[name] = _median_by(s, key)
        if kind == "write":
            res["naive"].update(p50_ms=statistics.median(lat_ms), p99_ms=_pct(lat_ms, 99),
                                writes=len(lat_ms))
        if kind == "commit":
            res["commit"].update(p50_ms=statistics.median(lat_ms), p99_ms=_pct(lat_ms, 99),
                                 commits=len(lat_ms), epochs_strictly_increasing=bool(
                                     all(b > a for a, b in zip(epochs, epochs[1:]))))

        t0 = time.perf_counter()
        if kind == "write" and shards == 1:
            res["profile"] = profile_write(bus, wl, work, PROFILE_REPS[q])
        elif kind == "commit":
            res["profile"] = profile_commit(bus, wl, work, PROFILE_REPS[q])
        res["profile_seconds"] = time.perf_counter() - t0
        # correctness of everything written above (timed phases, warm-up, profile)
        t0 = time.perf_counter()
        checks = [wl.verify(bus, VERIFY_PAGES[q])]
        if kind == "commit":
            # nothing was written after the last commit: the as-of read equals the live state (it
            # replays every shard to that epoch and checks the sealed state hash on the way)
            checks.append(wl.verify(bus, VERIFY_PAGES[q] // 4, epoch=bus.committed_epochs()[-1]))
            checks[-1]["epochs_strictly_increasing"] = res["commit"]["epochs_strictly_increasing"]
            checks[-1]["ok"] &= checks[-1]["epochs_strictly_increasing"]
        res["verify"] = checks
        res["verify_seconds"] = time.perf_counter() - t0
        for c in checks:
            status = "ok" if c["ok"] else "MISMATCH"
            print(f"  {tag} verify{'' if c['epoch'] is None else ' @epoch ' + str(c['epoch'])}: "
                  f"{c['pages_read']} pages read ({c['pages_written']} written), "
                  f"{c['mismatched']} mismatched: {status}", flush=True)

    finally:
        t0 = time.perf_counter()
        try:
            runtime.stop(namespace=ns)
        finally:
            ray.shutdown()
            shutil.rmtree(data_dir, ignore_errors=True)
        res["stop_seconds"] = time.perf_counter() - t0
    res["seconds"] = time.perf_counter() - t_start
    return res


def _brief(name: str, r: dict) -> str:
    if name == "raw_disk":
        return f"{r['mb_per_s']:.0f} MB/s"
    if name == "h2d":
        return f"{r['gb_per_s']:.1f} GB/s"
    if name == "commit":
        return f"p50 {r['p50_ms']:.1f} ms"
    if name == "naive":
        return f"p50 {r['p50_ms']:.2f} ms"
    return f"{r['deltas_per_s'] / 1e6:.2f}M/s"


# ---- report --------------------------------------------------------------------------------------

def frame_bytes_per_delta(n: int = 10_000) -> float:
    """Log bytes per 64-byte delta: an encoded batch of ``n`` runs plus the frame header (40 B, as
    bench_log counts it)."""
    batch = DeltaBatch.runs(np.arange(n, dtype=np.uint64), np.zeros(n, np.int64),
                            np.ones((n, DELTA_BYTES), np.uint8), client_id=1, seq=1)
    return (encode_deltas(batch).size + 40) / n


def build_rows(configs: list[dict], base: dict, frame_bpd: float) -> list[dict]:
    """The table: measure, value, baseline, ratio, target verdict (None: no target)."""
    rows = []
    raw = base.get("raw_disk")
    redis = base.get("redis")
    redis_rate = redis["deltas_per_s"] if redis else None

    def row(measure, value, unit, baseline=None, bunit="", ratio=None, target=None, ok=None):
        rows.append({"measure": measure, "value": value, "unit": unit, "baseline": baseline,
                     "baseline_unit": bunit, "ratio": ratio, "target": target,
                     "verdict": None if ok is None else ("PASS" if ok else "MISS")})

    def vs_redis(label, r):
        ratio = r["deltas_per_s"] / redis_rate if redis_rate else None
        row(f"{label} [{r['mb_per_s']:.0f} MB/s]", r["deltas_per_s"], "deltas/s", redis_rate,
            "deltas/s", ratio, f">= {TARGET_WM_VS_REDIS}x redis",
            None if ratio is None else ratio >= TARGET_WM_VS_REDIS)

    if raw:
        row("raw disk write+fsync (1 MiB writes)", raw["mb_per_s"], "MB/s")
    if redis:
        row("redis SETRANGE -P64 always-fsync", redis_rate, "deltas/s")
    for c in configs:
        n = c["shards"]
        if c["kind"] == "write":
            nv = c["naive"]
            row(f"write() naive, {n} shard(s)", nv["deltas_per_s"], "deltas/s", redis_rate,
                "deltas/s", nv["deltas_per_s"] / redis_rate if redis_rate else None)
            row(f"write() p50 latency, {n} shard(s)", nv["p50_ms"], "ms", TARGET_WRITE_P50_MS, "ms",
                nv["p50_ms"] / TARGET_WRITE_P50_MS, f"<= {TARGET_WRITE_P50_MS} ms",
                nv["p50_ms"] <= TARGET_WRITE_P50_MS)
            row(f"write() p99 latency, {n} shard(s)", nv["p99_ms"], "ms")
            for size in BATCHES:
                vs_redis(f"write_many {size // 1000}k, {n} shard(s)", c[f"write_many_{size}"])
            vs_redis(f"write_many {min(BATCHES) // 1000}k, {WRITERS} writers at once, "
                     f"{n} shard(s)", c[f"writers_{WRITERS}x{min(BATCHES)}"])
        elif c["kind"] == "commit":
            cm = c["commit"]
            row(f"commit p50, {n} shards", cm["p50_ms"], "ms", TARGET_COMMIT_P50_MS, "ms",
                cm["p50_ms"] / TARGET_COMMIT_P50_MS, f"<= {TARGET_COMMIT_P50_MS} ms",
                cm["p50_ms"] <= TARGET_COMMIT_P50_MS)
            row(f"commit p99, {n} shards", cm["p99_ms"], "ms")
        elif c["kind"] == "gpu":
            disk = c["gpu_raw_disk"]["mb_per_s"] / 1e3
            for key, label in (("gpu_write_many", f"{GPU_BATCH >> 20} Mi-delta calls"),
                               ("gpu_write_many_stream",
                                f"{GPU_STREAM_CALL >> 20} Mi-delta calls, "
                                f"{limits.write_batch_deltas >> 20} Mi batches in flight"),
                               ("gpu_writers", f"{WRITERS} writers at once, "
                                f"{GPU_STREAM_CALL >> 20} Mi-delta calls")):
                g = c[key]
                # the disk carries the log: frame bytes, not payload, are what it must keep up with
                frame = g["gb_per_s"] * frame_bpd / DELTA_BYTES
                row(f"GPU shard write_many, {label}: log [payload {g['gb_per_s']:.2f} GB/s]",
                    frame, "GB/s", disk, "GB/s raw disk", frame / disk,
                    f">= {TARGET_GPU_GB_S} GB/s payload or log >= {TARGET_GPU_OF_DISK:.0%} of disk",
                    g["gb_per_s"] >= TARGET_GPU_GB_S or frame / disk >= TARGET_GPU_OF_DISK)
            row("host->device pinned (CuPy, 256 MiB)", c["h2d"]["gb_per_s"], "GB/s")
            row("host->device pageable (CuPy, 256 MiB)", c["h2d"]["pageable"]["gb_per_s"], "GB/s")
            row("raw disk write+fsync (GPU run)", disk * 1e3, "MB/s")
    return rows


def _fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "deltas/s":
        return f"{v / 1e6:.3f} M/s" if v >= 1e5 else f"{v / 1e3:.2f} k/s"
    if unit == "ms":
        return f"{v:.2f} ms"
    if unit.startswith("GB/s"):
        return f"{v:.2f} GB/s"
    if unit == "MB/s":
        return f"{v:.0f} MB/s"
    return f"{v:.3g} {unit}"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'measure':50} {'value':>13} {'baseline':>13} {'ratio':>7}  target")
    for r in rows:
        ratio = ("-" if r["ratio"] is None else
                 f"{r['ratio']:.2f}x" if r["ratio"] >= 0.01 else f"{r['ratio']:.4f}x")
        target = "" if r["target"] is None else f"{r['target']}: {r['verdict'] or 'n/a'}"
        print(f"{r['measure']:50} {_fmt(r['value'], r['unit']):>13} "
              f"{_fmt(r['baseline'], r['baseline_unit']):>13} {ratio:>7}  {target}")


def print_profile(configs: list[dict]) -> None:
    for c in configs:
        p = c.get("profile")
        if not p:
            continue
        if c["kind"] == "write":
            keys = ("runs_check_ms", "shards_of_ms", "split_take_ms", "encode_ms",
                    "ray_roundtrip_ms", "decode_ms", "log_append_fsync_ms", "engine_other_ms",
                    "engine_apply_ms", "sum_ms", "shard_call_ms", "bus_write_many_ms")
            print(f"\nprofile of one write_many call, {c['shards']} shard (ms, medians):")
            print(f"{'deltas':>8} " + " ".join(f"{k[:-3]:>10.10}" for k in keys))
            for size, r in p.items():
                if size != "what_if":
                    print(f"{size:>8} " + " ".join(f"{r[k]:10.3f}" for k in keys))
            w = p["what_if"]
            b = w["batch"]
            pipe = w[f"pipelined_window_{limits.inflight_batches_max}_deltas_per_s"]
            pipe1 = w["pipelined_window_1_deltas_per_s"]
            print(f"what-ifs: round trip of a no-op call {w['roundtrip_noarg_ms']:.2f} ms, with "
                  f"the 1-delta payload as ndarray {w['roundtrip_1delta_ndarray_ms']:.2f} ms / as "
                  f"bytes {w['roundtrip_1delta_bytes_ms']:.2f} ms; {b // 1000}k batches straight "
                  f"to the shard, 1 in flight {pipe1 / 1e6:.2f} M/s, "
                  f"{limits.inflight_batches_max} in flight {pipe / 1e6:.2f} M/s; engine: apply "
                  f"{w['engine_apply_each_ms_per_batch']:.2f} ms per {b // 1000}k batch, "
                  f"apply_many of {w['group']} {w['engine_apply_many_ms_per_batch']:.2f} ms "
                  "per batch")
        else:
            print(f"\nprofile of one commit, {c['shards']} shards (ms, medians): " + ", ".join(
                f"{k[:-3]} {v:.2f}" for k, v in p.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under 90 s")
    ap.add_argument("--out", default="bench-results/ingest.json")
    ap.add_argument("--shards", default="1,2", help="shard counts of the write configurations")
    ap.add_argument("--dir", default=None, help="parent of the temp dir (default: the system's)")
    args = ap.parse_args()
    q = 0 if args.quick else 1
    shard_counts = [int(s) for s in args.shards.split(",") if s.strip()]
    redis_skip = bench_log.ensure_redis()
    if redis_skip is not None:
        print(f"skipping the redis rows: {redis_skip}")
    gpu = gpu_available()
    cpu_backend = "numpy" if gpu else "auto"
    work = tempfile.mkdtemp(prefix="mmsb-bench-ingest-", dir=args.dir)
    started = time.perf_counter()
    configs, raw_samples = [], {}
    try:
        info = bench_log.machine_info(work)
        info.update(ray=ray.__version__, gpu=gpu, hostname=platform.node())
        if gpu:
            import cupy as cp
            info.update(cupy=cp.__version__,
                        gpu_name=cp.cuda.runtime.getDeviceProperties(0)["name"].decode())
        print(f"benchmark dir: {info['bench_dir']} ({info['filesystem']} on {info['device']}); "
              f"{PAGES[q]:,} pages of {PAGE_BYTES} B; gpu: {gpu}", flush=True)
        plan = [("write", n, cpu_backend) for n in shard_counts] + [("commit", 4, cpu_backend)]
        if gpu:
            plan.append(("gpu", 1, "cupy"))
        for kind, n, backend in plan:
            print(f"config {kind}, {n} shard(s), backend {backend}:", flush=True)
            gpu_base: dict = {}
            c = run_config(kind, n, backend, q, work, redis_skip is None,
                           gpu_base if kind == "gpu" else raw_samples)
            if kind == "gpu":  # its raw disk row writes GPU_RAW_MIB: a baseline of its own
                c["gpu_raw_disk"] = _median_by(gpu_base["raw_disk"], "mb_per_s")
                raw_samples.setdefault("redis", []).extend(gpu_base.get("redis", []))
            configs.append(c)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = {"raw_disk": _median_by(raw_samples["raw_disk"], "mb_per_s"),
            "redis": (_median_by(raw_samples["redis"], "deltas_per_s")
                      if raw_samples.get("redis") else None)}
    frame_bpd = frame_bytes_per_delta()
    rows = build_rows(configs, base, frame_bpd)
    print_table(rows)
    print_profile(configs)
    verified = all(c2["ok"] for c in configs for c2 in c["verify"])
    print(f"\nmedians of {ROUNDS[q]} interleaved rounds per configuration (baselines: of all "
          f"{len(raw_samples['raw_disk'])} rounds); correctness: "
          f"{'all sampled pages match the model' if verified else 'MISMATCH (see verify)'}")
    result = {"benchmark": "ingest", "quick": args.quick, "rounds": ROUNDS[q], "machine": info,
              "workload": {"pages": PAGES[q], "page_bytes": PAGE_BYTES,
                           "delta_bytes": DELTA_BYTES, "batches": list(BATCHES),
                           "naive_writes": NAIVE_WRITES[q], "commits": COMMITS[q],
                           "commit_batch": COMMIT_BATCH, "gpu_batch": GPU_BATCH,
                           "fsync": "always", "inflight_batches_max": limits.inflight_batches_max,
                           "log_frame_bytes_per_delta": frame_bpd},
              "baselines": base, "configs": configs, "rows": rows, "redis_skipped": redis_skip,
              "verified": verified, "seconds": time.perf_counter() - started}
    write_json(args.out, result, result["seconds"])
    return 0 if verified else 1


if __name__ == "__main__":
    sys.exit(main())
