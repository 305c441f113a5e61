// mmsb-dist CUDA kernels. Each one implements the function of the same name in reference.py, which
// is its definition; tests compare the two byte for byte on random inputs.
//
// Compiled at first use through NVRTC (cupy.RawModule), so no host toolchain is needed. All
// positions are 64-bit byte offsets. Memory-bound throughout: 16-byte accesses wherever a range's
// source and destination are 16-byte aligned, byte loops otherwise.

#ifdef MMSB_COOP  // the cooperative module: runs_post alone (see below)
#include <cooperative_groups.h>
#endif

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef unsigned char u8;

#define HASH_P1 0x9E3779B97F4A7C15ULL
#define HASH_P2 0xC2B2AE3D27D4EB4FULL

__device__ __forceinline__ u64 fmix64(u64 x) {
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDULL;
    x ^= x >> 33;
    x *= 0xC4CEB9FE1A85EC53ULL;
    x ^= x >> 33;
    return x;
}

// ---- runs ---------------------------------------------------------------------------------------
// Keeping batch order (later runs win) without sorting, optimistically:
//   pass 1 (runs_apply, mode 1; runs_granules for `gidx` runs): every run writes all its bytes
//          (a `gidx` run skips the granules it finds touched already: pass 3 rewrites those
//          whole) and marks, with atomicOr, a `seen` bit for each granule it touches; a run that
//          finds the bit already set marks the granule in `conf` and raises a `conf_flags` word
//          (one of CONF_FLAG_WORDS, picked by block: a flag that every warp with a collision
//          stored to would serialize them all). Both bitmaps (1 bit per granule) stay in L2.
//          Bytes in granules that only one run touched are final after this pass: in most
//          batches, all. runs_apply's lanes issue their first mark before their copy and look
//          at the answer after it; runs_granules' before loading their chunk, and look at it
//          before storing the chunk: the round trips overlap either way. runs_granules takes
//          its blocks from the batch's end, so a granule's first toucher in time is, nearly
//          always, its last in batch order (the later runs are a wave or more ahead), and the
//          bytes it stored are final; a bit per run in `skipped` records the runs that skipped a
//          granule.
//   passes 2 and 3 (runs_post, one cooperative launch after pass 1; every batch): unless a conf
//          flag is up, it only clears `seen`, and nothing else is left to clear (the usual case).
//          Else, pass 2: in `conf` granules each run records its stamp, (key << 1) | first, with
//          key = key_base + index + 1 and `first` set for a `gidx` run that skipped nothing in
//          pass 1 (so it stored every granule it touched), with atomicMax: the largest stamp is
//          the last toucher's; the runs doing so are listed and counted in counters[1]. For
//          `gidx` runs in a bitmap cleared whole, the stamps are compact (rank_conflicts): the
//          i-th conflicted granule of the arena has stamp[i], so that they stay in L2. A
//          grid-wide barrier, then pass 3 (apply_run, mode 2) over the listed runs (`gidx`
//          runs: over the `conf` granules, unlisted, rewrite_granules, which leaves the granules
//          whose last toucher was `first`: their bytes are final): in `conf` granules the last
//          toucher rewrites its bytes. A run that is not
//          the last toucher checks whether the last one covers its bytes there (then they are
//          right already); if not, the granule is flagged, and the host replays, in order, every
//          run touching a flagged granule, clipped to it (runs_fix_*). A last barrier, then
//          `conf`, the flags and the listed count are cleared. Whole-granule writes never need
//          the fixup, so for them the host never waits for the device: every decision is taken
//          on the device, and a batch is two launches.
// Runs come as dest[] plus either per-run soff[]/len[] or one uniform length (soff = r * len).
// dest[] holds byte offsets (i64), or granule numbers (u32; `gidx`) when every run is a uniform,
// granule-aligned run of whole granules: then pass 1 is runs_granules, a thread per 16-byte chunk
// with nothing to decide, and the index is half the size.

#define CONF_FLAG_WORDS 1024  // as _CONF_FLAG_WORDS in _gpu.py
#define MAX_SEGMENTS 2048  // as _MAX_SEGMENTS in _gpu.py: compact stamps, rank_conflicts
#define RUN_LEN(r) (ulen ? ulen : len[r])
#define RUN_SRC(r) (ulen ? (r) * ulen : soff[r])

__device__ __forceinline__ bool bit_of(const u32* __restrict__ bits, i64 g) {
    return (bits[g >> 5] >> (g & 31)) & 1u;
}

