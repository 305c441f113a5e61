"""Kernel benchmark: every figure beside a baseline measured in the same run.

    python benchmarks/bench_kernels.py [--quick] [--out bench-results/kernels.json]

CPU (always): batched apply of 64-byte runs through PageArena.apply (validation, page lookup and
the kernel included) vs NumPy fancy-index scatter of the same deltas (index prebuilt, not timed);
batched creation of 1M pages vs a Python-dict page table.
GPU (when CuPy sees a device): plain device-to-device copy bandwidth; bitmask merge and 64-byte run
scatter as effective bandwidth and as a fraction of that copy; run scatter vs CuPy fancy indexing.
GPU times are the device's (``_common.gpu_timed``: the stream is held while the host enqueues, so
Python's launch latency is not counted, for the baselines as for the kernels); the copy, the
scatter and CuPy's fancy indexing are also timed from the host's call, taking turns
(``_common.gpu_timed_from_call``; ``*_from_call``).
All data is random and non-zero; medians of repeated runs after warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

# benchmarks/ is on sys.path
from _common import gpu_timed, gpu_timed_from_call, write_json  # noqa: E402
from mmsb_dist import DeltaBatch, PageArena
from mmsb_dist.backend import get_backend, gpu_available


def _median_time(fn, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _runs_workload(rng, pages: int, page_bytes: int, n: int, run_bytes: int = 64,
                   aligned: bool = False):
    """Random pages; offsets anywhere in the page, or (aligned) at run_bytes-sized slots."""
    page_ids = rng.integers(0, pages, n).astype(np.uint64)
    if aligned:
        offsets = rng.integers(0, page_bytes // run_bytes, n) * run_bytes
    else:
        offsets = rng.integers(0, page_bytes - run_bytes + 1, n)
    payload = rng.integers(1, 256, (n, run_bytes), dtype=np.uint8)
    return page_ids, offsets, payload


def bench_cpu(quick: bool) -> dict:
    pages, page_bytes = 65536, 4096
    n = 250_000 if quick else 1_000_000
    arena = PageArena("numpy", capacity_bytes=pages * page_bytes)
    arena.create_pages(pages, page_bytes)
    flat = np.zeros(pages * page_bytes, np.uint8)
    out = {}
    for label, aligned in (("runs_64B", False), ("runs_64B_slots", True)):
        rng = np.random.default_rng(1)
        flat.fill(0)
        page_ids, offsets, payload = _runs_workload(rng, pages, page_bytes, n, aligned=aligned)
        batch = DeltaBatch.runs(page_ids, offsets, payload)
        # Baseline: the same deltas as one NumPy fancy-index assignment over absolute byte
        # positions (the index is built beforehand and not timed).
        pos = page_ids.astype(np.int64) * page_bytes + offsets
        t0 = time.perf_counter()
        idx = (pos[:, None] + np.arange(64)).reshape(-1)
        t_index = time.perf_counter() - t0
        values = payload.reshape(-1)
        # NumPy's fastest form of the same assignment: 64-byte rows of a writable window view
        # (row p = bytes p..p+63), one row per delta, for runs at any offset as for slots (on
        # slots it runs as fast as rows of a reshaped or 8-byte view).
        rows = np.lib.stride_tricks.as_strided(flat, (flat.size - 63, 64), (1, 1))
        # Interleaved rounds (this VM's memory speed drifts): median of each side.
        t_apply, t_fancy, t_rows = [], [], []
        for _ in range(3 if quick else 5):
            t_apply.append(_timed(lambda: arena.apply(batch)))
            t_fancy.append(_timed(lambda idx=idx, values=values: flat.__setitem__(idx, values)))
            t_rows.append(_timed(lambda rows=rows: rows.__setitem__(pos, payload)))
        ta, tf, tr = (statistics.median(t[1:] or t) for t in (t_apply, t_fancy, t_rows))
        _check_same_bytes(batch, page_ids, flat, pages, page_bytes)
        flat.fill(0)
        rows[pos] = payload
        _check_same_bytes(batch, page_ids, flat, pages, page_bytes)
        out[label] = {"deltas": n, "apply_s": ta, "apply_deltas_per_s": n / ta, "fancy_s": tf,
                      "fancy_deltas_per_s": n / tf, "fancy_index_build_s": t_index,
                      "ratio_vs_fancy": tf / ta, "fancy_rows_s": tr,
                      "fancy_rows_deltas_per_s": n / tr, "ratio_vs_fancy_rows": tr / ta}
        del idx, values
    npages = 250_000 if quick else 1_000_000
    fresh = PageArena("numpy")
    t_create = _timed(lambda: fresh.create_pages(npages, 4096))
    t_dict = _timed(lambda: _dict_table(npages, 4096))
    out["create_pages"] = {"pages": npages, "page_bytes": 4096, "create_s": t_create,
                           "us_per_page": t_create / npages * 1e6, "dict_table_s": t_dict,
                           "ratio_vs_dict": t_dict / t_create}
    return out


def _check_same_bytes(batch, page_ids, flat, pages, page_bytes) -> None:
    """What was timed wrote the same bytes: apply to a fresh arena, compare pages with the
    fancy-index result."""
    check = PageArena("numpy", capacity_bytes=pages * page_bytes)
    check.create_pages(pages, page_bytes)
    check.apply(batch)
    for p in np.unique(page_ids)[:64]:
        assert check.read(int(p)).tobytes() == \
            flat[int(p) * page_bytes:(int(p) + 1) * page_bytes].tobytes()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _dict_table(n: int, size: int) -> dict:
    """A naive page table: one dict entry per page, offsets from a running counter."""
    table, top = {}, 0
    for pid in range(n):
        table[pid] = (top, size, 0)
        top += size
    return table


_CEILING_SRC = r"""
// What this device does for random 64-byte writes of sequentially read bytes with nothing else
// to do: run r goes to slot (r * odd) mod 2^k (a bijection, so the slots are distinct), computed
// rather than read; 4 threads per run, 16 bytes each. With read == 0 it only writes.
extern "C" __global__ void ceiling(uint4* dst, const uint4* src, long long n, unsigned mask,
                                   int read) {
    long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if ((t >> 2) >= n) return;
    unsigned slot = ((unsigned)(t >> 2) * 2654435761u) & mask;
    dst[(long long)slot * 4 + (t & 3)] = read ? src[t] : make_uint4((unsigned)t, 1u, 2u, 3u);
}
"""


def scatter_ceiling(arena, pay, n: int, read: bool = True):
    """A launcher of the ceiling kernel: n runs of 64 bytes from ``pay`` (or none, when not
    ``read``) to distinct computed 64-byte slots of ``arena`` (a power-of-two size)."""
    import cupy as cp

    kernel = cp.RawModule(code=_CEILING_SRC).get_function("ceiling")
    mask = np.uint32(arena.size // 64 - 1)
    return lambda: kernel(((4 * n + 255) // 256,), (256,),
                          (arena, pay, np.int64(n), mask, np.int32(read)))


def bench_gpu(quick: bool) -> dict:
    import cupy as cp

    be = get_backend("cupy")
    rng = cp.random.default_rng(2)
    nbytes = (256 << 20) if quick else (1 << 30)
    src = rng.integers(1, 256, nbytes, dtype=cp.uint8)
    dst = cp.empty_like(src)
    calls = {"copy": lambda: cp.copyto(dst, src)}  # what is also timed from the call
    t_copy = gpu_timed(calls["copy"])
    copy_bw = 2 * nbytes / t_copy
    arena = rng.integers(1, 256, nbytes, dtype=cp.uint8)
    out = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
           "copy": {"bytes": nbytes, "s": t_copy, "GBps": copy_bw / 1e9},
           **_gpu_merge(be, rng, arena, copy_bw),
           **_gpu_scatter(be, rng, arena, copy_bw, calls)}
    _from_call(out, calls)
    return out


def _from_call(g: dict, calls: dict) -> None:
    """Adds to the rows of ``g`` their times from the host's call (``gpu_timed_from_call``): the
    copy and the scatter on both kinds of slots taking turns, then each of CuPy's assignments
    taking turns with the scatter it is held against (nothing else in the loop: another
    function's work in between shifted the copy's time from the call by tens of microseconds)."""
    t = gpu_timed_from_call({k: calls[k] for k in ("copy", "run_scatter_64B",
                                                   "run_scatter_64B_distinct")})
    copy = g["copy"]
    copy.update(s_from_call=t["copy"], GBps_from_call=2 * copy["bytes"] / t["copy"] / 1e9)
    for key in ("run_scatter_64B", "run_scatter_64B_distinct"):
        row = g[key]
        row.update(s_from_call=t[key], fraction_of_copy_from_call=(
            row["fraction_of_copy"] * row["s"] / t[key] / (copy["s"] / t["copy"])))
    for key, fn in calls.items():
        if key.startswith("cupy_fancy_rows"):
            ours = "run_scatter_64B_distinct" if key.endswith("distinct") else "run_scatter_64B"
            pair = gpu_timed_from_call({key: fn, ours: calls[ours]}, repeat=20)
            g[key].update(s_from_call=pair[key],
                          ratio_scatter_vs_fancy_from_call=pair[key] / pair[ours])


def _gpu_merge(be, rng, arena, copy_bw) -> dict:
    """Bitmask merge: page-sized masked deltas (64 KiB pages), half the bits set at random."""
    import cupy as cp

    from mmsb_dist import _gpu

    nbytes, page = arena.size, 64 << 10
    payload = rng.integers(1, 256, nbytes, dtype=cp.uint8)
    masks = rng.integers(0, 256, nbytes // 8, dtype=cp.uint8)
    offs = np.arange(nbytes // page, dtype=np.int64) * page
    lens = np.full(offs.size, page, np.int64)
    od, ld, md = (cp.asarray(a) for a in (offs, lens, offs // 8))
    blocks = tuple(cp.asarray(a) for a in _gpu._block_table(lens))
    t = gpu_timed(lambda: be.merge_device(arena, od, od, ld, md, blocks, payload, masks))
    moved = nbytes * 3 + nbytes // 8  # payload read, arena read, arena write, mask read
    return {"bitmask_merge": {"bytes_moved": moved, "s": t, "GBps": moved / t / 1e9,
                              "fraction_of_copy": moved / t / copy_bw}}


def _gpu_scatter(be, rng, arena, copy_bw, calls: dict) -> dict:
    """64-byte runs at random 64-byte slots, drawn with repeats (as hot keys are), so ~11% of the
    runs collide and take the ordered path; also distinct slots. Both indexed by granule number,
    as ``scatter_runs`` sends such runs; distinct slots again as byte offsets (the general
    kernel's pass 1), the general layout (per-run source offsets and lengths), the same runs
    with no order kept (the floor: what keeping batch order costs), and the device's ceiling (a
    sequential 64-byte read and a random 64-byte write, with no destination to read and no
    order to keep). Then CuPy's ways of doing the same. Adds to ``calls`` what is also timed
    from the call."""
    import cupy as cp

    nbytes = arena.size
    n = nbytes // 256
    host_rng = np.random.default_rng(3)
    slots = cp.asarray(host_rng.integers(0, nbytes // 64, n)).astype(cp.int64)
    distinct = cp.asarray(host_rng.permutation(nbytes // 64)[:n]).astype(cp.int64)
    dd, dd_distinct = slots * 64, distinct * 64
    gd, gd_distinct = slots.astype(cp.uint32), distinct.astype(cp.uint32)  # granule numbers
    sd = cp.arange(n, dtype=cp.int64) * 64
    ld = cp.full(n, 64, cp.int64)
    pay = rng.integers(1, 256, n * 64, dtype=cp.uint8)
    state = be.scatter_state(nbytes)

    def scatter(dest, general=False, target=arena, st=state):
        # Every run is one whole granule: n (granule, run) pairs, 64 * n bytes.
        be.scatter_device(target, dest, sd if general else None, ld if general else None, pay,
                          st, maxlen=64, ulen=0 if general else 64, granule_pairs=n,
                          run_bytes=64 * n)

    def rate(t, **more):
        return {"s": t, "deltas_per_s": n / t, "fraction_of_copy": 2 * n * 64 / t / copy_bw,
                **more}  # bytes: payload read + arena write

    calls["run_scatter_64B"] = lambda: scatter(gd)
    calls["run_scatter_64B_distinct"] = lambda: scatter(gd_distinct)
    ours = {label: gpu_timed(calls[key]) for label, key in (
        ("colliding", "run_scatter_64B"), ("distinct", "run_scatter_64B_distinct"))}
    out = {
        "run_scatter_64B": rate(ours["colliding"], runs=n,
                                GBps=2 * n * 64 / ours["colliding"] / 1e9,
                                colliding_runs=int(n - cp.unique(slots).size),
                                fixup_batches=state.fixups),
        "run_scatter_64B_distinct": rate(ours["distinct"]),
        "run_scatter_64B_distinct_byte_offsets": rate(gpu_timed(lambda: scatter(dd_distinct))),
        "run_scatter_64B_unordered_floor": rate(gpu_timed(lambda: be._launch_granules(
            arena, pay, gd_distinct, 64, None))),
        "random_64B_write_ceiling": rate(gpu_timed(scatter_ceiling(arena, pay, n))),
        "run_scatter_64B_general": rate(gpu_timed(lambda: scatter(dd, general=True))),
        **_cupy_baselines(arena, pay, slots, distinct, ours, calls),
    }
    for dest, general in ((gd, False), (dd, False), (dd, True)):  # what was timed is right
        _check_last_writer_wins(rng, nbytes, slots, pay.reshape(-1, 64),
                                lambda check: scatter(dest, general, check,
                                                      be.scatter_state(nbytes)))
    return out


def _cupy_baselines(arena, pay, slots, distinct, ours: dict, calls: dict) -> dict:
    """CuPy's ways of doing the scatter's work, each against ``ours`` (the device time of the
    scatter on "colliding" and "distinct" slots): fancy assignment of 64-byte rows at the same
    slots, what CuPy needs for the scatter's result on colliding slots, and a per-byte fancy
    index. The assignments of rows join ``calls``, to be timed from the call too."""
    import cupy as cp

    n = int(slots.size)
    rows, pay_rows = arena.reshape(-1, 64), pay.reshape(-1, 64)
    # The same rows as wider elements, CuPy's best case: 8 and 16 bytes per element (complex128
    # is its only 16-byte type; the scatter moves its bits untouched, checked below).
    wide = {w: (arena.view(t).reshape(-1, 64 // w), pay.view(t).reshape(-1, 64 // w))
            for w, t in ((8, cp.uint64), (16, cp.complex128))}

    def fancy_last_wins():
        """What CuPy needs for the scatter's result on colliding slots (its fancy assignment
        leaves the winner among duplicates undefined): keep each slot's last run, then assign."""
        last = cp.unique(slots[::-1], return_index=True)[1]
        rows[slots[::-1][last]] = pay_rows[::-1][last]

    out = {}
    for key, fn, kind, repeat in (
            ("cupy_fancy_rows", lambda: rows.__setitem__(slots, pay_rows), "colliding", 20),
            ("cupy_fancy_rows_distinct", lambda: rows.__setitem__(distinct, pay_rows),
             "distinct", 20),
            ("cupy_fancy_rows_last_wins", fancy_last_wins, "colliding", 10),
            *((f"cupy_fancy_rows_{w}B_elements{suffix}",
               lambda r=r, p=p, s=s: r.__setitem__(s, p), kind, 20)
              for w, (r, p) in wide.items()
              for suffix, s, kind in (("", slots, "colliding"), ("_distinct", distinct,
                                                                  "distinct")))):
        t = gpu_timed(fn, repeat=repeat)
        out[key] = {"s": t, "deltas_per_s": n / t, "ratio_scatter_vs_fancy": t / ours[kind]}
        calls[key] = fn
    for w, (r, p) in wide.items():  # the wide rows carry every byte as the scatter does
        r[distinct] = p
        assert bool((rows[distinct] == pay_rows).all()), f"{w}-byte elements changed bytes"
    nb = min(n, 1 << 20)
    byte_idx = (slots[:nb, None] * 64 + cp.arange(64)).reshape(-1)
    t = gpu_timed(lambda: arena.__setitem__(byte_idx, pay[: nb * 64]), repeat=5)
    out["cupy_fancy_bytes"] = {"runs": nb, "s": t, "deltas_per_s": nb / t}
    return out


