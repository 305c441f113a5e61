"""Kernel tuning aid (GPU only): times the run scatter's ceilings and passes and compile-time
variants of the masked merge side by side with a device copy, in one process. Not part of the
product's benchmark suite; kept so that a tuning result can be reproduced.
Usage: python benchmarks/gpu_variants.py"""


import contextlib

import cupy as cp
import numpy as np

from mmsb_dist.kernels import cuda_source


from _common import gpu_timed as timed  # noqa: E402  (benchmarks/ is on sys.path)
from bench_kernels import scatter_ceiling  # noqa: E402


_VARIANTS_SRC = r"""
// Ceiling variants: run r (4 lanes of 16 bytes) to the computed distinct slot (r * odd) mod 2^k,
// each lane loading its chunks of K runs before storing any. HINT: 1 streaming loads (__ldcs),
// 2 streaming stores (__stcs), 4 write-through stores (__stwt).
#define LD(p) (HINT & 1 ? __ldcs(p) : *(p))
#define ST(p, v) do { if (HINT & 2) __stcs((p), (v)); else if (HINT & 4) __stwt((p), (v)); \
                      else *(p) = (v); } while (0)
typedef long long i64;
extern "C" __global__ void ceiling_k(uint4* dst, const uint4* src, i64 n, unsigned mask) {
    i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    uint4 v[K];
#pragma unroll
    for (int j = 0; j < K; ++j) if (((t + j * stride) >> 2) < n) v[j] = LD(src + t + j * stride);
#pragma unroll
    for (int j = 0; j < K; ++j) {
        i64 c = t + j * stride;
        unsigned slot = ((unsigned)(c >> 2) * 2654435761u) & mask;
        if ((c >> 2) < n) ST(dst + (i64)slot * 4 + (c & 3), v[j]);
    }
}
// The same with the destination read from an index: byte offsets (i64) or granule numbers (u32).
extern "C" __global__ void indexed(uint4* dst, const uint4* src, const IDX* dest, i64 n) {
    i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if ((t >> 2) >= n) return;
    i64 d = GRANULES ? (i64)dest[t >> 2] << 2 : (i64)dest[t >> 2] >> 4;  // in 16-byte units
    dst[d + (t & 3)] = src[t];
}
"""