// Run r's first byte in the arena.
__device__ __forceinline__ i64 dest_of(const void* __restrict__ dest, int gidx, int gshift, i64 r) {
    return gidx ? (i64)__ldg((const u32*)dest + r) << gshift : __ldg((const i64*)dest + r);
}

// Pass 1, given the old `seen` word of granule g: if the granule was touched before, marks it in
// `conf` and returns true.
__device__ __forceinline__ bool collided_at(i64 g, u32 old, u32* __restrict__ conf) {
    u32 bit = 1u << (g & 31);
    if (!(old & bit)) return false;
    atomicOr(&conf[g >> 5], bit);
    return true;
}

// One store per warp that saw a collision, to its block's flag word. Every lane of the warp calls;
// the lane that stores gets the warp's ballot of `collided`, the others 0.
__device__ __forceinline__ u32 raise_conf_flag(bool collided, u32* __restrict__ conf_flags) {
    u32 voters = __ballot_sync(__activemask(), collided);
    if (!voters || (threadIdx.x & 31) != __ffs(voters) - 1) return 0u;
    conf_flags[blockIdx.x & (CONF_FLAG_WORDS - 1)] = 1u;
    return voters;
}

// Pass 1 (mode 1), or a plain copy (mode 0), of `gidx` runs: uniform runs of 2^cpr_log2 16-byte
// chunks, each at a granule-aligned place, so chunk t of the batch is payload chunk t. One thread
// per chunk; the thread on a granule's first chunk marks it, loading its chunk meanwhile, and tells
// the granule's other threads the answer: a run that finds the granule touched already skips its
// copy there (pass 3 rewrites every conflicted granule whole, from its last toucher, unless that
// run skipped nothing), so each granule is written once in this pass. Block b takes the batch's
// b-th last piece: blocks start in about the order of their index, so for two runs a wave or
// more apart (nearly every colliding pair of a big batch) the later one stores its bytes and the
// earlier one skips, and the granule is final. A warp with a skip sets the skipping runs' bits
// in `skipped` (its runs share a word).
extern "C" __global__ void runs_granules(uint4* __restrict__ dst, const uint4* __restrict__ src,
                                         const u32* __restrict__ gdest, i64 n, int cpr_log2,
                                         int mode, u32* __restrict__ seen, u32* __restrict__ conf,
                                         u32* __restrict__ conf_flags, int gshift,
                                         u32* __restrict__ skipped) {
    i64 t = ((i64)gridDim.x - 1 - blockIdx.x) * blockDim.x + threadIdx.x;
    bool in = (t >> cpr_log2) < n, collided = false;
    i64 p = 0;
    uint4 v;
    if (in) {
        p = ((i64)gdest[t >> cpr_log2] << gshift) + (t & ((1 << cpr_log2) - 1)) * 16;
        i64 g = p >> gshift;
        bool marks = mode == 1 && (p & ((1 << gshift) - 1)) == 0;
        u32 old = marks ? atomicOr(&seen[g >> 5], 1u << (g & 31)) : 0u;
        v = src[t];
        collided = marks && collided_at(g, old, conf);
    }
    // A granule's 2^(gshift-4) chunks are consecutive lanes of one warp, the first one marking.
    int lead = (threadIdx.x & 31) & ~((1 << (gshift - 4)) - 1);
    bool skip = __shfl_sync(0xFFFFFFFFu, collided, lead);
    if (in && !skip) dst[p >> 4] = v;
    u32 voters = raise_conf_flag(collided, conf_flags);
    if (voters) {
        i64 t0 = t - (threadIdx.x & 31);  // the warp's first thread
        u32 bits = 0;
        for (; voters; voters &= voters - 1u)
            bits |= 1u << (((t0 + __ffs(voters) - 1) >> cpr_log2) & 31);
        atomicOr(&skipped[(t0 >> cpr_log2) >> 5], bits);
    }
}

// Stamps: (key << 1) | first, key = key_base + run + 1 (31 bits; the host clears the stamps
// before they would wrap), so the largest stamp is the last toucher's.
__device__ __forceinline__ u32 stamp_of(u32 key_base, i64 r, u32 first) {
    return ((key_base + (u32)r + 1u) << 1) | first;
}

__device__ __forceinline__ i64 run_of(u32 stamp, u32 key_base) {
    return (i64)((stamp >> 1) - key_base - 1u);
}