def _check_last_writer_wins(rng, nbytes: int, slots, pay_rows, scatter) -> None:
    """``scatter(arena)`` of the runs ``pay_rows`` to 64-byte ``slots`` leaves, in a random
    arena, the last run of each slot."""
    import cupy as cp

    check = rng.integers(1, 256, nbytes, dtype=cp.uint8)
    want = check.copy()
    last = cp.unique(slots[::-1], return_index=True)[1]
    want.reshape(-1, 64)[slots[::-1][last]] = pay_rows[::-1][last]
    scatter(check)
    assert bool((check == want).all()), "scatter result differs from last-writer-wins"


def n_per_s(row: dict, key: str = "s_from_call") -> float:
    """Deltas per second of a GPU row, from one of its times."""
    return row["deltas_per_s"] * row["s"] / row[key]


def _table(res: dict) -> str:
    lines = [f"{'measure':44s} {'value':>16s} {'baseline (same run)':>24s} {'ratio':>8s}"]
    cpu = res["cpu"]
    for key, label in (("runs_64B", "CPU apply 64B runs, any offset (deltas/s)"),
                       ("runs_64B_slots", "CPU apply 64B runs, 64B slots (deltas/s)")):
        r = cpu[key]
        lines.append(f"{label:44s} {r['apply_deltas_per_s']:16.3e} "
                     f"{r['fancy_deltas_per_s']:16.3e} fancy {r['ratio_vs_fancy']:8.2f}x")
        lines.append(f"{'  vs NumPy fancy 64-byte rows':44s} {'':16s} "
                     f"{r['fancy_rows_deltas_per_s']:11.3e} fancy-rows "
                     f"{r['ratio_vs_fancy_rows']:8.2f}x")
    c = cpu["create_pages"]
    lines.append(f"{'CPU create 1 batch of pages (us/page)':44s} {c['us_per_page']:16.3f} "
                 f"{c['dict_table_s'] / c['pages'] * 1e6:17.3f} dict {c['ratio_vs_dict']:8.2f}x")
    g = res.get("gpu")
    if g:
        lines.append(f"{'GPU device copy (GB/s, read+write)':44s} {g['copy']['GBps']:16.1f}")
        m = g["bitmask_merge"]
        lines.append(f"{'GPU bitmask merge (GB/s moved)':44s} {m['GBps']:16.1f} "
                     f"{g['copy']['GBps']:17.1f} copy {m['fraction_of_copy']:8.2%}")
        s = g["run_scatter_64B"]
        lines.append(f"{'GPU 64B run scatter (GB/s payload r+w)':44s} {s['GBps']:16.1f} "
                     f"{g['copy']['GBps']:17.1f} copy {s['fraction_of_copy']:8.2%}")
        for key, label in (("run_scatter_64B_distinct", "distinct slots"),
                           ("run_scatter_64B_distinct_byte_offsets", "distinct, byte offsets"),
                           ("run_scatter_64B_unordered_floor", "distinct, unordered"),
                           ("random_64B_write_ceiling", "device ceiling"),
                           ("run_scatter_64B_general", "per-run offsets/lengths")):
            v = g[key]
            lines.append(f"{'GPU 64B run scatter, ' + label:44s} {v['deltas_per_s']:16.3e} "
                         f"{'':17s} copy {v['fraction_of_copy']:8.2%}")
        f = g["cupy_fancy_rows"]
        lines.append(f"{'GPU 64B run scatter (deltas/s)':44s} {s['deltas_per_s']:16.3e} "
                     f"{f['deltas_per_s']:14.3e} cupy-rows {f['ratio_scatter_vs_fancy']:8.2f}x")
        f = g["cupy_fancy_rows_last_wins"]
        lines.append(f"{'GPU 64B run scatter vs CuPy unique + rows':44s} {s['deltas_per_s']:16.3e} "
                     f"{f['deltas_per_s']:14.3e} last-wins {f['ratio_scatter_vs_fancy']:8.2f}x")
        f = g["cupy_fancy_rows_distinct"]
        lines.append(f"{'GPU 64B run scatter, distinct (deltas/s)':44s} "
                     f"{g['run_scatter_64B_distinct']['deltas_per_s']:16.3e} "
                     f"{f['deltas_per_s']:14.3e} cupy-rows {f['ratio_scatter_vs_fancy']:8.2f}x")
        for w in (8, 16):  # CuPy's rows as wider elements
            for suffix, label, ours in (("", "colliding", s),
                                        ("_distinct", "distinct", g["run_scatter_64B_distinct"])):
                f = g[f"cupy_fancy_rows_{w}B_elements{suffix}"]
                lines.append(f"{f'  vs CuPy rows of {w}-byte elements, {label}':44s} "
                             f"{ours['deltas_per_s']:16.3e} {f['deltas_per_s']:14.3e} "
                             f"cupy-{w}B {f['ratio_scatter_vs_fancy']:8.2f}x")
        d = g["run_scatter_64B_distinct"]
        lines.append(f"{'GPU timed from the call: copy (GB/s)':44s} "
                     f"{g['copy']['GBps_from_call']:16.1f}")
        lines.append(f"{'  64B run scatter, distinct (deltas/s)':44s} {n_per_s(d):16.3e} "
                     f"{'':17s} copy {d['fraction_of_copy_from_call']:8.2%}")
        for key, label in (("cupy_fancy_rows_distinct", "distinct"),
                           ("cupy_fancy_rows", "colliding")):
            f = g[key]
            lines.append(f"{'  64B run scatter vs CuPy rows, ' + label:44s} {'':16s} "
                         f"{n_per_s(f, 's_from_call'):14.3e} cupy-rows "
                         f"{f['ratio_scatter_vs_fancy_from_call']:8.2f}x")
        b = g["cupy_fancy_bytes"]
        lines.append(f"{'GPU cupy per-byte fancy index (deltas/s)':44s} {b['deltas_per_s']:16.3e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (< 1 minute)")
    ap.add_argument("--out", default="bench-results/kernels.json")
    ap.add_argument("--no-gpu", action="store_true")
    args = ap.parse_args(argv)
    res = {"machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                       "cpus": os.cpu_count()},
           "quick": args.quick, "cpu": bench_cpu(args.quick)}
    if gpu_available() and not args.no_gpu:
        res["gpu"] = bench_gpu(args.quick)
    print(_table(res))
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
