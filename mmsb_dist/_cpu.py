"""CPU kernels: compiled (numba) implementations of ``kernels/reference.py``, plus the open-addressing
hash index that maps page ids to page-table slots.

Every function here has the exact meaning of its namesake in the reference and is tested against it
byte for byte. They take flat ``uint8`` arrays and ``int64``/``uint64`` index arrays; no Python runs
per delta. ``nogil=True`` lets a shard apply one batch while another thread writes the log.
"""

from __future__ import annotations

import contextlib
import os
import threading

# numba runs prange loops on OpenMP threads where libgomp is available. GNU OpenMP's default is to
# spin for a while after each parallel region; a shard calls the threaded scatter every few ms, so its
# idle threads would spin between batches and take the cores that Ray's I/O threads, the log's fsync
# and the client need (measured: a shard used 2x the CPU time per 10k-delta batch of 64-byte runs).
# Passive threads sleep instead. Read once, when OpenMP starts: set before the first kernel.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from mmsb_dist.kernels.reference import FMIX_M1, FMIX_M2, HASH_P1, HASH_P2

_M1 = np.uint64(FMIX_M1)
_M2 = np.uint64(FMIX_M2)
_P1 = np.uint64(HASH_P1)
_P2 = np.uint64(HASH_P2)
_S33 = np.uint64(33)
EMPTY_KEY = np.uint64(0xFFFFFFFFFFFFFFFF)  # reserved: no page may have this id

def _cache_dir() -> str:
    """Where compiled kernels are cached: $NUMBA_CACHE_DIR if set, else the user's cache directory.
    Never next to the installed package: files pip did not install outlive an uninstall there, and
    the leftover directory then shadows a later install as a namespace package."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("NUMBA_CACHE_DIR") or os.path.join(base, "mmsb-dist", "numba")


if not numba.config.CACHE_DIR:  # read when each cached function below is defined
    numba.config.CACHE_DIR = _cache_dir()

_jit = njit(nogil=True, cache=True)

_parallel_guard = None  # decided on the first parallel call: see run_parallel
_parallel_guard_init = threading.Lock()


def run_parallel(kernel, *args):
    """Call a ``parallel=True`` kernel. numba's workqueue threading layer (the one left where
    neither OpenMP nor TBB is installed, e.g. a Mac without libomp) aborts the whole process when
    two threads run parallel kernels at once, and a shard does (validation of one batch beside the
    scatter of another). Under that layer the calls take turns; under omp and tbb they run freely."""
    global _parallel_guard
    if _parallel_guard is None:
        with _parallel_guard_init:
            if _parallel_guard is None:
                from numba.np.ufunc.parallel import _launch_threads
                _launch_threads()
                _parallel_guard = (threading.Lock() if numba.threading_layer() == "workqueue"
                                   else contextlib.nullcontext())
    with _parallel_guard:
        return kernel(*args)


# ---- raw memory access (LLVM intrinsics) ---------------------------------------------------------
# The first kernels copied runs by indexing a uint64 view, which works only where both sides are
# 8-aligned (bytes otherwise): ~100 ns per random 64-byte run on this VM, aligned or not, for
# reasons in numba's code generation that we did not pin down. Unaligned 8-byte loads and stores
# (x86-64 and AArch64 do them in hardware) move any run 8 bytes at a time, ~20 ns per run, and a
# write prefetch a few runs ahead lets the random destinations' cache misses overlap instead of
# queueing one after another. No bounds checks: callers pass validated offsets, as for every
# kernel here.

_I8P = ir.IntType(8).as_pointer()
_I64P = ir.IntType(64).as_pointer()
_I32 = ir.IntType(32)


def _flat(array, index, dtype=None) -> bool:
    """Typing guard: the intrinsics address elements from the data pointer, so they take only
    contiguous 1-D arrays (of ``dtype`` where given); numba refuses anything else instead of
    misreading it."""
    return (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
            and (dtype is None or array.dtype == dtype) and isinstance(index, types.Integer))


def _element_pointer(context, builder, array_type, array, index):
    """``&array[index]`` as an i8*: for a uint8 array, the address of byte ``index``."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), _I8P)