// Where a conflicted granule's stamp is: stamp[g], or with compact stamps (`compact`) its rank
// among the arena's conflicted granules: base[w] (rank_conflicts) + boff[w's segment]
// (segment_offsets) for the first conflicted granule of `conf` word w, then one more per bit.
struct StampIndex {
    int compact;
    const u32* base;
    const u32* boff;  // shared memory
    int seg_log2;

    // The first conflicted granule of word w (compact stamps only).
    __device__ __forceinline__ i64 word(i64 w) const {
        return (i64)base[w] + boff[w >> seg_log2];
    }
    // Granule g's, given its `conf` word cw.
    __device__ __forceinline__ i64 of(i64 g, u32 cw) const {
        return compact ? word(g >> 5) + __popc(cw & ((1u << (g & 31)) - 1u)) : g;
    }
};

// Pass 2: every thread of the grid calls (the loop's barriers are per block). `gidx` runs are not
// listed: their pass 3 goes by conflicted granule (rewrite_granules).
__device__ __forceinline__ void stamp_runs(const void* __restrict__ dest, int gidx,
                                           const i64* __restrict__ len, i64 ulen, i64 n,
                                           u32 key_base, u32* __restrict__ stamp,
                                           const u32* __restrict__ conf, u32* __restrict__ counters,
                                           u32* __restrict__ conf_runs, int gshift,
                                           const u32* __restrict__ skipped, StampIndex at) {
    __shared__ u32 block_hits, block_base;
    // The loop bound is the same for every thread of a block (the barriers need that).
    for (i64 r0 = blockIdx.x * (i64)blockDim.x; r0 < n; r0 += (i64)gridDim.x * blockDim.x) {
        i64 r = r0 + threadIdx.x;
        bool hit = false;
        if (r < n) {
            i64 d = dest_of(dest, gidx, gshift, r);
            i64 g1 = (d + RUN_LEN(r) - 1) >> gshift;
            u32 first = gidx ? ~(skipped[r >> 5] >> (r & 31)) & 1u : 0u;
            u32 mine = stamp_of(key_base, r, first);
            for (i64 g = d >> gshift; g <= g1; ++g) {
                u32 cw = conf[g >> 5];
                if ((cw >> (g & 31)) & 1u) {
                    atomicMax(&stamp[at.of(g, cw)], mine);
                    hit = true;
                }
            }
        }
        if (gidx) continue;  // the same for the whole grid
        // List the runs that touch a conflicted granule (pass 3 visits only these), with one
        // global atomicAdd per block: adds on one address serialize.
        if (threadIdx.x == 0) block_hits = 0;
        __syncthreads();
        u32 slot = hit ? atomicAdd(&block_hits, 1u) : 0u;
        __syncthreads();
        if (threadIdx.x == 0 && block_hits) block_base = atomicAdd(&counters[1], block_hits);
        __syncthreads();
        if (hit) conf_runs[block_base + slot] = (u32)r;
        __syncthreads();
    }
}

__device__ __forceinline__ void flag_fixup(i64 g, u8* fixflag, u32* fixcount) {
    // Racing threads may both count one granule; the count only has to be non-zero.
    if (fixflag[g] == 0) {
        fixflag[g] = 1;
        atomicAdd(fixcount, 1u);
    }
}

// Pass 3: may run r (key; its stamp is key << 1) write bytes [p, p+m) of conflicted granule g? If
// not, and the last toucher does not cover them, flag the granule.
__device__ __forceinline__ bool owns(i64 g, i64 p, i64 m, u32 key, u32 key_base,
                                     const u32* __restrict__ stamp, const i64* __restrict__ dest,
                                     const i64* __restrict__ len, i64 ulen, u8* fixflag,
                                     u32* fixcount) {
    u32 w = stamp[g];  // byte-offset runs: full stamps, `first` never set
    if (w == key << 1) return true;
    i64 lr = run_of(w, key_base);
    i64 ld = __ldg(dest + lr);
    if (!(ld <= p && p + m <= ld + RUN_LEN(lr))) flag_fixup(g, fixflag, fixcount);
    return false;
}

// May this pass write bytes [p, p+m), all inside granule g?
__device__ __forceinline__ bool may_write(int mode, i64 g, i64 p, i64 m, u32 key, u32 key_base,
                                          const u32* __restrict__ stamp,
                                          const u32* __restrict__ conf,
                                          const i64* __restrict__ dest,
                                          const i64* __restrict__ len, i64 ulen, u8* fixflag,
                                          u32* fixcount) {
    if (mode != 2) return true;
    return bit_of(conf, g) && owns(g, p, m, key, key_base, stamp, dest, len, ulen, fixflag,
                                   fixcount);
}

