"""CuPy backend: the kernels of ``kernels/mmsb_kernels.cu`` on one CUDA device.

Index arrays arrive on the host (int64) and go to the device in one copy per call (a batch of
uniform whole-granule runs sends u32 granule numbers instead of byte offsets); payloads are
uploaded once per batch by the arena. One kernel launch per batch and kernel kind. A run scatter
is two launches, pass 1 and the cooperative ``runs_post``, and takes its decisions on the device
(see the .cu file); the host waits for it only when some run covers a granule partly (to learn
whether the fixup pass is needed).
"""

from __future__ import annotations

import math

import cupy as cp
import numpy as np
from cupy_backends.cuda.api import driver

from mmsb_dist import limits
from mmsb_dist.backend import Backend
from mmsb_dist.errors import CapacityError
from mmsb_dist.kernels import cuda_source

_BLOCK = 256
_GSHIFT = int(math.log2(limits.scatter_granule_bytes))
if not (4 <= _GSHIFT <= 9 and 1 << _GSHIFT == limits.scatter_granule_bytes):
    # runs_granules: a granule is whole 16-byte chunks, all in one warp's lanes
    raise ValueError(f"limits.scatter_granule_bytes = {limits.scatter_granule_bytes}: the CUDA "
                     "scatter needs a power of two from 16 to 512")
_KERNELS = ("runs_granules", "runs_apply", "runs_fix_pairs", "runs_fix_apply",
            "masked_merge", "runs_zero", "compare_mask", "page_hash")
_CHUNKS_PER_THREAD = 4  # as in the .cu file: a block covers 4 * _BLOCK chunks of 16 bytes
_CONF_FLAG_WORDS = 1024  # as CONF_FLAG_WORDS in the .cu file
_MAX_SEGMENTS = 2048  # as MAX_SEGMENTS in the .cu file: at most one per block of runs_post's grid
_CHUNKS_PER_LANE = 2  # 16-byte chunks per thread of a run scatter (gpu_variants.py: 1 is slower)