def ceiling_variants(copy_bw):
    """Does anything lift the random 64-byte write ceiling? Cache hints and runs per lane (no),
    the arena's size, and what reading an index costs (8-byte offsets vs 4-byte granule
    numbers)."""
    n = (1 << 30) // 256
    rng = cp.random.default_rng(3)
    pay = rng.integers(1, 256, n * 64, dtype=cp.uint8)

    def frac(t):
        return f"{2 * n * 64 / t / copy_bw:6.1%} of copy"

    for arena_log2 in (28, 30, 32):
        arena = cp.full(1 << arena_log2, 3, cp.uint8)
        mask = np.uint32(arena.size // 64 - 1)
        for hint in ((0, 1, 2, 3, 4) if arena_log2 == 30 else (0,)):
            for k in ((1, 2, 4, 8) if arena_log2 == 30 else (1,)):
                fn = cp.RawModule(code=_VARIANTS_SRC, options=(
                    f"-DK={k}", f"-DHINT={hint}", "-DIDX=int", "-DGRANULES=0")).get_function(
                    "ceiling_k")
                t = timed(lambda: fn(((4 * n + 256 * k - 1) // (256 * k),), (256,),
                                     (arena, pay, np.int64(n), mask)))
                print(f"{arena.size >> 20:5d} MiB arena: ceiling, {k} run(s)/lane, hint {hint}: "
                      f"{frac(t)}")
        slots = np.random.default_rng(4).permutation(arena.size // 64)[:n]
        for label, dest, idx, granules in (
                ("8-byte offsets", cp.asarray(slots * 64).astype(cp.int64), "long long", 0),
                ("4-byte granule numbers", cp.asarray(slots).astype(cp.uint32), "unsigned", 1)):
            fn = cp.RawModule(code=_VARIANTS_SRC, options=(
                "-DK=1", "-DHINT=0", f"-DIDX={idx}", f"-DGRANULES={granules}")).get_function(
                "indexed")
            t = timed(lambda: fn(((4 * n + 255) // 256,), (256,), (arena, pay, dest, np.int64(n))))
            print(f"{arena.size >> 20:5d} MiB arena: unordered, indexed by {label}: {frac(t)}")
        arena = None  # noqa: F841  (freed before the next size)


def scatter_variants(copy_bw):
    """The hardware's ceiling for random 64-byte writes (no index read; no payload read either),
    the unordered run copy of 64-byte runs (the general kernel with 1, 2 or 4 chunks of 16 bytes
    per thread; the granule-numbered one), and the ordered scatter, pass by pass, on distinct and
    on colliding slots, with what the launches after pass 1 cost when nothing collides."""
    from mmsb_dist.backend import get_backend

    be = get_backend("cupy")
    nbytes = 1 << 30
    n = nbytes // 256
    rng = cp.random.default_rng(1)
    arena = rng.integers(1, 256, nbytes, dtype=cp.uint8)
    pay = rng.integers(1, 256, n * 64, dtype=cp.uint8)
    t = timed(scatter_ceiling(arena, pay, n, read=False))
    print(f"ceiling, random 64B writes only: {n / t / 1e9:6.2f} G runs/s, {64 * n / t / 1e9:7.1f} "
          f"GB/s ({64 * n / t / copy_bw:6.1%} of copy, writes alone)")
    t = timed(scatter_ceiling(arena, pay, n))
    print(f"ceiling, sequential read + random 64B write, no index: {n / t / 1e9:6.2f} G runs/s "
          f"({2 * n * 64 / t / copy_bw:6.1%} of copy)")
    host = np.random.default_rng(2)
    slots = {"distinct": host.permutation(nbytes // 64)[:n],
             "colliding": host.integers(0, nbytes // 64, n)}
    dests = {label: (cp.asarray(s * 64).astype(cp.int64), cp.asarray(s).astype(cp.uint32))
             for label, s in slots.items()}  # byte offsets, granule numbers
    _unordered(be, arena, pay, *dests["distinct"], copy_bw)
    for label, (dest, gd) in dests.items():
        _ordered(be, arena, pay, dest, gd, label, copy_bw)


@contextlib.contextmanager
def _chunks_per_lane(per_lane: int):
    """Run scatters with ``per_lane`` 16-byte chunks per thread (``_gpu._CHUNKS_PER_LANE``)."""
    from mmsb_dist import _gpu

    default, _gpu._CHUNKS_PER_LANE = _gpu._CHUNKS_PER_LANE, per_lane
    try:
        yield
    finally:
        _gpu._CHUNKS_PER_LANE = default


def _unordered(be, arena, pay, dest, gd, copy_bw):
    """64-byte runs at the distinct slots ``dest`` (``gd`` as granule numbers) with no order kept,
    then the granule pass 1 with a plain clearing memset and with runs_post, which keeps order."""
    n, dummy = int(dest.size), be._dummy64
    for per_lane in (1, 2, 4):
        with _chunks_per_lane(per_lane):
            t = timed(lambda: be._launch_runs(arena, pay, dest, dummy, dummy, mode=0, maxlen=64,
                                              ulen=64))
        print(f"scatter unordered, {per_lane} chunk(s)/thread: {n / t / 1e9:6.2f} G runs/s "
              f"({2 * n * 64 / t / copy_bw:6.1%} of copy)")
    t = timed(lambda: be._launch_granules(arena, pay, gd, 64, None))
    print(f"scatter unordered, granule-numbered: {n / t / 1e9:6.2f} G runs/s "
          f"({2 * n * 64 / t / copy_bw:6.1%} of copy)")
    state = be.scatter_state(arena.size)
    for label, post in (("pass 1 + clearing memset", False), ("pass 1 + runs_post", True)):
        def once():
            be._launch_granules(arena, pay, gd, 64, state)
            if post:
                be._launch_post(arena, pay, gd, dummy, dummy, maxlen=64, ulen=64, state=state)
            else:
                state.bits.fill(0)
        t = timed(once)
        print(f"granule-numbered {label}, distinct: {2 * n * 64 / t / copy_bw:6.1%} of copy")


def _ordered(be, arena, pay, dest, gd, label, copy_bw):
    """The ordered scatter of 64-byte runs at ``dest`` (``gd`` as granule numbers): each pass
    timed alone, then the whole, granule-numbered and by byte offsets with 1 or 2 chunks per
    thread."""
    n, dummy = int(dest.size), be._dummy64
    st = be.scatter_state(arena.size)
    ev = [cp.cuda.Event() for _ in range(3)]
    for rep in range(3):
        ev[0].record()
        be._launch_granules(arena, pay, gd, 64, st)
        ev[1].record()
        be._launch_post(arena, pay, gd, dummy, dummy, maxlen=64, ulen=64, state=st)
        ev[2].record()
        ev[2].synchronize()
        st.key_base += n
        ms = [cp.cuda.get_elapsed_time(ev[i], ev[i + 1]) for i in range(2)]
        print(f"{label} passes (ms): pass1 {ms[0]:.3f} runs_post (stamp, rewrite, clearing) "
              f"{ms[1]:.3f}")
    # Each run is one whole granule: n (granule, run) pairs, 64 * n bytes.
    t = timed(lambda: be.scatter_device(arena, gd, None, None, pay, st, maxlen=64, ulen=64,
                                        granule_pairs=n, run_bytes=64 * n))
    print(f"scatter ordered, {label:9s}, granule-numbered: {n / t / 1e9:6.2f} G runs/s "
          f"({2 * n * 64 / t / copy_bw:6.1%} of copy)")
    for per_lane in (1, 2, 1, 2):
        with _chunks_per_lane(per_lane):
            t = timed(lambda: be.scatter_device(arena, dest, None, None, pay, st, maxlen=64,
                                                ulen=64, granule_pairs=n, run_bytes=64 * n))
        print(f"scatter ordered, {label:9s}, byte offsets, {per_lane} chunk(s)/thread: "
              f"{n / t / 1e9:6.2f} G runs/s ({2 * n * 64 / t / copy_bw:6.1%} of copy)")


def small_batch_clearing():
    """A batch of 1024 64-byte runs into an 8 GiB arena: runs_post clearing the 16 MiB `seen`
    bitmap whole against walking the runs' words (what scatter_device picks for it)."""
    from mmsb_dist.backend import get_backend

    be = get_backend("cupy")
    arena = cp.zeros(8 << 30, cp.uint8)
    n = 1024
    pay = cp.random.default_rng(5).integers(1, 256, n * 64, dtype=cp.uint8)
    gd = cp.asarray(np.random.default_rng(6).permutation(arena.size // 64)[:n].astype(np.uint32))
    st = be.scatter_state(arena.size)
    for walk in (False, True):
        def once():
            be._launch_granules(arena, pay, gd, 64, st)
            be._launch_post(arena, pay, gd, be._dummy64, be._dummy64, maxlen=64, ulen=64,
                            state=st, walk=walk)
            st.key_base += n
        print(f"1024 runs into an 8 GiB arena, bitmaps cleared "
              f"{'along the runs' if walk else 'whole'}: {timed(once) * 1e6:7.1f} us")


def main():
    rng = cp.random.default_rng(0)
    nbytes = 1 << 30
    src = rng.integers(1, 256, nbytes, dtype=cp.uint8)
    dst = cp.empty_like(src)
    copy_bw = 2 * nbytes / timed(lambda: cp.copyto(dst, src))
    print(f"copy {copy_bw / 1e9:8.1f} GB/s")
    ceiling_variants(copy_bw)
    scatter_variants(copy_bw)
    small_batch_clearing()
    arena = rng.integers(1, 256, nbytes, dtype=cp.uint8)
    payload = rng.integers(1, 256, nbytes, dtype=cp.uint8)
    page = 64 << 10
    npg = nbytes // page
    offs = cp.arange(npg, dtype=cp.int64) * page
    lens = cp.full(npg, page, cp.int64)
    for density, label in ((None, "random bits"), (0xFF, "all ones"), ("runs", "clustered")):
        if density is None:
            masks = rng.integers(0, 256, nbytes // 8, dtype=cp.uint8)
        elif density == 0xFF:
            masks = cp.full(nbytes // 8, 0xFF, cp.uint8)
        else:  # changed 256-byte runs with 25% probability: realistic diff masks
            runs = (rng.random(nbytes // 256) < 0.25).astype(cp.uint8) * 0xFF
            masks = cp.repeat(runs, 32)
        ones = int(cp.unpackbits(masks[: 1 << 20]).sum()) / (8 << 20)
        for cpt in (2, 4):
            mod = cp.RawModule(code=cuda_source(), options=("--std=c++17",
                                                             f"-DCHUNKS_PER_THREAD={cpt}"))
            k = mod.get_function("masked_merge")
            per_block = cpt * 256
            blocks = (page // 16 + per_block - 1) // per_block
            item = cp.repeat(cp.arange(npg, dtype=cp.int64), blocks)
            chunk0 = (cp.arange(item.size, dtype=cp.int64) % blocks) * per_block
            t = timed(lambda: k((int(item.size),), (256,), (arena, payload, masks, offs, offs, lens,
                                                            offs // 8, item, chunk0)))
            # Bytes that must move: masks; payload and arena writes where bits are set; old bytes
            # only where a 16-byte chunk is partly set (random bits: every chunk).
            set_fraction = {"random bits": 1.0, "all ones": 1.0, "clustered": ones}[label]
            old = 1.0 if label == "random bits" else 0.0
            moved = nbytes * (2 * set_fraction + old) + nbytes // 8
            print(f"merge {label:12s} chunks/thread={cpt}: {moved / t / 1e9:8.1f} GB/s "
                  f"({moved / t / copy_bw:6.1%} of copy)")


if __name__ == "__main__":
    main()