// One group of `lanes` threads per run (dest[]: byte offsets; granule-numbered runs have kernels of
// their own); lane k copies 16-byte chunks k, k+lanes, ...
// mode 0: plain batched copy (destinations known disjoint: copy_runs); 1: pass 1; 2: pass 3 (from
// runs_post). counters = [fixups, listed runs].
__device__ __forceinline__ void apply_run(
    i64 r, int lane, int lanes, u8* __restrict__ dst, const u8* __restrict__ src,
    const i64* __restrict__ dest, const i64* __restrict__ soff,
    const i64* __restrict__ len, i64 ulen, int mode, u32 key_base, const u32* __restrict__ stamp,
    u32* __restrict__ seen, u32* __restrict__ conf, u32* __restrict__ counters, int gshift,
    u8* fixflag, u32* __restrict__ conf_flags) {
    u32* fixcount = counters;
    i64 d = __ldg(dest + r), s = RUN_SRC(r), L = RUN_LEN(r);
    u32 key = key_base + (u32)r + 1u;
    i64 g0 = (d >> gshift) + lane, glast = (d + L - 1) >> gshift;
    u32 old0 = 0;
    if (mode == 1 && g0 <= glast) old0 = atomicOr(&seen[g0 >> 5], 1u << (g0 & 31));  // read below
    bool vec = (((u64)(dst + d) | (u64)(src + s)) & 15) == 0;  // a payload view may be unaligned
    for (i64 c = (i64)lane * 16; c < L; c += (i64)lanes * 16) {
        i64 m = L - c < 16 ? L - c : 16;
        i64 ga = (d + c) >> gshift, gb = (d + c + m - 1) >> gshift;
        if (vec && m == 16 && ga == gb) {
            if (may_write(mode, ga, d + c, 16, key, key_base, stamp, conf, dest, len, ulen,
                          fixflag, fixcount))
                *(uint4*)(dst + d + c) = *(const uint4*)(src + s + c);
            continue;
        }
        for (i64 i = 0; i < m; ++i) {
            i64 p = d + c + i;
            if (may_write(mode, p >> gshift, p, 1, key, key_base, stamp, conf, dest, len, ulen,
                          fixflag, fixcount))
                dst[p] = src[s + c + i];
        }
    }
    if (mode != 1) return;
    bool collided = false;
    for (i64 g = g0; g <= glast; g += lanes) {
        u32 old = g == g0 ? old0 : atomicOr(&seen[g >> 5], 1u << (g & 31));
        collided |= collided_at(g, old, conf);
    }
    raise_conf_flag(collided, conf_flags);
}

extern "C" __global__ void runs_apply(u8* __restrict__ dst, const u8* __restrict__ src,
                                      const i64* __restrict__ dest,
                                      const i64* __restrict__ soff,
                                      const i64* __restrict__ len, i64 ulen, i64 n, int lanes_log2,
                                      int mode, u32 key_base, const u32* __restrict__ stamp,
                                      u32* __restrict__ seen, u32* __restrict__ conf,
                                      u32* __restrict__ counters, int gshift, u8* fixflag,
                                      u32* __restrict__ conf_flags) {
    int lanes = 1 << lanes_log2;
    i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if ((t >> lanes_log2) < n)
        apply_run(t >> lanes_log2, (int)(t & (lanes - 1)), lanes, dst, src, dest, soff, len,
                  ulen, mode, key_base, stamp, seen, conf, counters, gshift, fixflag, conf_flags);
}

