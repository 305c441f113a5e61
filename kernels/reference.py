"""The NumPy reference that defines every kernel.

Each function here is the specification: the CPU backend (`mmsb_dist._cpu`) and the CUDA kernels
(`kernels/*.cu`) are tested against it on random inputs, byte for byte. Written for clarity over
speed, with plain loops where order is the meaning (last writer wins), and vectorized where it is not.

Conventions shared by all kernels:

* An arena or payload is a flat ``uint8`` array. Positions are absolute byte offsets into it.
* A *run* is ``(dest, src, length)``: ``arena[dest:dest+length] = payload[src:src+length]``.
* A *mask* has one bit per byte, least significant bit first: bit ``j`` of mask byte ``k`` says
  whether byte ``8*k + j`` of the range is taken from the payload. A masked delta of ``length``
  bytes has ``ceil(length / 8)`` mask bytes; the bits past ``length`` are ignored.
* Within one call, runs (and masked deltas) apply in index order: where two overlap, the later one's
  bytes win.
"""

from __future__ import annotations

import numpy as np

U64 = np.uint64
# Hash constants (golden-ratio and xxHash primes; MurmurHash3's fmix64 multipliers).
HASH_P1 = 0x9E3779B97F4A7C15
HASH_P2 = 0xC2B2AE3D27D4EB4F
FMIX_M1 = 0xFF51AFD7ED558CCD
FMIX_M2 = 0xC4CEB9FE1A85EC53


def scatter_runs(arena: np.ndarray, dest, src, lengths, payload: np.ndarray) -> None:
    """Copy each run from ``payload`` into ``arena``, in order (later runs win on overlap)."""
    for d, s, n in zip(np.asarray(dest, np.int64), np.asarray(src, np.int64),
                       np.asarray(lengths, np.int64)):
        arena[d:d + n] = payload[s:s + n]


def merge_masked(arena: np.ndarray, dest, src, lengths, mask_src, payload: np.ndarray,
                 masks: np.ndarray) -> None:
    """For each masked delta, take byte ``i`` from the payload where its mask bit is set; in order."""
    for d, s, n, m in zip(np.asarray(dest, np.int64), np.asarray(src, np.int64),
                          np.asarray(lengths, np.int64), np.asarray(mask_src, np.int64)):
        nmask = (n + 7) // 8
        bits = np.unpackbits(masks[m:m + nmask], bitorder="little")[:n].astype(bool)
        region = arena[d:d + n]
        region[bits] = payload[s:s + n][bits]


def copy_runs(dst: np.ndarray, dst_off, src: np.ndarray, src_off, lengths) -> None:
    """Batched copy between two buffers; the destination ranges must not overlap each other."""
    for d, s, n in zip(np.asarray(dst_off, np.int64), np.asarray(src_off, np.int64),
                       np.asarray(lengths, np.int64)):
        dst[d:d + n] = src[s:s + n]


def zero_runs(arena: np.ndarray, dest, lengths) -> None:
    """Set each range to zero."""
    for d, n in zip(np.asarray(dest, np.int64), np.asarray(lengths, np.int64)):
        arena[d:d + n] = 0


def compare(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The mask of the bytes where ``a`` and ``b`` differ (``ceil(len/8)`` bytes, LSB first)."""
    if a.shape != b.shape:
        raise ValueError("compare needs two ranges of the same length")
    return np.packbits(a != b, bitorder="little")


def fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, on uint64 arrays (arithmetic wraps mod 2**64)."""
    x = np.asarray(x, dtype=U64)
    x = x ^ (x >> U64(33))
    x = x * U64(FMIX_M1)
    x = x ^ (x >> U64(33))
    x = x * U64(FMIX_M2)
    return x ^ (x >> U64(33))


def hash_bytes(data: np.ndarray) -> int:
    """The page hash of one byte range.

    The range is read as little-endian u64 words ``w_0 .. w_{k-1}`` (the last one zero-padded);
    ``h = fmix64( (sum_i fmix64(w_i XOR (i+1)*P1) mod 2**64) XOR n*P2 )`` for a range of ``n`` bytes.
    The sum makes it parallel (any reduction order gives the same value); the per-position key makes
    it order-sensitive; the length term separates ranges that differ only by trailing zeros.
    It detects accidental divergence between replicas; it is not a cryptographic hash.
    """
    n = int(data.size)
    k = (n + 7) // 8
    padded = np.zeros(k * 8, dtype=np.uint8)
    padded[:n] = data
    words = padded.view("<u8").astype(U64)
    keys = np.arange(1, k + 1, dtype=U64) * U64(HASH_P1)
    acc = fmix64(words ^ keys).sum(dtype=U64)
    tail = np.array([n], dtype=U64) * U64(HASH_P2)  # array arithmetic wraps without warnings
    return int(fmix64(np.array([acc], dtype=U64) ^ tail)[0])


def page_hash(arena: np.ndarray, offsets, lengths) -> np.ndarray:
    """The hash of each range ``arena[offset:offset+length]``."""
    return np.array([hash_bytes(arena[o:o + n]) for o, n in
                     zip(np.asarray(offsets, np.int64), np.asarray(lengths, np.int64))], dtype=U64)


def combine_page_hashes(page_ids, hashes) -> int:
    """A state hash over a set of pages: order-independent, so shards and replicas agree however
    their page tables are laid out. ``sum_p fmix64(fmix64(id_p) XOR hash_p) mod 2**64``."""
    ids = np.asarray(page_ids, dtype=U64)
    hs = np.asarray(hashes, dtype=U64)
    return int(fmix64(fmix64(ids) ^ hs).sum(dtype=U64))
