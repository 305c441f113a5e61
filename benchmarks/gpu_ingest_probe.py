"""Where one CuPy shard's ingest time goes (engine only, no Ray), beside the raw disk.

    python benchmarks/gpu_ingest_probe.py [--dir PARENT] [--batches 6] [--out probe.json]

A ShardEngine (backend "cupy", fsync "always") holds 65,536 pages of 4 KiB; batches of 1 Mi
64-byte runs at random 64-byte-aligned offsets (random non-zero bytes) are encoded first, then
applied one after the other: with the log write overlapped with the device apply (the default for
large batches) and without (limits.log_overlap_bytes_min raised past the batch), interleaved. The
phases of one apply are timed apart: Arrow decode, validation (page table translation), the
log's frame preparation (CRC32C), the log append (write + fsync), the device apply (upload + kernels,
synchronized). Raw disk: sequential 1 MiB writes + one fsync of the same volume, in the same run.
Reported: payload GB/s and log GB/s (what reaches the disk) against the raw disk's GB/s. A
diagnostic for benchmarks/bench_ingest.py's GPU row, which measures the same through Ray.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_log                                              # noqa: E402
from _common import write_json                                # noqa: E402
from mmsb_dist import limits                                  # noqa: E402
from mmsb_dist import log as logmod                           # noqa: E402
from mmsb_dist.delta import DeltaBatch                        # noqa: E402
from mmsb_dist.engine import ShardEngine                      # noqa: E402
from mmsb_dist.formats import decode_deltas, encode_deltas    # noqa: E402

PAGES, PAGE_BYTES, DELTA = 65_536, 4096, 64
N = 1 << 20


def _batches(ids, k: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(k):
        pages = ids[rng.integers(0, ids.size, N)]
        offs = rng.integers(0, PAGE_BYTES // DELTA, N) * DELTA
        data = rng.integers(1, 256, (N, DELTA), dtype=np.uint8)
        out.append(np.frombuffer(encode_deltas(DeltaBatch.runs(pages, offs, data, client_id=3,
                                                               seq=seed * 1000 + i + 1)),
                                 dtype=np.uint8))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--out", default="bench-results/gpu-ingest-probe.json")
    ap.add_argument("--backend", default="cupy", help="cupy (the point), or numpy to try it")
    args = ap.parse_args()
    if args.backend == "cupy":
        import cupy as cp
        sync = cp.cuda.get_current_stream().synchronize
    else:
        def sync():
            return None

    work = tempfile.mkdtemp(prefix="mmsb-gpu-probe-", dir=args.dir)
    try:
        engine = ShardEngine(os.path.join(work, "shard"), backend=args.backend, fsync="always")
        ids = engine.create_pages(PAGES, PAGE_BYTES)
        warm = _batches(ids, 1, 1)
        engine.apply(warm[0])
        batches = _batches(ids, 2 * args.batches, 2)
        log_bytes = [b.nbytes + logmod.HEADER_BYTES for b in batches]
        times = {"overlap": [], "sequential": []}
        for i, b in enumerate(batches):
            mode = "overlap" if i % 2 == 0 else "sequential"
            limits.log_overlap_bytes_min = 0 if mode == "overlap" else 1 << 62
            t0 = time.perf_counter()
            engine.apply(b)
            sync()
            times[mode].append(time.perf_counter() - t0)
        # phases, on fresh batches (duplicates are skipped) through the engine's parts
        phases: dict = {k: [] for k in ("decode", "validate", "prepare_crc", "log_append",
                                        "device_apply")}
        for b in _batches(ids, 3, 3):
            t = time.perf_counter(); batch = decode_deltas(b)
            phases["decode"].append(time.perf_counter() - t)
            t = time.perf_counter(); slots, dest = engine.arena.validate(batch)
            phases["validate"].append(time.perf_counter() - t)
            t = time.perf_counter(); logmod._prepare(b, 1, len(batch))
            phases["prepare_crc"].append(time.perf_counter() - t)
            t = time.perf_counter(); engine.log.append(b, epoch=1, lsn_count=len(batch))
            phases["log_append"].append(time.perf_counter() - t)
            t = time.perf_counter(); engine.arena.apply_validated(batch, slots, dest)
            sync()
            phases["device_apply"].append(time.perf_counter() - t)
        engine.close()
        raw = bench_log.bench_raw(work, 1024, False, 30.0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    disk = raw["mb_per_s"] / 1e3
    lb = statistics.median(log_bytes)
    res = {"raw_disk_gb_per_s": disk, "batch_deltas": N, "log_bytes_per_batch": lb,
           "payload_bytes_per_batch": N * DELTA,
           "phases_ms": {k: 1e3 * statistics.median(v) for k, v in phases.items()}}
    print(f"raw disk write+fsync: {disk:.3f} GB/s")
    for mode, ts in times.items():
        s = statistics.median(ts)
        res[mode] = {"ms": 1e3 * s, "payload_gb_per_s": N * DELTA / s / 1e9,
                     "log_gb_per_s": lb / s / 1e9, "log_of_disk": lb / s / 1e9 / disk}
        print(f"{mode:>10}: {1e3 * s:7.1f} ms per 1 Mi batch, payload "
              f"{N * DELTA / s / 1e9:.3f} GB/s, log {lb / s / 1e9:.3f} GB/s = "
              f"{lb / s / 1e9 / disk:.0%} of raw disk")
    print("phases (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in res["phases_ms"].items()))
    write_json(args.out, res, 0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