#ifdef MMSB_COOP
// Pass 3 of `gidx` runs, by conflicted granule rather than by run: whole granules of uniform runs
// from an aligned payload, so the last toucher, read from the granule's stamp, rewrites all of it,
// 16 bytes at a time, unless it skipped nothing in pass 1 (then it stored these bytes, and no
// other run did). A thread per `conf` word.
__device__ __forceinline__ void rewrite_granules(u8* __restrict__ dst, const u8* __restrict__ src,
                                                 const u32* __restrict__ gdest, i64 ulen,
                                                 u32 key_base, const u32* __restrict__ stamp,
                                                 const u32* __restrict__ conf, i64 words,
                                                 int gshift, StampIndex at) {
    i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 w = blockIdx.x * (i64)blockDim.x + threadIdx.x; w < words; w += stride) {
        u32 bits = conf[w];
        if (!bits) continue;
        // Compact stamps: the word's conflicted granules have consecutive ones.
        i64 slot = at.compact ? at.word(w) : 0;
        for (; bits; bits &= bits - 1u, ++slot) {
            i64 g = w * 32 + __ffs(bits) - 1;
            u32 last = stamp[at.compact ? slot : g];
            if (last & 1u) continue;  // stored by its last toucher in pass 1
            i64 r = run_of(last, key_base);
            // The granule's place in run r (a run of one granule: none, and no index to read).
            i64 within = ulen >> gshift == 1 ? 0 : (g - (i64)__ldg(gdest + r)) << gshift;
            const uint4* from = (const uint4*)(src + r * ulen + within);
            uint4* to = (uint4*)(dst + (g << gshift));
            for (int c = 0; c < (1 << (gshift - 4)); ++c) to[c] = from[c];
        }
    }
}

