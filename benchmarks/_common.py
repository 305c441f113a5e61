"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this module is
importable as `_common`)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import threading
import time

import numpy as np


def run_at_once(target, per_thread: list) -> float:
    """``target(*args)`` on one thread per ``args`` in ``per_thread``, all started together; the
    wall time until the last ends. The first exception any of them raised is raised after all
    have ended."""
    errors: list = []

    def run(args):
        try:
            target(*args)
        except BaseException as exc:  # raised below, once every thread is done
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(args,)) for args in per_thread]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return seconds


def evict(path: str) -> None:
    """fsync every file under ``path`` (or the file itself) and ask the kernel to drop it from the
    page cache, so that the next read comes from the disk (a hypervisor may still cache it)."""
    walk = os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), None,
                                                       [os.path.basename(path)])]
    for root, _, files in walk:
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_json(path: str, result: dict, seconds: float | None = None) -> None:
    """Write a benchmark's result where it was asked for, and say so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {path}" + (f" ({seconds:.1f} s)" if seconds is not None else ""))


def raw_read(path: str, out: np.ndarray, chunk: int = 1 << 20) -> float:
    """Seconds to read ``path`` into ``out`` with plain read() calls of ``chunk`` bytes."""
    view = memoryview(out)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < out.size:
            got = f.readinto(view[pos:pos + chunk])
            if not got:
                raise RuntimeError("short read")
            pos += got
    return time.perf_counter() - t0


def machine_info(directory: str) -> dict:
    """What a reader needs to compare figures: CPU, memory, the filesystem and disk used, versions."""
    import numba
    import pyarrow

    real = os.path.realpath(directory)
    mounts = [line.split() for line in open("/proc/mounts")]
    mount = max((m for m in mounts if real == m[1] or real.startswith(m[1].rstrip("/") + "/")),
                key=lambda m: len(m[1]))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
               if line.startswith("MemTotal"))
    try:
        df = subprocess.run(["df", "-hT", real], capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        df = f"df failed: {exc}"
    usage = shutil.disk_usage(real)
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpus": os.cpu_count(), "memory_bytes": mem, "bench_dir": real,
            "filesystem": mount[2], "device": mount[0], "mount": mount[1], "df": df,
            "disk_total_bytes": usage.total, "disk_free_bytes": usage.free,
            "numpy": np.__version__, "pyarrow": pyarrow.__version__, "numba": numba.__version__,
            "numba_threads": numba.config.NUMBA_NUM_THREADS}


_HOLD_SRC = r"""
// Keeps the stream busy for `ns` nanoseconds, so that what is enqueued behind it starts at device
// speed, whatever the host's launch latency was.
extern "C" __global__ void hold(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
"""
_hold = []


def gpu_timed(fn, repeat: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn`` on the current CUDA stream, timed with device events after a
    warm-up (compilation and first-touch stay out of the figure).

    This is the device's time alone, as nvbench measures it: a kernel holds the stream until the
    host has enqueued the start event, all of ``fn``'s work and the stop event, so the host's
    launch latency (tens of microseconds of Python before the first kernel) is not counted; the
    gaps between ``fn``'s own kernels are. The hold lasts 4x the enqueue of the last warm-up call
    (at least 1 ms; the first call may compile). A ``fn`` that waits for the device inside is
    timed from its call. ``gpu_timed_from_call`` counts the host's latency."""
    import statistics

    import cupy as cp

    enqueue = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        enqueue = time.perf_counter() - t0
    if not _hold:
        _hold.append(cp.RawModule(code=_HOLD_SRC).get_function("hold"))
    hold_ns = np.uint64(max(1e-3, 4 * enqueue) * 1e9)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    cp.cuda.get_current_stream().synchronize()  # each round below ends synchronized too
    for _ in range(repeat):
        _hold[0]((1,), (1,), (hold_ns,))
        times.append(_between_events(fn, start, stop))
    return statistics.median(times)


def _between_events(fn, start, stop) -> float:
    """Seconds between two CUDA events recorded on the current stream around ``fn()``, once the
    second has passed."""
    import cupy as cp

    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 1e3


def gpu_timed_from_call(fns: dict, repeat: int = 40, warmup: int = 2) -> dict:
    """Median seconds of each of ``fns`` (name -> function) timed from the host's call: device
    events around the call on an idle stream, so the Python before the first kernel and the
    launch latency count, as a caller waits them. The functions take turns in every round, so
    that the host's drift (its clock, other processes: tens of microseconds between runs on the
    H100 host) falls on all of them alike and their ratios hold."""
    import statistics

    import cupy as cp

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = {name: [] for name in fns}
    cp.cuda.get_current_stream().synchronize()
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(_between_events(fn, start, stop))
    return {name: statistics.median(t) for name, t in times.items()}
