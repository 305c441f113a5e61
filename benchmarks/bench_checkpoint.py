"""Checkpoint benchmark: write and restore bandwidth beside the raw disk, measured in the same run.

    python benchmarks/bench_checkpoint.py [--quick] [--out bench-results/checkpoint.json] [--dir DIR]

On one directory (one disk), repeated and interleaved so that drift in the disk hits both sides:
  raw write    write the bytes of the snapshot to a file in 8 MiB writes, then fsync;
  raw read     read that file back into a preallocated, already-touched buffer in 8 MiB reads
               (the target's baseline); and, stricter, memory-map it and touch one byte of every
               4 KiB page (the kernel brings whole pages in: the disk with no copy at all);
  checkpoint   write_checkpoint of an arena of 4 KiB pages of random non-zero bytes (1 GiB; 256 MiB
               with --quick): Arrow IPC file, CRC32C as it streams, temp + fsync + rename, manifest;
  restore      read_checkpoint with full verification (sizes, CRC32C, recomputed page hashes), and
               with CRC32C but no hash recomputation: both read every byte. Without verification a
               local file is only mapped (its bytes are read when first used), so that row is
               listed for what it is, not held to the target. "restore into an arena" adds
               PageArena.from_snapshot (a copy into fresh arena memory) to the full restore;
  hash         the page-hash recomputation alone, on the snapshot in memory (what verify adds).
Before every read the file's pages are dropped from the page cache (fsync, then
posix_fadvise(DONTNEED)); where the kernel keeps them anyway the read figures are cache figures.
Each repetition runs both sides (alternating which goes first) after an os.sync(). Figures are
medians over the repetitions; fractions are median / median of the raw figure; the medians of
per-repetition ratios are reported beside them. Targets: checkpoint write >= 70% of raw write,
restore with full verification >= 70% of raw read (reported against both raw reads).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from _common import evict, raw_read, write_json  # noqa: E402  (benchmarks/ is on sys.path)
from mmsb_dist import PageArena
from mmsb_dist import checkpoint as ck

CHUNK = 8 << 20
PAGE = 4096
TARGET = 0.70


def _settle() -> None:
    """Flush whatever the previous step left for the disk, so it is not billed to the next one."""
    os.sync()


def _raw_write(path: str, data: np.ndarray) -> float:
    view = memoryview(data)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(0, data.size, CHUNK):
            os.write(fd, view[i:i + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0





def _raw_mmap(path: str) -> float:
    t0 = time.perf_counter()
    with pa.memory_map(path, "r") as f:
        view = np.frombuffer(f.read_buffer(), np.uint8)
        int(view[::PAGE].sum())  # one byte per page: every page comes in from the disk
    del view
    return time.perf_counter() - t0


def _arena(nbytes: int, seed: int = 0) -> PageArena:
    n = nbytes // PAGE
    arena = PageArena("numpy", capacity_bytes=n * PAGE)
    arena.create_pages(n, PAGE)
    # Fresh pages are laid out back to back from offset 0; fill them all with non-zero bytes.
    arena.buffer[: n * PAGE] = np.random.default_rng(seed).integers(1, 256, n * PAGE, np.uint8)
    return arena


def run(quick: bool, workdir: str) -> dict:
    nbytes = (256 if quick else 1024) << 20
    reps = 5
    arena = _arena(nbytes)
    arena.snapshot()  # warm-up: compiles the kernels, touches fresh memory once
    t0 = time.perf_counter()
    snap = arena.snapshot()
    snapshot_s = time.perf_counter() - t0
    state_hash = arena.state_hash()
    del arena
    raw_path = os.path.join(workdir, "raw.bin")
    readback = np.ones(snap.data.size, np.uint8)  # touched, so the raw read pays no page faults
    root = os.path.join(workdir, "ckpt")
    times: dict[str, list[float]] = {k: [] for k in (
        "raw_write", "raw_read_copy", "raw_read_mmap", "ckpt_write", "restore_full",
        "restore_crc", "restore_none", "restore_arena", "hash_only")}
    # Warm-up: first touches of page-cache memory and numba compilation are not the disk.
    _raw_write(raw_path, snap.data)
    info = ck.write_checkpoint(snap, root, shard=0, epoch=0, lsn=1, state_hash=state_hash)
    ck.read_checkpoint(info)
    ck.delete_checkpoint(info)
    def raw_side():
        _settle()
        times["raw_write"].append(_raw_write(raw_path, snap.data))
        evict(raw_path)
        _settle()
        times["raw_read_copy"].append(raw_read(raw_path, readback, CHUNK))
        evict(raw_path)
        _settle()
        times["raw_read_mmap"].append(_raw_mmap(raw_path))
        os.unlink(raw_path)

    def checkpoint_side(rep):
        _settle()
        t0 = time.perf_counter()
        info = ck.write_checkpoint(snap, root, shard=0, epoch=rep, lsn=rep, state_hash=state_hash)
        times["ckpt_write"].append(time.perf_counter() - t0)
        for key, kwargs in (("restore_full", {}), ("restore_crc", {"verify_hashes": False}),
                            ("restore_none", {"verify": False})):
            evict(info.path)
            _settle()
            t0 = time.perf_counter()
            back, _ = ck.read_checkpoint(info, **kwargs)
            times[key].append(time.perf_counter() - t0)
            assert back.state_hash() == state_hash
            del back
        evict(info.path)
        t0 = time.perf_counter()
        restored = PageArena.from_snapshot(ck.read_checkpoint(info)[0], "numpy")
        times["restore_arena"].append(time.perf_counter() - t0)
        assert restored.state_hash() == state_hash
        del restored
        t0 = time.perf_counter()
        ck._page_hashes(snap.data, snap.starts, snap.sizes)
        times["hash_only"].append(time.perf_counter() - t0)
        ck.delete_checkpoint(info)
        return info.stored_bytes

    # Alternate which side goes first, so that drift in the disk does not favour either.
    for rep in range(1, reps + 1):
        if rep % 2:
            raw_side()
            stored = checkpoint_side(rep)
        else:
            stored = checkpoint_side(rep)
            raw_side()

    # Compression, once each: random bytes do not compress, so this shows the codec's cost.
    codecs = {}
    for codec in ("lz4", "zstd"):
        t0 = time.perf_counter()
        info = ck.write_checkpoint(snap, root, shard=0, epoch=100, lsn=1, state_hash=state_hash,
                                   compression=codec)
        w = time.perf_counter() - t0
        evict(info.path)
        t0 = time.perf_counter()
        ck.read_checkpoint(info)
        r = time.perf_counter() - t0
        codecs[codec] = {"write_GBps": nbytes / w / 1e9, "restore_full_GBps": nbytes / r / 1e9,
                         "stored_bytes": info.stored_bytes}
        ck.delete_checkpoint(info)

    med = {k: statistics.median(v) for k, v in times.items() if v}
    gbps = {k: nbytes / v / 1e9 for k, v in med.items()}
    write_rows = [("raw sequential write + fsync", "raw_write"),
                  ("checkpoint write (CRC32C, fsync, rename, manifest)", "ckpt_write")]
    read_rows = [("raw read: read() into a touched buffer", "raw_read_copy"),
                 ("raw read: mmap, touch every page", "raw_read_mmap"),
                 ("restore, full verify (CRC32C + page hashes)", "restore_full"),
                 ("restore, CRC32C only", "restore_crc"),
                 ("restore, no verification (lazy: maps only)", "restore_none"),
                 ("restore into an arena (full verify + copy)", "restore_arena"),
                 ("page-hash recompute alone (in memory)", "hash_only")]
    row = lambda label, key, **fr: {"what": label, "key": key, "seconds": med[key],
                                    "GBps": gbps[key], "all_seconds": times[key], **fr}
    table = [row(label, key, of_raw_write=med["raw_write"] / med[key]) for label, key in write_rows]
    table += [row(label, key, of_raw_read=med["raw_read_copy"] / med[key],
                  of_raw_mmap=med["raw_read_mmap"] / med[key]) for label, key in read_rows]
    per_rep = lambda base, key: statistics.median(b / c for b, c in zip(times[base], times[key]))
    fractions = {
        "write": med["raw_write"] / med["ckpt_write"],
        "restore_vs_read": med["raw_read_copy"] / med["restore_full"],
        "restore_vs_mmap": med["raw_read_mmap"] / med["restore_full"],
        "per_repetition_median": {"write": per_rep("raw_write", "ckpt_write"),
                                  "restore_vs_read": per_rep("raw_read_copy", "restore_full"),
                                  "restore_vs_mmap": per_rep("raw_read_mmap", "restore_full")},
    }
    return {
        "benchmark": "checkpoint", "quick": quick, "bytes": nbytes, "page_bytes": PAGE,
        "stored_bytes": stored, "repetitions": reps, "snapshot_copy_seconds": snapshot_s,
        "python": sys.version.split()[0], "platform": platform.platform(),
        "cpus": os.cpu_count(), "workdir": workdir, "rows": table, "compression": codecs,
        "targets": {"target_fraction": TARGET, **fractions,
                    "write_ok": fractions["write"] >= TARGET,
                    "restore_ok": fractions["restore_vs_read"] >= TARGET,
                    "restore_ok_vs_mmap": fractions["restore_vs_mmap"] >= TARGET},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB (< 60 s)")
    p.add_argument("--out", default="bench-results/checkpoint.json")
    p.add_argument("--dir", default=".", help="where to write (the disk under test)")
    args = p.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix=".bench-checkpoint-", dir=args.dir)
    try:
        res = run(args.quick, os.path.abspath(workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"checkpoint benchmark: {res['bytes'] >> 20} MiB of {PAGE} B pages "
          f"({res['stored_bytes'] >> 20} MiB on disk), median of {res['repetitions']}, "
          f"snapshot copy {res['snapshot_copy_seconds']:.2f} s")
    pct = lambda r, k: f"{r[k]:8.0%}" if k in r else f"{'':8}"
    print(f"{'':52} {'s':>7} {'GB/s':>7} {'of raw':>8} {'of raw':>8} {'of raw':>8}")
    print(f"{'':52} {'':>7} {'':>7} {'write':>8} {'read()':>8} {'mmap':>8}")
    for r in res["rows"]:
        print(f"{r['what']:52} {r['seconds']:7.3f} {r['GBps']:7.3f} {pct(r, 'of_raw_write')} "
              f"{pct(r, 'of_raw_read')} {pct(r, 'of_raw_mmap')}")
    for codec, c in res["compression"].items():
        print(f"{codec} (random bytes, once): write {c['write_GBps']:.3f} GB/s, "
              f"restore {c['restore_full_GBps']:.3f} GB/s, {c['stored_bytes'] >> 20} MiB stored")
    t = res["targets"]
    ok = lambda f: "ok" if f >= t["target_fraction"] else "MISSED"
    rep = t["per_repetition_median"]
    print(f"target >= {t['target_fraction']:.0%}: checkpoint write {t['write']:.0%} of raw write "
          f"({ok(t['write'])}); restore with full verify {t['restore_vs_read']:.0%} of raw read() "
          f"({ok(t['restore_vs_read'])}), {t['restore_vs_mmap']:.0%} of the stricter mmap "
          f"baseline ({ok(t['restore_vs_mmap'])})")
    print(f"medians of per-repetition ratios: write {rep['write']:.0%}, restore "
          f"{rep['restore_vs_read']:.0%} of read(), {rep['restore_vs_mmap']:.0%} of mmap")
    print("read figures: pages were dropped with posix_fadvise(DONTNEED) after fsync; a kernel or "
          "hypervisor cache may still serve some of them")
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