// Inclusive prefix sum of x over the block's threads, in thread order; *total gets the block's
// sum. Every thread of the block calls.
__device__ __forceinline__ u32 block_scan(u32 x, u32* total) {
    __shared__ u32 warp_sums[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int o = 1; o < 32; o <<= 1) {
        u32 y = __shfl_up_sync(0xFFFFFFFFu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        u32 w = lane < warps ? warp_sums[lane] : 0u;
        for (int o = 1; o < 32; o <<= 1) {
            u32 y = __shfl_up_sync(0xFFFFFFFFu, w, o);
            if (lane >= o) w += y;
        }
        warp_sums[lane] = w;
    }
    __syncthreads();
    u32 before = warp ? warp_sums[warp - 1] : 0u;
    *total = warp_sums[warps - 1];
    __syncthreads();  // warp_sums is the next call's
    return x + before;
}

// Compact stamps, step 1 (every thread calls): block b counts the conflicted granules of the
// `conf` words [b << seg_log2, (b + 1) << seg_log2), its segment: base[w] = how many of them lie
// in the segment's words before w, block_sums[b] = all of them.
__device__ __forceinline__ void rank_conflicts(const u32* __restrict__ conf, i64 words,
                                               int seg_log2, u32* __restrict__ base,
                                               u32* __restrict__ block_sums) {
    i64 lo = (i64)blockIdx.x << seg_log2;
    i64 hi = lo + ((i64)1 << seg_log2) < words ? lo + ((i64)1 << seg_log2) : words;
    u32 before = 0, total;
    for (i64 w0 = lo; w0 < hi; w0 += blockDim.x) {  // the same bounds for the whole block
        i64 w = w0 + threadIdx.x;
        u32 c = w < hi ? __popc(conf[w]) : 0u;
        u32 upto = block_scan(c, &total);
        if (w < hi) base[w] = before + upto - c;
        before += total;
    }
    if (threadIdx.x == 0 && lo < words) block_sums[blockIdx.x] = before;
}

// Step 2, after a grid barrier, in every block: boff[s] = the conflicted granules of the segments
// before segment s, in shared memory. Stamp i belongs to the i-th conflicted granule of the arena.
__device__ __forceinline__ void segment_offsets(const u32* __restrict__ block_sums, i64 segs,
                                                u32* boff) {
    i64 per = (segs + blockDim.x - 1) / blockDim.x, s0 = threadIdx.x * per;
    i64 s1 = s0 + per < segs ? s0 + per : segs;
    u32 sum = 0, total;
    for (i64 s = s0; s < s1; ++s) sum += block_sums[s];
    u32 at = block_scan(sum, &total) - sum;
    for (i64 s = s0; s < s1; ++s) {
        boff[s] = at;
        at += block_sums[s];
    }
    __syncthreads();
}

// Zeroes what the batch's runs can have set in a bitmap of `words` words (1 bit per granule): all
// of it, or, with `walk` (few runs in a big arena), the words of the granules each run touches.
__device__ __forceinline__ void clear_marks(u32* __restrict__ bits, i64 words, int walk,
                                            const void* __restrict__ dest, int gidx,
                                            const i64* __restrict__ len, i64 ulen, i64 n,
                                            int gshift) {
    i64 tid = blockIdx.x * (i64)blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    if (!walk) {
        for (i64 w = tid; w < words; w += stride) bits[w] = 0u;
        return;
    }
    for (i64 r = tid; r < n; r += stride) {
        i64 d = dest_of(dest, gidx, gshift, r);
        for (i64 w = d >> gshift >> 5; w <= (d + RUN_LEN(r) - 1) >> gshift >> 5; ++w) bits[w] = 0u;
    }
}

// Passes 2 and 3 and the clearing after pass 1 (see the top of this section), in one cooperative
// launch: a grid that fits on the device at once, so that grid.sync() can wait for all of it.
// Threads stride over every loop. `words`: the length of `seen` and of `conf`; `walk`: clear
// them by walking the runs (clear_marks). `compact` (`gidx` runs, no `walk`): stamps by rank
// among the conflicted granules, in segments of 2^seg_log2 `conf` words, one per block at most
// (`base`: a word per `conf` word; `block_sums`: a word per block).
extern "C" __global__ void runs_post(
    u8* __restrict__ dst, const u8* __restrict__ src, const void* __restrict__ dest, int gidx,
    const i64* __restrict__ soff, const i64* __restrict__ len, i64 ulen, i64 n, int lanes_log2,
    u32 key_base, u32* __restrict__ stamp, u32* __restrict__ seen, u32* __restrict__ conf,
    i64 words, int walk, u32* __restrict__ counters, u32* __restrict__ conf_runs, int gshift,
    u8* fixflag, u32* __restrict__ conf_flags, u32* __restrict__ skipped, int compact,
    u32* __restrict__ base, u32* __restrict__ block_sums, int seg_log2) {
    __shared__ u32 boff[MAX_SEGMENTS];
    cooperative_groups::grid_group grid = cooperative_groups::this_grid();
    i64 tid = blockIdx.x * (i64)blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    clear_marks(seen, words, walk, dest, gidx, len, ulen, n, gshift);  // nothing below reads it
    u32 raised = 0;
    for (int w = threadIdx.x; w < CONF_FLAG_WORDS; w += blockDim.x) raised |= conf_flags[w];
    // Every block reads the same flags, so every block returns here or none does (grid.sync()
    // needs all). Nothing collided: `conf`, the flags and the counters are all still zero.
    if (!__syncthreads_or(raised)) return;
    StampIndex at = {compact, base, boff, seg_log2};
    if (compact) {
        rank_conflicts(conf, words, seg_log2, base, block_sums);
        grid.sync();
        segment_offsets(block_sums, (words + ((i64)1 << seg_log2) - 1) >> seg_log2, boff);
    }
    stamp_runs(dest, gidx, len, ulen, n, key_base, stamp, conf, counters, conf_runs, gshift,
               skipped, at);
    grid.sync();
    if (gidx) {
        rewrite_granules(dst, src, (const u32*)dest, ulen, key_base, stamp, conf, words, gshift,
                         at);
        for (i64 w = tid; w < (n + 31) >> 5; w += stride) skipped[w] = 0u;  // read by pass 2 only
    } else {
        i64 listed = counters[1];
        int lanes = 1 << lanes_log2;
        for (i64 t = tid; (t >> lanes_log2) < listed; t += stride)
            apply_run(conf_runs[t >> lanes_log2], (int)(t & (lanes - 1)), lanes, dst, src,
                      (const i64*)dest, soff, len, ulen, 2, key_base, stamp, seen, conf, counters,
                      gshift, fixflag, conf_flags);
    }
    grid.sync();
    clear_marks(conf, words, walk, dest, gidx, len, ulen, n, gshift);
    for (i64 w = tid; w < CONF_FLAG_WORDS; w += stride) conf_flags[w] = 0u;
    if (tid == 0) counters[1] = 0u;  // counters[0], the fixup count, is the host's to read
}
#endif

// Fixup, step 1: list (granule, run) for every run touching a flagged granule.
extern "C" __global__ void runs_fix_pairs(const i64* __restrict__ dest, const i64* __restrict__ len,
                                          i64 ulen, i64 n, int gshift,
                                          const u8* __restrict__ fixflag, u64* __restrict__ pairs,
                                          u32* __restrict__ npairs) {
    for (i64 r = blockIdx.x * (i64)blockDim.x + threadIdx.x; r < n; r += (i64)gridDim.x * blockDim.x) {
        i64 d = dest[r];
        i64 g1 = (d + RUN_LEN(r) - 1) >> gshift;
        for (i64 g = d >> gshift; g <= g1; ++g) {
            if (fixflag[g]) {
                u32 at = atomicAdd(npairs, 1u);
                pairs[at] = ((u64)g << 32) | (u64)r;  // sorts by granule, then run order
            }
        }
    }
}

// Fixup, step 2: one thread per flagged granule replays its runs in order, clipped to the granule.
extern "C" __global__ void runs_fix_apply(u8* __restrict__ dst, const u8* __restrict__ src,
                                          const i64* __restrict__ dest, const i64* __restrict__ soff,
                                          const i64* __restrict__ len, i64 ulen,
                                          const u64* __restrict__ pairs,
                                          const i64* __restrict__ group_starts, i64 ngroups,
                                          int gshift, u8* __restrict__ fixflag) {
    i64 k = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (k >= ngroups) return;
    i64 a = group_starts[k], b = group_starts[k + 1];
    i64 g = (i64)(pairs[a] >> 32);
    i64 glo = g << gshift, ghi = (g + 1) << gshift;
    for (i64 j = a; j < b; ++j) {
        i64 r = (i64)(pairs[j] & 0xFFFFFFFFULL);
        i64 d = dest[r], s = RUN_SRC(r), L = RUN_LEN(r);
        i64 lo = d > glo ? d : glo, hi = d + L < ghi ? d + L : ghi;
        for (i64 p = lo; p < hi; ++p) dst[p] = src[s + (p - d)];
    }
    fixflag[g] = 0;
}

// ---- masked deltas and zeroing --------------------------------------------------------------------
// A block table maps each block to (item, first 16-byte chunk): block b covers chunks
// chunk0[b] + [0, CHUNKS_PER_THREAD * blockDim.x) of item[b], thread-contiguous per step so that
// accesses coalesce. Masked deltas in one launch must not overlap (the host splits same-page
// deltas into waves).

#ifndef CHUNKS_PER_THREAD
#define CHUNKS_PER_THREAD 4
#endif

__device__ __forceinline__ uint4 blend16(uint4 p, uint4 a, u32 bits) {
    u32* pw = (u32*)&p;
    const u32* aw = (const u32*)&a;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        u32 nib = (bits >> (4 * w)) & 0xFu;
        u32 sel = ((nib & 1u) ? 0x000000FFu : 0u) | ((nib & 2u) ? 0x0000FF00u : 0u) |
                  ((nib & 4u) ? 0x00FF0000u : 0u) | ((nib & 8u) ? 0xFF000000u : 0u);
        pw[w] = (pw[w] & sel) | (aw[w] & ~sel);
    }
    return p;
}