def _emit_prefetch(builder, ptr, write: int) -> None:
    fn = builder.module.declare_intrinsic(
        "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]))
    # (address, 0 = read / 1 = write, 3 = keep in all cache levels, 1 = data cache)
    builder.call(fn, [ptr, ir.Constant(_I32, write), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


@intrinsic
def _load8(typingctx, array, index):
    """The 8 bytes at byte ``index`` of a uint8 array, as one uint64 (any alignment)."""
    if not _flat(array, index, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        ptr = builder.bitcast(_element_pointer(context, builder, sig.args[0], *args), _I64P)
        return builder.load(ptr, align=1)
    return types.uint64(array, index), codegen


@intrinsic
def _store8(typingctx, array, index, value):
    """Store a uint64 as the 8 bytes at byte ``index`` of a uint8 array (any alignment)."""
    if not _flat(array, index, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(ptr, _I64P), align=1)
        return context.get_dummy_value()
    return types.void(array, index, types.uint64), codegen


@intrinsic
def _store8_streaming(typingctx, array, index, value):
    """Store a uint64 as the 8 bytes at byte ``index`` of a uint8 array (8-aligned) with a
    non-temporal hint: the CPU gathers a whole cache line of such stores and writes it to memory
    without first reading the line in or keeping it in cache. Ordered for other threads only after
    ``_store_fence``."""
    if not _flat(array, index, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1])
        store = builder.store(args[2], builder.bitcast(ptr, _I64P), align=8)
        store.set_metadata("nontemporal",
                           builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()
    return types.void(array, index, types.uint64), codegen


@intrinsic
def _store_fence(typingctx):
    """A full fence: the thread's streaming stores are visible to others before anything it does
    after (mfence on x86-64, dmb on AArch64)."""
    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _line_phase(typingctx, array, index):
    """Where byte ``index`` of a uint8 array falls in its cache line: its address mod 64."""
    if not _flat(array, index, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        ptr = _element_pointer(context, builder, sig.args[0], *args)
        address = builder.ptrtoint(ptr, ir.IntType(64))
        return builder.and_(address, ir.Constant(ir.IntType(64), CACHE_LINE - 1))
    return types.int64(array, index), codegen


@intrinsic
def _prefetch_for_write(typingctx, array, index):
    """A hint that the cache line holding byte ``index`` of a uint8 array is about to be written."""
    if not _flat(array, index, types.uint8):
        return None

    def codegen(context, builder, sig, args):
        _emit_prefetch(builder, _element_pointer(context, builder, sig.args[0], *args), 1)
        return context.get_dummy_value()
    return types.void(array, index), codegen


@intrinsic
def _prefetch_element(typingctx, array, index):
    """A hint that element ``index`` of an array is about to be read. A prefetch never faults, so
    an index that turns out not to be needed is harmless."""
    if not _flat(array, index):
        return None

    def codegen(context, builder, sig, args):
        _emit_prefetch(builder, _element_pointer(context, builder, sig.args[0], *args), 0)
        return context.get_dummy_value()
    return types.void(array, index), codegen


CACHE_LINE = 64  # bytes; streaming stores cover whole lines of this size
PREFETCH_RUNS = 16  # how many runs ahead a scatter prefetches its destination
PREFETCH_LOOKUPS = 16  # how many deltas ahead validation prefetches their page-table entries


@njit(nogil=True, cache=True, inline="always")
def _copy_range(dst, d, src, s, n):
    """dst[d:d+n] = src[s:s+n] for two different buffers, 8 bytes at a time at any alignment."""
    j = 0
    while j + 8 <= n:
        _store8(dst, d + j, _load8(src, s + j))
        j += 8
    while j < n:
        dst[d + j] = src[s + j]
        j += 1


@njit(nogil=True, cache=True, inline="always")
def _run_length(src, lengths, spans, i):
    """Run i's length: lengths[i], or with ``spans`` (no lengths) src[i + 1] - src[i]."""
    return src[i + 1] - src[i] if spans else lengths[i]


@njit(nogil=True, cache=True, inline="always")
def _ranges_of(d, length, step):
    """The arena ranges of ``step`` bytes (first, last + 1) that run [d, d + length) falls in."""
    return d // step, (d + length - 1) // step + 1


@njit(nogil=True, cache=True, inline="always")
def _stream_line(dst, d, src, s):
    """dst[d:d+64] = src[s:s+64], with streaming stores; dst + d starts a cache line."""
    for q in range(0, CACHE_LINE, 8):
        _store8_streaming(dst, d + q, _load8(src, s + q))


@njit(nogil=True, cache=True, inline="always")
def _in_line(d, phase0):
    """Where byte ``d`` of an array whose first byte is at ``phase0`` in its cache line
    (_line_phase) falls in its own line: 0 where it starts one."""
    return (d + phase0) & (CACHE_LINE - 1)


@njit(nogil=True, cache=True, inline="always")
def _copy_streaming(dst, d, src, s, n, phase0):
    """_copy_range, with the whole cache lines of the destination written by streaming stores: a
    large scatter's random lines are then neither read into the cache before being overwritten
    nor kept there after. ``phase0``: where dst's first byte falls in its line (_line_phase).
    The bytes before the first line boundary and after the last take plain stores. The caller
    fences (``_store_fence``) before other threads may read."""
    head = (CACHE_LINE - _in_line(d, phase0)) & (CACHE_LINE - 1)  # bytes before a line starts
    if n < head + CACHE_LINE:  # no whole line
        _copy_range(dst, d, src, s, n)
        return
    _copy_range(dst, d, src, s, head)
    j = head
    while j + CACHE_LINE <= n:
        _stream_line(dst, d + j, src, s + j)
        j += CACHE_LINE
    _copy_range(dst, d + j, src, s + j, n - j)


@njit(nogil=True, cache=True, inline="always")
def _copy_clipped(arena, d, payload, s, length, lo, hi, phase0):
    """The part of run ``payload[s:s+length]`` -> ``arena[d:]`` that falls inside arena bytes
    [lo, hi) (a thread's range in the threaded scatters), whole lines streamed."""
    a = max(d, lo)
    b = min(d + length, hi)
    if a < b:
        if b - a == CACHE_LINE and _in_line(a, phase0) == 0:
            # The common case without _copy_streaming's loops (this VM, 1 M random 64-byte runs
            # on two threads: 10.4 against 13.6 ns per run through them).
            _stream_line(arena, a, payload, s + (a - d))
        else:
            _copy_streaming(arena, a, payload, s + (a - d), b - a, phase0)


@njit(nogil=True, cache=True, inline="always")
def _prefetch_run(arena, d, lo, hi, phase0):
    """Prefetch the line holding byte d, the start of a run a threaded scatter is about to write,
    if it falls in the thread's range [lo, hi) and is only partly written (a run that starts a
    line streams it: prefetching it would only make the streaming store evict it again). Without
    a branch, which the random destinations would mispredict half the time: the thread's first
    line stands in for the lines that need no prefetch (this VM, 1 M random 64-byte runs on two
    threads: 10.2 against 13.8 ms with the branch)."""
    wanted = (lo <= d) & (d < hi) & (_in_line(d, phase0) != 0)
    _prefetch_for_write(arena, d if wanted else lo)


@_jit
def scatter_runs(arena, dest, src, lengths, payload):
    """Run i: payload[src[i]:src[i] + lengths[i]] to arena[dest[i]:]. With ``lengths`` empty,
    ``src`` holds one more entry and run i is payload[src[i]:src[i + 1]] (a batch's own
    data_starts: no lengths array to build)."""
    spans = lengths.shape[0] == 0
    n = dest.shape[0]
    for i in range(n):
        if i + PREFETCH_RUNS < n:
            _prefetch_for_write(arena, dest[i + PREFETCH_RUNS])
        _copy_range(arena, dest[i], payload, src[i], _run_length(src, lengths, spans, i))


@njit(nogil=True, cache=True, parallel=True)
def scatter_runs_parallel(arena, dest, src, lengths, payload, parts):
    """scatter_runs on ``parts`` threads. Thread k owns bytes [k*step, (k+1)*step) of the arena and
    walks every run in batch order, writing (and prefetching) only the part inside its range:
    per-byte order is the batch order, as in the reference, with no locks. Random destinations
    keep the threads even. Whole cache lines are streamed (``_copy_streaming``): this path is
    taken for large batches only (``limits.cpu_parallel_runs_min``), where the lines written
    would not stay cached anyway."""
    spans = lengths.shape[0] == 0
    step = (arena.shape[0] + parts - 1) // parts
    n = dest.shape[0]
    phase0 = _line_phase(arena, 0)
    for k in prange(parts):
        lo = k * step
        hi = min(arena.shape[0], lo + step)
        for i in range(n):
            if i + PREFETCH_RUNS < n:
                _prefetch_run(arena, dest[i + PREFETCH_RUNS], lo, hi, phase0)
            _copy_clipped(arena, dest[i], payload, src[i], _run_length(src, lengths, spans, i),
                          lo, hi, phase0)
        _store_fence()


@njit(nogil=True, cache=True, parallel=True)
def scatter_runs_bucketed(arena, dest, src, lengths, payload, parts):
    """scatter_runs on ``parts`` threads, for many of them. As in scatter_runs_parallel, thread k
    owns bytes [k*step, (k+1)*step) of the arena; but rather than every thread walking the whole
    batch, the batch is first sorted into one list per range, stably (batch order kept within
    each): each thread counts, then files, the runs of its own slice of the batch, and the
    per-range lists are laid out range-major, slice-minor. A run that crosses ranges is filed in
    each and clipped to it. Two more passes over the batch, so this pays only from several
    threads on (``limits.cpu_bucketed_scatter_threads_min``)."""
    spans = lengths.shape[0] == 0
    n = dest.shape[0]
    step = (arena.shape[0] + parts - 1) // parts
    chunk = (n + parts - 1) // parts
    phase0 = _line_phase(arena, 0)
    counts = np.zeros((parts, parts + 1), np.int64)  # [slice of the batch, range]
    for c in prange(parts):
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            k0, k1 = _ranges_of(dest[i], _run_length(src, lengths, spans, i), step)
            for k in range(k0, k1):
                counts[c, k] += 1
    where = np.empty((parts, parts + 1), np.int64)  # where slice c files its first run of range k
    total = 0
    for k in range(parts):
        for c in range(parts):
            where[c, k] = total
            total += counts[c, k]
    where[:, parts] = total
    order = np.empty(total, np.int64)
    for c in prange(parts):
        at = where[c].copy()
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            k0, k1 = _ranges_of(dest[i], _run_length(src, lengths, spans, i), step)
            for k in range(k0, k1):
                order[at[k]] = i
                at[k] += 1
    for k in prange(parts):
        lo = k * step
        hi = min(arena.shape[0], lo + step)
        last = where[0, k + 1]
        for j in range(where[0, k], last):
            if j + PREFETCH_RUNS < last:
                _prefetch_run(arena, max(lo, dest[order[j + PREFETCH_RUNS]]), lo, hi, phase0)
            i = order[j]
            _copy_clipped(arena, dest[i], payload, src[i], _run_length(src, lengths, spans, i),
                          lo, hi, phase0)
        _store_fence()


@_jit
def copy_runs(dst, dst_off, src, src_off, lengths):
    """Run i: src[src_off[i]:][:lengths[i]] to dst[dst_off[i]:] (``dst`` and ``src`` are
    different buffers)."""
    for i in range(dst_off.shape[0]):
        _copy_range(dst, dst_off[i], src, src_off[i], lengths[i])


@_jit
def stamp_pages(versions, dirty, slots, version):
    """versions[slots] = version and dirty[slots] = True (the page records an applied batch
    touched), in one pass and without the GIL; ``slots`` come from translate."""
    _stamp_range(versions, dirty, slots, version, 0, slots.shape[0])


@njit(nogil=True, cache=True, parallel=True)
def stamp_pages_parallel(versions, dirty, slots, version, parts):
    """stamp_pages on ``parts`` threads, each over a contiguous range of the batch. Threads that
    meet the same page store the same values, so the order of their stores does not matter."""
    n = slots.shape[0]
    step = (n + parts - 1) // parts
    for k in prange(parts):
        _stamp_range(versions, dirty, slots, version, k * step, min(n, (k + 1) * step))


@_jit
def _stamp_range(versions, dirty, slots, version, lo, hi):
    for i in range(lo, hi):
        s = slots[i]
        versions[s] = version
        dirty[s] = True


@_jit
def zero_runs(arena, dest, lengths):
    for i in range(dest.shape[0]):
        d = dest[i]
        arena[d:d + lengths[i]] = 0


@_jit
def merge_masked(arena, dest, src, lengths, mask_src, payload, masks):
    for i in range(dest.shape[0]):
        d = dest[i]
        s = src[i]
        n = lengths[i]
        m = mask_src[i]
        for k in range((n + 7) // 8):
            bits = masks[m + k]
            if bits == 0:
                continue
            base = 8 * k
            top = min(8, n - base)
            if bits == 0xFF and top == 8:
                arena[d + base:d + base + 8] = payload[s + base:s + base + 8]
            else:
                for j in range(top):
                    if (bits >> j) & 1:
                        arena[d + base + j] = payload[s + base + j]


@_jit
def compare_into(a, b, out):
    """out[k] = mask byte k of (a != b); ``out`` has ceil(len/8) bytes."""
    n = a.shape[0]
    for k in range((n + 7) // 8):
        bits = 0
        base = 8 * k
        for j in range(min(8, n - base)):
            if a[base + j] != b[base + j]:
                bits |= 1 << j
        out[k] = bits


@_jit
def _fmix64(x):
    x ^= x >> _S33
    x *= _M1
    x ^= x >> _S33
    x *= _M2
    x ^= x >> _S33
    return x


@_jit
def _hash_range(data, words, off, n):
    """``words`` is ``data`` viewed as uint64 (or an empty array when len(data) % 8 != 0)."""
    acc = np.uint64(0)
    full = n // 8
    if off % 8 == 0 and words.shape[0] > 0:
        w0 = off // 8
        for w in range(full):
            acc += _fmix64(words[w0 + w] ^ (np.uint64(w + 1) * _P1))
    else:
        for w in range(full):
            p = off + 8 * w
            word = np.uint64(0)
            for j in range(8):
                word |= np.uint64(data[p + j]) << np.uint64(8 * j)
            acc += _fmix64(word ^ (np.uint64(w + 1) * _P1))
    rest = n - 8 * full
    if rest:
        p = off + 8 * full
        word = np.uint64(0)
        for j in range(rest):
            word |= np.uint64(data[p + j]) << np.uint64(8 * j)
        acc += _fmix64(word ^ (np.uint64(full + 1) * _P1))
    return _fmix64(acc ^ (np.uint64(n) * _P2))


@_jit
def page_hash(arena, words, offsets, lengths, out):
    for i in range(offsets.shape[0]):
        out[i] = _hash_range(arena, words, offsets[i], lengths[i])


@_jit
def combine_hashes(ids, hashes):
    acc = np.uint64(0)
    for i in range(ids.shape[0]):
        acc += _fmix64(_fmix64(ids[i]) ^ hashes[i])
    return acc


# --- page id index: open addressing, linear probing, backward-shift deletion -----------------------
# keys: uint64[cap] (EMPTY_KEY = free), vals: int64[cap]; cap is a power of two, load <= 1/2.


@_jit
def index_insert(keys, vals, ids, slots):
    """Insert ids -> slots. Returns the position in ``ids`` of the first id already present (and
    stops there, having inserted the ones before it), or -1 when all were inserted."""
    mask = np.uint64(keys.shape[0] - 1)
    for i in range(ids.shape[0]):
        k = ids[i]
        h = _fmix64(k) & mask
        while True:
            cur = keys[h]
            if cur == EMPTY_KEY:
                keys[h] = k
                vals[h] = slots[i]
                break
            if cur == k:
                return i
            h = (h + np.uint64(1)) & mask
    return -1


@_jit
def index_lookup(keys, vals, ids, out):
    """out[i] = slot of ids[i]. Returns the position of the first unknown id, or -1."""
    mask = np.uint64(keys.shape[0] - 1)
    for i in range(ids.shape[0]):
        k = ids[i]
        h = _fmix64(k) & mask
        while True:
            cur = keys[h]
            if cur == k:
                out[i] = vals[h]
                break
            if cur == EMPTY_KEY:
                return i
            h = (h + np.uint64(1)) & mask
    return -1


@_jit
def index_present(keys, ids, out):
    """out[i] = whether ids[i] is in the index."""
    mask = np.uint64(keys.shape[0] - 1)
    for i in range(ids.shape[0]):
        k = ids[i]
        h = _fmix64(k) & mask
        found = False
        while True:
            cur = keys[h]
            if cur == k:
                found = True
                break
            if cur == EMPTY_KEY:
                break
            h = (h + np.uint64(1)) & mask
        out[i] = found


@_jit
def index_delete(keys, vals, ids):
    """Remove ids (all must be present: callers look them up first)."""
    mask = np.uint64(keys.shape[0] - 1)
    for i in range(ids.shape[0]):
        k = ids[i]
        h = _fmix64(k) & mask
        while keys[h] != k:
            h = (h + np.uint64(1)) & mask
        # Backward-shift: pull later members of the probe chain into the hole.
        hole = h
        j = (h + np.uint64(1)) & mask
        while keys[j] != EMPTY_KEY:
            home = _fmix64(keys[j]) & mask
            # Move j into the hole if its home is not cyclically in (hole, j].
            if ((j - home) & mask) >= ((j - hole) & mask):
                keys[hole] = keys[j]
                vals[hole] = vals[j]
                hole = j
            j = (j + np.uint64(1)) & mask
        keys[hole] = EMPTY_KEY


# Codes of what is wrong with a delta (first one found, in batch order).
OK, NO_BYTES, BAD_OFFSET, BAD_MASK, UNKNOWN_PAGE, OUT_OF_BOUNDS = 0, 1, 2, 3, 4, 5


@_jit
def shape_fault(offsets, data_starts, masked, mask_starts, page_bytes_max):
    """(code, index) of the first delta whose own shape is wrong, or (OK, -1).
    Kept free of helper calls: a call per delta made this loop ~13x slower."""
    for i in range(offsets.shape[0]):
        n = data_starts[i + 1] - data_starts[i]
        if n < 1:
            return 1, i  # NO_BYTES
        o = offsets[i]
        if o < 0 or o >= page_bytes_max:
            return 2, i  # BAD_OFFSET
        want = (n + 7) >> 3 if masked[i] else 0
        if mask_starts[i + 1] - mask_starts[i] != want:
            return 3, i  # BAD_MASK
    return 0, -1


@_jit
def translate(page_ids, offsets, data_starts, keys, vals, page_offsets, page_sizes, slots, dest):
    """Check every delta (already shape-checked) against the page table in one pass, filling
    ``slots`` and absolute ``dest`` offsets. Returns (code, index) of the first fault, or (OK, -1)."""
    return _translate_range(page_ids, offsets, data_starts, keys, vals, page_offsets, page_sizes,
                            slots, dest, 0, page_ids.shape[0])


@njit(nogil=True, cache=True, parallel=True)
def translate_parallel(page_ids, offsets, data_starts, keys, vals, page_offsets, page_sizes,
                       slots, dest, parts):
    """translate on ``parts`` threads, each over a contiguous range of the batch (random page ids
    make each lookup a cache miss: the threads overlap them). The first fault of the lowest range
    that has one is the first fault in batch order."""
    n = page_ids.shape[0]
    step = (n + parts - 1) // parts
    codes = np.zeros(parts, np.int64)
    where = np.full(parts, -1, np.int64)
    for k in prange(parts):
        lo = k * step
        code, i = _translate_range(page_ids, offsets, data_starts, keys, vals, page_offsets,
                                   page_sizes, slots, dest, lo, min(n, lo + step))
        codes[k] = code
        where[k] = i
    for k in range(parts):
        if codes[k] != 0:
            return codes[k], where[k]
    return 0, -1


@_jit
def _translate_range(page_ids, offsets, data_starts, keys, vals, page_offsets, page_sizes, slots,
                     dest, lo, hi):
    mask = np.uint64(keys.shape[0] - 1)
    # The page table is out of cache when a batch follows a scatter: fetch the table entries of
    # delta i + PREFETCH_LOOKUPS at its home probe position, and the page record of delta
    # i + PREFETCH_LOOKUPS / 2 from its home position's slot (right in all but collisions). Each
    # delta's home is hashed once, into a ring that holds those of deltas i .. i + PREFETCH_LOOKUPS.
    wrap = PREFETCH_LOOKUPS - 1  # a power of two
    half = PREFETCH_LOOKUPS // 2
    homes = np.empty(PREFETCH_LOOKUPS, np.uint64)
    for j in range(lo, min(hi, lo + PREFETCH_LOOKUPS)):
        homes[(j - lo) & wrap] = _fmix64(page_ids[j]) & mask
    for i in range(lo, hi):
        r = (i - lo) & wrap
        h = homes[r]
        if i + PREFETCH_LOOKUPS < hi:
            far = _fmix64(page_ids[i + PREFETCH_LOOKUPS]) & mask
            homes[r] = far
            _prefetch_element(keys, far)
            _prefetch_element(vals, far)
        if i + half < hi:
            near = vals[homes[(r + half) & wrap]]
            if 0 <= near < page_sizes.shape[0]:
                _prefetch_element(page_sizes, near)
                _prefetch_element(page_offsets, near)
        k = page_ids[i]
        while keys[h] != k:
            if keys[h] == EMPTY_KEY:
                return 4, i  # UNKNOWN_PAGE
            h = (h + np.uint64(1)) & mask
        slot = vals[h]
        if offsets[i] + data_starts[i + 1] - data_starts[i] > page_sizes[slot]:
            return 5, i  # OUT_OF_BOUNDS
        slots[i] = slot
        dest[i] = page_offsets[slot] + offsets[i]
    return OK, -1
