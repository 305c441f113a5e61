// mmsb-dist CUDA kernels. Each one implements the function of the same name in reference.py, which
// is its definition; tests compare the two byte for byte on random inputs.
//
// Compiled at first use through NVRTC (cupy.RawModule), so no host toolchain is needed. All
// positions are 64-bit byte offsets. Memory-bound throughout: 16-byte accesses wherever a range's
// source and destination are 16-byte aligned, byte loops otherwise.

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
// Order inside a batch without sorting: phase A stamps, in every granule a run touches, the largest
// key (key = key_base + run index + 1) with atomicMax. Phase B lets each run write only in granules
// where it is the last toucher; a run that is not the last toucher of a granule checks whether that
// last run covers its bytes there (then they are overwritten anyway); if not, the granule goes on a
// fixup list, and the host re-applies, in order, every run touching a listed granule, clipped to it.
// Aligned writes of whole granules (the common case) never need fixups.

extern "C" __global__ void runs_stamp(const i64* __restrict__ dest, const i64* __restrict__ len,
                                      i64 n, u32 key_base, u32* __restrict__ stamp, int gshift) {
    for (i64 r = blockIdx.x * (i64)blockDim.x + threadIdx.x; r < n; r += (i64)gridDim.x * blockDim.x) {
        i64 d = dest[r];
        i64 g1 = (d + len[r] - 1) >> gshift;
        u32 key = key_base + (u32)r + 1u;
        for (i64 g = d >> gshift; g <= g1; ++g) atomicMax(&stamp[g], key);
    }
}

__device__ __forceinline__ void flag_fixup(i64 g, u8* fixflag, u32* fixcount) {
    // Racing threads may both count one granule; the count only has to be non-zero.
    if (fixflag[g] == 0) {
        fixflag[g] = 1;
        atomicAdd(fixcount, 1u);
    }
}

// One group of `lanes` threads per run; lane k copies 16-byte chunks k, k+lanes, ...
// With `owned` = 0 this is a plain batched copy (destinations known disjoint): copy_runs.
extern "C" __global__ void runs_apply(u8* __restrict__ dst, const u8* __restrict__ src,
                                      const i64* __restrict__ dest, const i64* __restrict__ soff,
                                      const i64* __restrict__ len, i64 n, int lanes_log2,
                                      int owned, u32 key_base, const u32* __restrict__ stamp,
                                      int gshift, u8* fixflag, u32* fixcount) {
    i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    i64 r = t >> lanes_log2;
    if (r >= n) return;
    int lane = (int)(t & ((1 << lanes_log2) - 1));
    int lanes = 1 << lanes_log2;
    i64 d = dest[r], s = soff[r], L = len[r];
    u32 key = key_base + (u32)r + 1u;
    bool vec = ((d | s) & 15) == 0;
    for (i64 c = (i64)lane * 16; c < L; c += (i64)lanes * 16) {
        i64 m = L - c < 16 ? L - c : 16;
        if (!owned) {
            if (vec && m == 16) {
                *(uint4*)(dst + d + c) = *(const uint4*)(src + s + c);
            } else {
                for (i64 i = 0; i < m; ++i) dst[d + c + i] = src[s + c + i];
            }
            continue;
        }
        i64 ga = (d + c) >> gshift, gb = (d + c + m - 1) >> gshift;
        if (vec && m == 16 && ga == gb) {
            u32 w = stamp[ga];
            if (w == key) {
                *(uint4*)(dst + d + c) = *(const uint4*)(src + s + c);
            } else {
                i64 lr = (i64)(w - key_base - 1u);
                i64 ld = dest[lr];
                if (!(ld <= d + c && d + c + 16 <= ld + len[lr])) flag_fixup(ga, fixflag, fixcount);
            }
            continue;
        }
        for (i64 i = 0; i < m; ++i) {
            i64 p = d + c + i;
            i64 g = p >> gshift;
            u32 w = stamp[g];
            if (w == key) {
                dst[p] = src[s + c + i];
            } else {
                i64 lr = (i64)(w - key_base - 1u);
                i64 ld = dest[lr];
                if (!(ld <= p && p < ld + len[lr])) flag_fixup(g, fixflag, fixcount);
            }
        }
    }
}