extern "C" __global__ void masked_merge(u8* __restrict__ arena, const u8* __restrict__ payload,
                                        const u8* __restrict__ masks, const i64* __restrict__ dest,
                                        const i64* __restrict__ soff, const i64* __restrict__ len,
                                        const i64* __restrict__ moff,
                                        const i64* __restrict__ block_item,
                                        const i64* __restrict__ block_chunk0) {
    i64 i = block_item[blockIdx.x];
    i64 L = len[i];
    i64 d0 = dest[i], s0 = soff[i];
    const u8* mk0 = masks + moff[i];
    i64 cbase = block_chunk0[blockIdx.x] * 16 + (i64)threadIdx.x * 16;
    i64 step = (i64)blockDim.x * 16;
    if ((((u64)(arena + d0) | (u64)(payload + s0)) & 15) == 0 &&  // views may be unaligned
        cbase + (CHUNKS_PER_THREAD - 1) * step + 16 <= L) {
        // Fast path: every chunk of this thread is whole and aligned. Masks first, then every
        // load the masks call for (the payload unless all bits are 0, the old bytes unless all are
        // 1) before any store, to keep many bytes in flight.
        u32 bits[CHUNKS_PER_THREAD];
        uint4 p[CHUNKS_PER_THREAD], a[CHUNKS_PER_THREAD];
#pragma unroll
        for (int k = 0; k < CHUNKS_PER_THREAD; ++k) {
            i64 c = cbase + k * step;
            bits[k] = (u32)mk0[c / 8] | ((u32)mk0[c / 8 + 1] << 8);
        }
#pragma unroll
        for (int k = 0; k < CHUNKS_PER_THREAD; ++k) {
            i64 c = cbase + k * step;
            p[k] = bits[k] ? *(const uint4*)(payload + s0 + c) : make_uint4(0, 0, 0, 0);
            a[k] = (bits[k] && bits[k] != 0xFFFFu) ? *(const uint4*)(arena + d0 + c)
                                                    : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int k = 0; k < CHUNKS_PER_THREAD; ++k)
            if (bits[k]) *(uint4*)(arena + d0 + cbase + k * step) = blend16(p[k], a[k], bits[k]);
        return;
    }
    for (int k = 0; k < CHUNKS_PER_THREAD; ++k) {
        i64 c = cbase + k * step;
        if (c >= L) break;
        i64 m = L - c < 16 ? L - c : 16;
        const u8* mk = mk0 + c / 8;
        for (i64 j = 0; j < m; ++j)
            if ((mk[j >> 3] >> (j & 7)) & 1) arena[d0 + c + j] = payload[s0 + c + j];
    }
}

