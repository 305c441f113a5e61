"""Log append throughput against its baselines, all measured in one run on one disk.

    python benchmarks/bench_log.py [--quick] [--out bench-results/log.json] [--dir PATH]

Rows:
  raw disk, fsync at end     write N MiB in 1 MiB chunks, one fsync at the end (the disk's ceiling)
  raw disk, fsync per MiB    the same with an fdatasync after every chunk
  log append, 1 / 4 threads  LogPartition(fsync="always") appending real encoded Arrow delta batches
                             (10,000 runs of 64 random non-zero bytes each); 4 threads group-commit
  redis always-fsync         redis-benchmark -P 64 SETRANGE of 64-byte values over 65,536 keys,
                             redis-server with appendonly yes + appendfsync always, on 127.0.0.1

Columns: deltas/s; MB/s written by that row (raw: file bytes; log: frame bytes, Arrow and headers
included; redis: 64-byte values x ops, a lower bound of its AOF bytes); ratio of deltas/s to redis;
fraction of the raw disk's fsync-at-end MB/s. For the raw rows, deltas/s is what that bandwidth
would carry at the log's bytes per delta. redis-server is installed with apt-get when missing
(one-time, not counted in the run time); if that fails the redis row is null.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common                                          # noqa: E402
from _common import write_json                          # noqa: E402
from mmsb_dist.delta import DeltaBatch                  # noqa: E402
from mmsb_dist.formats import decode_deltas, encode_deltas   # noqa: E402
from mmsb_dist.log import LogPartition                  # noqa: E402

DELTAS_PER_BATCH = 10_000
DELTA_BYTES = 64
KEYS = 65_536
CHUNK_BYTES = 1 << 20

# (quick, full) sizes. Every loop also stops at its time bound. The disk of a VM is noisy (2-4x
# between back-to-back runs), so every row is measured in each of ROUNDS interleaved rounds, after
# an os.sync() so that one phase's writeback does not throttle the next; the median is reported.
ROUNDS = (3, 5)
RAW_MIB = (192, 512)
LOG_FRAMES = (160, 600)
REDIS_OPS = (300_000, 2_000_000)
PHASE_SECONDS_MAX = (5.0, 30.0)


# ---- inputs --------------------------------------------------------------------------------------

def make_batches(count: int, seed: int = 0) -> list:
    """``count`` encoded delta batches of 10,000 64-byte runs with random non-zero bytes on 65,536
    pages of 4 KiB (the same page spread as the redis keys)."""
    rng = np.random.default_rng(seed)
    out = []
    n = DELTAS_PER_BATCH
    for i in range(count):
        batch = DeltaBatch.runs(rng.integers(0, KEYS, n, dtype=np.uint64),
                                rng.integers(0, 4096 // DELTA_BYTES, n) * DELTA_BYTES,
                                rng.integers(1, 256, (n, DELTA_BYTES), dtype=np.uint8),
                                client_id=1, seq=i)
        out.append(encode_deltas(batch))
    return out


# ---- raw disk ------------------------------------------------------------------------------------

def bench_raw(directory: str, mib: int, fsync_each: bool, seconds_max: float) -> dict:
    chunks = [np.random.default_rng(i).integers(1, 256, CHUNK_BYTES, dtype=np.uint8).tobytes()
              for i in range(4)]
    path = os.path.join(directory, f"raw-{int(fsync_each)}.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written, t0 = 0, time.perf_counter()
    try:
        for i in range(mib):
            os.write(fd, chunks[i % len(chunks)])
            written += CHUNK_BYTES
            if fsync_each:
                os.fdatasync(fd)
            if time.perf_counter() - t0 > seconds_max:
                break
        os.fsync(fd)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.remove(path)
    return {"bytes": written, "seconds": seconds, "mb_per_s": written / seconds / 1e6}


# ---- the log -------------------------------------------------------------------------------------

def bench_log(directory: str, payloads: list, threads: int, frames: int,
              seconds_max: float) -> dict:
    path = tempfile.mkdtemp(prefix=f"log-{threads}t-", dir=directory)
    per_thread = frames // threads
    log = LogPartition(path, fsync="always")
    t0 = time.perf_counter()
    deadline = t0 + seconds_max

    def worker(t: int) -> None:
        for i in range(per_thread):
            log.append(payloads[(t + i * threads) % len(payloads)], epoch=0,
                       lsn_count=DELTAS_PER_BATCH)
            if time.perf_counter() > deadline:
                break

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    seconds = time.perf_counter() - t0
    stats = log.statistics()
    # Pair check: what went in comes back out, decodable, on both ends of the log.
    for lsn in (0, stats["next_lsn"] - 1):
        frame = next(log.read(lsn, lsn + 1))
        assert len(decode_deltas(frame.payload)) == DELTAS_PER_BATCH
    log.close()
    shutil.rmtree(path)
    deltas = stats["lsns"]
    return {"threads": threads, "frames": stats["frames"], "deltas": deltas,
            "bytes": stats["bytes"], "seconds": seconds, "deltas_per_s": deltas / seconds,
            "mb_per_s": stats["bytes"] / seconds / 1e6, "gb_per_s": stats["bytes"] / seconds / 1e9,
            "fsyncs": stats["fsyncs"], "groups": stats["groups"],
            "frames_per_fsync": stats["frames"] / max(stats["fsyncs"], 1),
            "fsync_seconds": stats["fsync_seconds"]}


# ---- redis ---------------------------------------------------------------------------------------

def ensure_redis() -> str | None:
    """None when redis-server and redis-benchmark are there (installing them if needed), else why
    not."""
    if shutil.which("redis-server") and shutil.which("redis-benchmark"):
        return None
    print("redis-server not found: installing it with apt-get (one-time) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "redis-server",
                                            "redis-tools"]):
            subprocess.run(cmd, check=True, env=env, timeout=600, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return f"could not install redis-server ({exc}): {detail.decode(errors='replace')[-300:]}"
    if not (shutil.which("redis-server") and shutil.which("redis-benchmark")):
        return "apt-get ran but redis-server or redis-benchmark is still missing"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=10).stdout


def bench_redis(directory: str, ops: int, seconds_max: float) -> dict:
    data = tempfile.mkdtemp(prefix="redis-", dir=directory)
    port = _free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
         "--appendonly", "yes", "--appendfsync", "always", "--save", "",
         "--protected-mode", "no", "--logfile", os.path.join(data, "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while "PONG" not in _cli(port, "PING"):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        assert "always" in _cli(port, "CONFIG", "GET", "appendfsync")
        value = "".join(chr(c) for c in np.random.default_rng(1).integers(65, 91, DELTA_BYTES))
        out = subprocess.run(
            ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(ops), "-c", "50",
             "-P", "64", "-r", str(KEYS), "--csv", "SETRANGE", "page:__rand_int__", "0", value],
            capture_output=True, text=True, timeout=seconds_max * 4 + 30, check=True).stdout
        rps = next(float(row[1]) for row in csv.reader(io.StringIO(out))
                   if len(row) > 1 and row[1].replace(".", "", 1).isdigit())
        version = _cli(port, "INFO", "server").split("redis_version:")[1].split()[0]
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(data, ignore_errors=True)
    return {"ops": ops, "deltas_per_s": rps, "mb_per_s": rps * DELTA_BYTES / 1e6,
            "clients": 50, "pipeline": 64, "keys": KEYS, "redis_version": version}


# ---- report --------------------------------------------------------------------------------------

def machine_info(directory: str) -> dict:
    import crc32c

    return {**_common.machine_info(directory), "crc32c": crc32c.__version__}


def print_table(rows: list[tuple[str, dict | None]], redis_rate: float | None,
                raw_mb: float) -> None:
    print(f"\n{'':28} {'deltas/s':>14} {'MB/s':>10} {'vs redis':>9} {'of raw disk':>12}")
    for name, r in rows:
        if r is None:
            print(f"{name:28} {'n/a':>14}")
            continue
        ratio = f"{r['deltas_per_s'] / redis_rate:8.2f}x" if redis_rate else f"{'n/a':>9}"
        print(f"{name:28} {r['deltas_per_s']:14,.0f} {r['mb_per_s']:10.1f} {ratio} "
              f"{r['mb_per_s'] / raw_mb:12.2f}")


def _median(samples: list[dict]) -> dict:
    ordered = sorted(samples, key=lambda r: r["deltas_per_s"])
    return {**ordered[len(ordered) // 2],
            "samples_deltas_per_s": [r["deltas_per_s"] for r in samples]}


def run_rounds(work: str, q: int, payloads: list, bytes_per_delta: float,
               with_redis: bool) -> dict[str, dict | None]:
    phases = {
        "raw_fsync_at_end": lambda: bench_raw(work, RAW_MIB[q], False, PHASE_SECONDS_MAX[q]),
        "raw_fsync_per_mib": lambda: bench_raw(work, RAW_MIB[q], True, PHASE_SECONDS_MAX[q]),
        "log_1_thread": lambda: bench_log(work, payloads, 1, LOG_FRAMES[q], PHASE_SECONDS_MAX[q]),
        "log_4_threads": lambda: bench_log(work, payloads, 4, LOG_FRAMES[q], PHASE_SECONDS_MAX[q]),
    }
    if with_redis:
        phases["redis_always_fsync"] = lambda: bench_redis(work, REDIS_OPS[q],
                                                           PHASE_SECONDS_MAX[q])
    samples: dict[str, list] = {name: [] for name in phases}
    order = list(phases.items())
    for rnd in range(ROUNDS[q]):
        # Rotate the order each round so that no row always follows the same neighbour's writeback.
        for name, phase in order[rnd % len(order):] + order[:rnd % len(order)]:
            os.sync()
            r = phase()
            if name.startswith("raw"):
                r["deltas_per_s"] = r["mb_per_s"] * 1e6 / bytes_per_delta
            samples[name].append(r)
        print(f"round {rnd + 1}/{ROUNDS[q]}: " + ", ".join(
            f"{name} {s[-1]['deltas_per_s'] / 1e6:.2f}M" for name, s in samples.items()),
            flush=True)
    out = {name: _median(s) for name, s in samples.items()}
    out.setdefault("redis_always_fsync", None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    ap.add_argument("--out", default="bench-results/log.json")
    ap.add_argument("--dir", default=None, help="parent of the temp dir (default: the system's)")
    args = ap.parse_args()
    q = 0 if args.quick else 1
    redis_skip = ensure_redis()
    if redis_skip is not None:
        print(f"skipping the redis row: {redis_skip}")
    work = tempfile.mkdtemp(prefix="mmsb-bench-log-", dir=args.dir)
    started = time.perf_counter()
    try:
        info = machine_info(work)
        print(f"benchmark dir: {info['bench_dir']} ({info['filesystem']} on {info['device']})")
        payloads = make_batches(8)
        bytes_per_delta = (sum(p.size for p in payloads) / len(payloads) + 40) / DELTAS_PER_BATCH
        res = run_rounds(work, q, payloads, bytes_per_delta, redis_skip is None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    redis = res["redis_always_fsync"]
    redis_rate = redis["deltas_per_s"] if redis else None
    names = {"raw_fsync_at_end": "raw disk, fsync at end",
             "raw_fsync_per_mib": "raw disk, fsync per MiB", "log_1_thread": "log append, 1 thread",
             "log_4_threads": "log append, 4 threads", "redis_always_fsync": "redis always-fsync"}
    print_table([(label, res[key]) for key, label in names.items()], redis_rate,
                res["raw_fsync_at_end"]["mb_per_s"])
    log1, log4 = res["log_1_thread"], res["log_4_threads"]
    print(f"\nmedians of {ROUNDS[q]} rounds; log: {bytes_per_delta:.1f} frame bytes per 64-byte "
          f"delta; frames per fsync {log1['frames_per_fsync']:.2f} (1 thread), "
          f"{log4['frames_per_fsync']:.2f} (4 threads)")
    result = {"benchmark": "log", "quick": args.quick, "rounds": ROUNDS[q], "machine": info,
              "deltas_per_batch": DELTAS_PER_BATCH, "delta_bytes": DELTA_BYTES,
              "frame_bytes_per_delta": bytes_per_delta, **res, "redis_skipped": redis_skip,
              "log_vs_redis": ({"1_thread": log1["deltas_per_s"] / redis_rate,
                                "4_threads": log4["deltas_per_s"] / redis_rate}
                               if redis_rate else None),
              "seconds": time.perf_counter() - started}
    write_json(args.out, result, result["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