// Fixup, step 1: list (granule, run) for every run touching a flagged granule.
extern "C" __global__ void runs_fix_pairs(const i64* __restrict__ dest, const i64* __restrict__ len,
                                          i64 n, int gshift, const u8* __restrict__ fixflag,
                                          u64* __restrict__ pairs, u32* __restrict__ npairs) {
    for (i64 r = blockIdx.x * (i64)blockDim.x + threadIdx.x; r < n; r += (i64)gridDim.x * blockDim.x) {
        i64 d = dest[r];
        i64 g1 = (d + len[r] - 1) >> gshift;
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
                                          const i64* __restrict__ len, const u64* __restrict__ pairs,
                                          const i64* __restrict__ group_starts, i64 ngroups,
                                          int gshift, u8* __restrict__ fixflag) {
    i64 k = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (k >= ngroups) return;
    i64 a = group_starts[k], b = group_starts[k + 1];
    i64 g = (i64)(pairs[a] >> 32);
    i64 glo = g << gshift, ghi = (g + 1) << gshift;
    for (i64 j = a; j < b; ++j) {
        i64 r = (i64)(pairs[j] & 0xFFFFFFFFULL);
        i64 d = dest[r], s = soff[r], L = len[r];
        i64 lo = d > glo ? d : glo, hi = d + L < ghi ? d + L : ghi;
        for (i64 p = lo; p < hi; ++p) dst[p] = src[s + (p - d)];
    }
    fixflag[g] = 0;
}

// ---- masked deltas ------------------------------------------------------------------------------
// One thread per 16-byte chunk of a delta; chunk_starts (n+1) maps a global chunk to its delta.
// Deltas in one launch must not overlap (the host splits same-page deltas into waves).

__device__ __forceinline__ i64 find_item(const i64* __restrict__ starts, i64 n, i64 t) {
    i64 lo = 0, hi = n;  // largest i with starts[i] <= t
    while (hi - lo > 1) {
        i64 mid = (lo + hi) >> 1;
        if (starts[mid] <= t) lo = mid; else hi = mid;
    }
    return lo;
}

extern "C" __global__ void masked_merge(u8* __restrict__ arena, const u8* __restrict__ payload,
                                        const u8* __restrict__ masks, const i64* __restrict__ dest,
                                        const i64* __restrict__ soff, const i64* __restrict__ len,
                                        const i64* __restrict__ moff,
                                        const i64* __restrict__ chunk_starts, i64 n, i64 nchunks) {
    i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (t >= nchunks) return;
    i64 i = find_item(chunk_starts, n, t);
    i64 c = (t - chunk_starts[i]) * 16;
    i64 d = dest[i] + c, s = soff[i] + c, L = len[i] - c;
    const u8* mk = masks + moff[i] + c / 8;
    if (L >= 16 && ((d | s) & 15) == 0) {
        u32 bits = (u32)mk[0] | ((u32)mk[1] << 8);
        if (bits == 0) return;
        uint4 p = *(const uint4*)(payload + s);
        if (bits != 0xFFFFu) {
            uint4 a = *(const uint4*)(arena + d);
            u32* pw = (u32*)&p;
            const u32* aw = (const u32*)&a;
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                u32 nib = (bits >> (4 * w)) & 0xFu;
                u32 sel = ((nib & 1u) ? 0x000000FFu : 0u) | ((nib & 2u) ? 0x0000FF00u : 0u) |
                          ((nib & 4u) ? 0x00FF0000u : 0u) | ((nib & 8u) ? 0xFF000000u : 0u);
                pw[w] = (pw[w] & sel) | (aw[w] & ~sel);
            }
        }
        *(uint4*)(arena + d) = p;
        return;
    }
    i64 m = L < 16 ? L : 16;
    for (i64 j = 0; j < m; ++j)
        if ((mk[j >> 3] >> (j & 7)) & 1) arena[d + j] = payload[s + j];
}

// ---- zero ---------------------------------------------------------------------------------------

extern "C" __global__ void runs_zero(u8* __restrict__ arena, const i64* __restrict__ dest,
                                     const i64* __restrict__ len, const i64* __restrict__ chunk_starts,
                                     i64 n, i64 nchunks) {
    i64 t = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (t >= nchunks) return;
    i64 i = find_item(chunk_starts, n, t);
    i64 c = (t - chunk_starts[i]) * 16;
    i64 d = dest[i] + c, L = len[i] - c;
    if (L >= 16 && (d & 15) == 0) {
        *(uint4*)(arena + d) = make_uint4(0, 0, 0, 0);
        return;
    }
    i64 m = L < 16 ? L : 16;
    for (i64 j = 0; j < m; ++j) arena[d + j] = 0;
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