extern "C" __global__ void runs_zero(u8* __restrict__ arena, const i64* __restrict__ dest,
                                     const i64* __restrict__ len, const i64* __restrict__ block_item,
                                     const i64* __restrict__ block_chunk0) {
    i64 i = block_item[blockIdx.x];
    i64 L = len[i], d0 = dest[i];
#pragma unroll
    for (int k = 0; k < CHUNKS_PER_THREAD; ++k) {
        i64 c = (block_chunk0[blockIdx.x] + (i64)k * blockDim.x + threadIdx.x) * 16;
        if (c >= L) break;
        i64 d = d0 + c;
        if (L - c >= 16 && ((u64)(arena + d) & 15) == 0) {
            *(uint4*)(arena + d) = make_uint4(0, 0, 0, 0);
            continue;
        }
        i64 m = L - c < 16 ? L - c : 16;
        for (i64 j = 0; j < m; ++j) arena[d + j] = 0;
    }
}

// ---- compare -> mask ----------------------------------------------------------------------------
// Thread k compares bytes [16k, 16k+16) and writes mask bytes 2k, 2k+1.

extern "C" __global__ void compare_mask(const u8* __restrict__ a, const u8* __restrict__ b, i64 n,
                                        u8* __restrict__ out) {
    i64 k = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    i64 c = k * 16;
    if (c >= n) return;
    u32 bits = 0;
    if (c + 16 <= n && (((u64)a | (u64)b) & 15) == 0) {
        uint4 x = *(const uint4*)(a + c), y = *(const uint4*)(b + c);
        const u32* xw = (const u32*)&x;
        const u32* yw = (const u32*)&y;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            u32 diff = xw[w] ^ yw[w];
#pragma unroll
            for (int j = 0; j < 4; ++j)
                if ((diff >> (8 * j)) & 0xFFu) bits |= 1u << (4 * w + j);
        }
    } else {
        i64 m = n - c < 16 ? n - c : 16;
        for (i64 j = 0; j < m; ++j)
            if (a[c + j] != b[c + j]) bits |= 1u << j;
    }
    out[2 * k] = (u8)(bits & 0xFFu);
    if (c + 8 < n) out[2 * k + 1] = (u8)(bits >> 8);
}

// ---- page hash ----------------------------------------------------------------------------------
// One warp per page: lanes sum fmix64(word ^ (i+1)*P1) over the page's words, the warp reduces,
// lane 0 finalizes. Sums are mod 2^64, so the value does not depend on the reduction order.

__device__ __forceinline__ u64 load_word(const u8* p, i64 nbytes, bool aligned) {
    if (aligned && nbytes >= 8) return *(const u64*)p;
    u64 w = 0;
    for (i64 j = 0; j < nbytes && j < 8; ++j) w |= (u64)p[j] << (8 * j);
    return w;
}

extern "C" __global__ void page_hash(const u8* __restrict__ arena, const i64* __restrict__ offs,
                                     const i64* __restrict__ lens, i64 n, u64* __restrict__ out) {
    i64 warp = (blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= n) return;
    const u8* base = arena + offs[warp];
    i64 L = lens[warp];
    i64 words = (L + 7) >> 3;
    bool aligned = (((u64)base) & 7) == 0;
    u64 acc = 0;
    for (i64 w = lane; w < words; w += 32) {
        u64 word = load_word(base + 8 * w, L - 8 * w, aligned);
        acc += fmix64(word ^ ((u64)(w + 1) * HASH_P1));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xFFFFFFFFu, acc, o);
    if (lane == 0) out[warp] = fmix64(acc ^ ((u64)L * HASH_P2));
}