class ScatterState:
    """Per-arena scratch of the run scatter.

    - Cleared by ``runs_post`` after every batch: the `seen`/`conf` bitmaps (1 bit per
      granule), the conflict flags and counters (but for the fixup count, which the host reads
      and clears), and ``skipped``, a bit per run that skipped a granule in pass 1 (grown with
      the batch).
    - Kept: last-writer stamps (u32 per granule; (key << 1) | first), the fixup flags (u8 per
      granule), and the ranks of conflicted granules that place compact stamps: ``base`` (a
      word per bitmap word) and ``block_sums`` (a word per segment of ``2**seg_log2`` bitmap
      words; at most ``segments`` of them, one per block of ``runs_post``'s grid)."""

    def __init__(self, capacity: int, segments: int = _MAX_SEGMENTS):
        granules = (int(capacity) >> _GSHIFT) + 1
        if granules >= 1 << 32:
            raise CapacityError(f"arena of {capacity} bytes is over the scatter kernel's "
                                f"2**32 granules of {limits.scatter_granule_bytes} bytes")
        words = (granules + 31) // 32
        # seen, conf, the conflict flags and the counters. Pass 1 raises one of the
        # _CONF_FLAG_WORDS flag words when a granule was touched twice (spread out: one word would
        # serialize the stores of every warp that saw a collision); counters = [fixcount, listed
        # runs].
        self.bits = cp.zeros(2 * words + _CONF_FLAG_WORDS + 2, cp.uint32)
        self.seen, self.conf = self.bits[:words], self.bits[words:2 * words]
        self.conf_flags = self.bits[2 * words:2 * words + _CONF_FLAG_WORDS]
        self.counters = self.bits[2 * words + _CONF_FLAG_WORDS:]
        self.stamp = cp.zeros(granules, cp.uint32)
        self.seg_log2 = (-(-words // min(segments, _MAX_SEGMENTS)) - 1).bit_length()
        self.base = cp.empty(words, cp.uint32)
        self.block_sums = cp.empty(-(-words >> self.seg_log2), cp.uint32)
        self.skipped = cp.zeros(0, cp.uint32)
        self.fixflag = cp.zeros(granules, cp.uint8)
        self.key_base = 0
        self.fixups = 0  # batches that needed the fixup pass (statistics)

    def skipped_bits(self, runs: int):
        """The ``skipped`` bitmap for a batch of ``runs`` runs (zero: ``runs_post`` clears it)."""
        words = (runs + 31) // 32
        if self.skipped.size < words:
            self.skipped = cp.zeros(max(words, 2 * self.skipped.size), cp.uint32)
        return self.skipped


def _grid(threads: int) -> tuple[int]:
    return (max(1, (int(threads) + _BLOCK - 1) // _BLOCK),)


def split_runs(dest, src, lengths, piece_bytes: int):
    """Cut runs longer than ``piece_bytes`` into consecutive pieces (disjoint, so their relative
    order does not matter, and they keep their place among the other runs)."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size == 0 or int(lengths.max()) <= piece_bytes:
        return np.asarray(dest, np.int64), np.asarray(src, np.int64), lengths
    pieces = (lengths + piece_bytes - 1) // piece_bytes
    owner = np.repeat(np.arange(lengths.size), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    skip = (np.arange(owner.size) - first) * piece_bytes
    plen = np.minimum(lengths[owner] - skip, piece_bytes)
    return np.asarray(dest, np.int64)[owner] + skip, np.asarray(src, np.int64)[owner] + skip, plen


def _lanes_log2(maxlen: int) -> int:
    """log2 of the threads per run in ``runs_apply`` (and pass 3): _CHUNKS_PER_LANE 16-byte
    chunks each, at most 32."""
    chunks = (maxlen + 15) // 16
    return min(5, max(0, math.ceil(math.log2(max(1, chunks // _CHUNKS_PER_LANE)))))


def _granule_span(dest: np.ndarray, lengths: np.ndarray) -> int:
    """How many (granule, run) pairs the runs touch in all."""
    return int((((dest + lengths - 1) >> _GSHIFT) - (dest >> _GSHIFT) + 1).sum())


def _granule_chunks_log2(ulen: int) -> int:
    """log2 of a run's 16-byte chunks when runs of uniform length ``ulen`` can be indexed by
    granule number (``ulen`` a power of two, whole granules); else 0."""
    if ulen < limits.scatter_granule_bytes or ulen & (ulen - 1):
        return 0
    return ulen.bit_length() - 5


def _granule_numbered(ulen: int, arena, payload) -> bool:
    """Whether runs of uniform length ``ulen`` from ``payload`` into ``arena`` may be sent as
    granule numbers (``runs_granules``), given that each starts on a granule boundary: a
    power-of-two length of whole granules, and 16-byte aligned buffers (either may be a view)."""
    return (bool(_granule_chunks_log2(ulen)) and arena.data.ptr % 16 == 0
            and payload.data.ptr % 16 == 0)


def _uniform_length(src: np.ndarray, lengths: np.ndarray) -> int:
    """L when every run has length L and run r's bytes start at r*L (a 2-D payload), else 0."""
    first = int(lengths[0])
    if first <= 0 or np.any(lengths != first):
        return 0
    return first if np.array_equal(src, np.arange(src.size, dtype=np.int64) * first) else 0


def _block_table(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(item, first chunk) per block for kernels that cover items in 16-byte chunks."""
    per_block = _CHUNKS_PER_THREAD * _BLOCK
    blocks = ((lengths + 15) // 16 + per_block - 1) // per_block
    item = np.repeat(np.arange(lengths.size, dtype=np.int64), blocks)
    first = np.repeat(np.cumsum(blocks) - blocks, blocks)
    return item, (np.arange(item.size, dtype=np.int64) - first) * per_block


class CupyBackend(Backend):
    name = "cupy"
    xp = cp

    def __init__(self):
        attributes = cp.cuda.Device().attributes
        if not attributes.get("CooperativeLaunch", 0):
            raise RuntimeError("the CUDA backend needs a device that takes cooperative launches "
                               "(compute capability 6.0 or later, under Linux); this one does "
                               "not: use the numpy backend")
        self._sms = attributes["MultiProcessorCount"]
        module = cp.RawModule(code=cuda_source(), options=("--std=c++17",))
        self._k = {name: module.get_function(name) for name in _KERNELS}
        # runs_post waits on grid-wide barriers: a module of its own, launched cooperatively
        # (cuLaunchCooperativeKernel), with a grid that fits on the device at once.
        coop = cp.RawModule(code=cuda_source(), options=("--std=c++17", "-DMMSB_COOP"),
                            enable_cooperative_groups=True)
        self._post = coop.get_function("runs_post")
        per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(self._post.kernel.ptr, _BLOCK, 0)
        self._post_grid = (max(1, per_sm) * self._sms,)
        self._dummy32 = cp.zeros(1, cp.uint32)
        self._dummy64 = cp.zeros(1, cp.int64)
        self._dummy_counters = cp.zeros(2, cp.uint32)
        self._dummy8 = cp.zeros(1, cp.uint8)

    # ---- memory --------------------------------------------------------------------------------

    def zeros(self, nbytes: int):
        try:
            return cp.zeros(int(nbytes), dtype=cp.uint8)
        except cp.cuda.memory.OutOfMemoryError as exc:
            raise CapacityError(f"cannot allocate a device arena of {nbytes} bytes") from exc

    def upload(self, host):
        if isinstance(host, cp.ndarray):
            return host
        return cp.asarray(np.ascontiguousarray(host))

    def to_host(self, arr) -> np.ndarray:
        return cp.asnumpy(arr) if isinstance(arr, cp.ndarray) else np.asarray(arr)

    def scatter_state(self, capacity: int) -> ScatterState:
        return ScatterState(capacity, self._post_grid[0])

    def synchronize(self) -> None:
        cp.cuda.get_current_stream().synchronize()

    def _index(self, *cols) -> list:
        """Upload several int64 host columns with one copy."""
        n = len(cols[0])
        packed = cp.asarray(np.stack([np.asarray(c, np.int64) for c in cols]).reshape(len(cols), n))
        return [packed[i] for i in range(len(cols))]

    # ---- runs ----------------------------------------------------------------------------------

    def copy_runs(self, dst, dst_off, src, src_off, lengths) -> None:
        d, s, ln = split_runs(dst_off, src_off, lengths, limits.scatter_piece_bytes_max)
        if ln.size:
            dd, sd, ld = self._index(d, s, ln)
            self._launch_runs(dst, src, dd, sd, ld, mode=0, maxlen=int(ln.max()))

    def scatter_runs(self, arena, dest, src, lengths, payload, state=None) -> None:
        d, s, ln = split_runs(dest, src, lengths, limits.scatter_piece_bytes_max)
        if not ln.size:
            return
        ulen = _uniform_length(s, ln)
        sd = ld = None
        if (_granule_numbered(ulen, arena, payload)
                and not (d & (limits.scatter_granule_bytes - 1)).any()):  # all on boundaries
            dd = cp.asarray((d >> _GSHIFT).astype(np.uint32))  # granule numbers: half the bytes
            pairs = ln.size * ulen >> _GSHIFT  # whole granules: no need to count them
        else:
            if ulen:
                dd, = self._index(d)
            else:
                dd, sd, ld = self._index(d, s, ln)
            pairs = _granule_span(d, ln)
        self.scatter_device(arena, dd, sd, ld, payload, state, maxlen=int(ln.max()), ulen=ulen,
                            granule_pairs=pairs, run_bytes=int(ln.sum()))

    def scatter_device(self, arena, dd, sd, ld, payload, state, *, maxlen: int, ulen: int = 0,
                       granule_pairs: int, run_bytes: int) -> None:
        """Scatter runs whose index arrays are on the device: ``dd`` plus either ``sd``/``ld`` or a
        uniform length ``ulen`` (run r's bytes at payload[r*ulen:]). Runs must be no longer than
        ``limits.scatter_piece_bytes_max``. ``dd`` holds int64 byte offsets, or uint32 granule
        numbers when the runs are whole granules of a uniform power-of-two length (``ulen``; see
        ``_granule_chunks_log2``; arena and payload 16-byte aligned). ``granule_pairs`` is how many
        (granule, run) pairs the runs touch (``_granule_span``) and ``run_bytes`` their total
        length: when every run covers whole granules (pairs * granule == bytes) no fixup can be
        needed and nothing here waits for the device; otherwise the host reads the fixup counter
        after pass 3."""
        n = int(dd.size)
        gidx = dd.dtype == cp.uint32
        if gidx and not (sd is None and ld is None and _granule_numbered(ulen, arena, payload)):
            raise ValueError(f"granule-numbered runs need one power-of-two length of whole "
                             f"granules and aligned buffers, not ulen={ulen}")
        if state.key_base + n + 1 >= 1 << 31:  # keys (31 bits) would wrap: forget old stamps
            state.stamp.fill(0)
            state.key_base = 0
        sd = self._dummy64 if sd is None else sd
        ld = self._dummy64 if ld is None else ld
        if gidx:
            self._launch_granules(arena, payload, dd, ulen, state)
        else:
            self._launch_runs(arena, payload, dd, sd, ld, mode=1, maxlen=maxlen, ulen=ulen,
                              state=state)
        self._launch_post(arena, payload, dd, sd, ld, maxlen=maxlen, ulen=ulen, state=state,
                          walk=granule_pairs < state.seen.size // 2)
        state.key_base += n
        if gidx or granule_pairs << _GSHIFT == run_bytes:  # whole granules: never a fixup
            return
        if int(state.counters[:1].get()[0]):
            self._fixup(arena, payload, dd, sd, ld, ulen, granule_pairs, state)
            state.counters[:1].fill(0)

    def _launch_post(self, dst, src, dd, sd, ld, *, maxlen: int, ulen: int,
                     state: ScatterState, walk: bool = False) -> None:
        """Passes 2 and 3 and the clearing of the scatter state (``runs_post``), after pass 1 of
        the same runs; when nothing collided, it only clears the ``seen`` bitmap. ``walk``: clear
        the bitmaps' words that the runs touch rather than all of them (a batch touching fewer
        granules than half the bitmap's words: few runs in a big arena). Granule-numbered runs
        in a bitmap cleared whole keep compact stamps."""
        n, gidx = int(dd.size), dd.dtype == cp.uint32
        # Pass 2 lists the runs of conflicted granules here (granule-numbered runs: not needed).
        conf_runs = self._dummy32 if gidx else cp.empty(n, cp.uint32)
        self._post(self._post_grid, (_BLOCK,),
                   (dst, src, dd, np.int32(gidx), sd, ld, np.int64(ulen),
                    np.int64(n), np.int32(_lanes_log2(maxlen)), np.uint32(state.key_base),
                    state.stamp, state.seen, state.conf, np.int64(state.seen.size),
                    np.int32(walk), state.counters, conf_runs, np.int32(_GSHIFT), state.fixflag,
                    state.conf_flags, state.skipped_bits(n) if gidx else self._dummy32,
                    np.int32(gidx and not walk), state.base, state.block_sums,
                    np.int32(state.seg_log2)))

    def _launch_granules(self, dst, src, gd, ulen: int, state: ScatterState | None) -> None:
        """Pass 1 (with ``state``) or a plain copy (without) of granule-numbered runs
        (``runs_granules``): one thread per 16-byte chunk."""
        n, cpr_log2 = int(gd.size), _granule_chunks_log2(ulen)
        st, d32 = state, self._dummy32
        self._k["runs_granules"](
            _grid(n << cpr_log2), (_BLOCK,),
            (dst, src, gd, np.int64(n), np.int32(cpr_log2), np.int32(1 if st else 0),
             st.seen if st else d32, st.conf if st else d32, st.conf_flags if st else d32,
             np.int32(_GSHIFT), st.skipped_bits(n) if st else d32))

    def _launch_runs(self, dst, src, dd, sd, ld, *, mode, maxlen, ulen=0, state=None) -> None:
        """A plain batched copy (mode 0, no ``state``) or pass 1 (mode 1) through the general
        kernel (``runs_apply``): a group of threads per run; ``dd`` holds byte offsets."""
        n = int(dd.size)
        lanes_log2 = _lanes_log2(maxlen)
        st = state
        d32 = self._dummy32
        self._k["runs_apply"](
            _grid(n << lanes_log2), (_BLOCK,),
            (dst, src, dd, sd, ld, np.int64(ulen), np.int64(n),
             np.int32(lanes_log2), np.int32(mode), np.uint32(st.key_base if st else 0),
             st.stamp if st else d32, st.seen if st else d32, st.conf if st else d32,
             st.counters if st else self._dummy_counters, np.int32(_GSHIFT),
             st.fixflag if st else self._dummy8, st.conf_flags if st else d32))

    def _fixup(self, arena, payload, dd, sd, ld, ulen, bound, state) -> None:
        """Replay in order every run touching a flagged granule, clipped to that granule."""
        state.fixups += 1
        n = int(dd.size)
        pairs = cp.empty(bound, cp.uint64)
        npairs = cp.zeros(1, cp.uint32)
        self._k["runs_fix_pairs"](_grid(min(n, 1 << 22)), (_BLOCK,),
                                  (dd, ld, np.int64(ulen), np.int64(n), np.int32(_GSHIFT),
                                   state.fixflag, pairs, npairs))
        pairs = cp.sort(pairs[: int(npairs.get()[0])])
        gran = pairs >> np.uint64(32)
        heads = cp.flatnonzero(cp.concatenate([cp.ones(1, bool), gran[1:] != gran[:-1]]))
        starts = cp.concatenate([heads, cp.array([pairs.size])]).astype(cp.int64)
        ngroups = int(heads.size)
        self._k["runs_fix_apply"](_grid(ngroups), (_BLOCK,),
                                  (arena, payload, dd, sd, ld, np.int64(ulen), pairs, starts,
                                   np.int64(ngroups), np.int32(_GSHIFT), state.fixflag))

    # ---- masked, zero, compare, hash ------------------------------------------------------------

    def merge_masked(self, arena, dest, src, lengths, mask_src, payload, masks) -> None:
        lengths = np.asarray(lengths, np.int64)
        if lengths.size == 0:
            return
        dd, sd, ld, md = self._index(dest, src, lengths, mask_src)
        self.merge_device(arena, dd, sd, ld, md, self._index(*_block_table(lengths)), payload,
                          masks)

    def merge_device(self, arena, dd, sd, ld, md, blocks, payload, masks) -> None:
        """merge_masked with device-resident index arrays; ``blocks`` is the uploaded
        ``_block_table`` of the lengths."""
        item, chunk0 = blocks
        self._k["masked_merge"]((int(item.size),), (_BLOCK,),
                                (arena, payload, masks, dd, sd, ld, md, item, chunk0))

    def zero_runs(self, arena, dest, lengths) -> None:
        lengths = np.asarray(lengths, np.int64)
        if lengths.size == 0:
            return
        dd, ld = self._index(dest, lengths)
        item, chunk0 = self._index(*_block_table(lengths))
        self._k["runs_zero"]((int(item.size),), (_BLOCK,), (arena, dd, ld, item, chunk0))

    def compare(self, a, b):
        a = cp.ascontiguousarray(cp.asarray(a)).view(cp.uint8).reshape(-1)
        b = cp.ascontiguousarray(cp.asarray(b)).view(cp.uint8).reshape(-1)
        if a.size != b.size:
            raise ValueError("compare needs two ranges of the same length")
        out = cp.zeros((a.size + 7) // 8, cp.uint8)
        if a.size:
            self._k["compare_mask"](_grid((a.size + 15) // 16), (_BLOCK,),
                                    (a, b, np.int64(a.size), out))
        return out

    def page_hash(self, arena, offsets, lengths) -> np.ndarray:
        n = len(offsets)
        if n == 0:
            return np.zeros(0, np.uint64)
        od, ld = self._index(offsets, lengths)
        out = cp.empty(n, cp.uint64)
        self._k["page_hash"](_grid(32 * n), (_BLOCK,), (arena, od, ld, np.int64(n), out))
        return cp.asnumpy(out)
