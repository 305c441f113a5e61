"""CuPy backend: the kernels of ``kernels/mmsb_kernels.cu`` on one CUDA device.

Index arrays arrive on the host (int64) and go to the device in one copy per call; payloads are
uploaded once per batch by the arena. One kernel launch per batch and kernel kind; the only host
synchronization in a run scatter is reading the fixup counter (see ``runs_stamp`` in the .cu file).
"""

from __future__ import annotations

import math

import cupy as cp
import numpy as np

from mmsb_dist import limits
from mmsb_dist.backend import Backend
from mmsb_dist.errors import CapacityError
from mmsb_dist.kernels import cuda_source

_BLOCK = 256
_GSHIFT = int(math.log2(limits.scatter_granule_bytes))
_KERNELS = ("runs_stamp", "runs_apply", "runs_fix_pairs", "runs_fix_apply", "masked_merge",
            "runs_zero", "compare_mask", "page_hash")


class ScatterState:
    """Last-writer stamps (u32 per granule) and fixup flags (u8 per granule) for one arena."""

    def __init__(self, capacity: int):
        granules = (int(capacity) >> _GSHIFT) + 1
        if granules >= 1 << 32:
            raise CapacityError(f"arena of {capacity} bytes is over the scatter kernel's "
                                f"2**32 granules of {limits.scatter_granule_bytes} bytes")
        self.stamp = cp.zeros(granules, cp.uint32)
        self.fixflag = cp.zeros(granules, cp.uint8)
        self.fixcount = cp.zeros(1, cp.uint32)
        self.key_base = 0
        self.fixups = 0  # batches that needed the fixup pass (statistics)


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


def _granule_span(dest: np.ndarray, lengths: np.ndarray) -> int:
    """How many (granule, run) pairs the runs touch in all."""
    return int((((dest + lengths - 1) >> _GSHIFT) - (dest >> _GSHIFT) + 1).sum())


def _chunk_starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(lengths.size + 1, np.int64)
    np.cumsum((lengths + 15) // 16, out=starts[1:])
    return starts


class CupyBackend(Backend):
    name = "cupy"
    xp = cp

    def __init__(self):
        module = cp.RawModule(code=cuda_source(), options=("--std=c++17",))
        self._k = {name: module.get_function(name) for name in _KERNELS}
        self._dummy32 = cp.zeros(1, cp.uint32)
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
        return ScatterState(capacity)

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
            self._launch_runs(dst, src, d, s, ln, owned=False)

    def scatter_runs(self, arena, dest, src, lengths, payload, state=None) -> None:
        d, s, ln = split_runs(dest, src, lengths, limits.scatter_piece_bytes_max)
        if ln.size:
            dd, sd, ld = self._index(d, s, ln)
            self.scatter_device(arena, dd, sd, ld, payload, state, maxlen=int(ln.max()),
                                fixup_bound=_granule_span(d, ln))

    def scatter_device(self, arena, dd, sd, ld, payload, state, *, maxlen: int,
                       fixup_bound: int) -> None:
        """Scatter runs whose index arrays are already on the device (runs no longer than
        ``limits.scatter_piece_bytes_max``); ``fixup_bound`` bounds the (granule, run) pairs."""
        n = int(ld.size)
        if state.key_base + n + 1 >= 1 << 32:  # keys would wrap: forget every old stamp
            state.stamp.fill(0)
            state.key_base = 0
        self._k["runs_stamp"](_grid(min(n, 1 << 22)), (_BLOCK,),
                              (dd, ld, np.int64(n), np.uint32(state.key_base), state.stamp,
                               np.int32(_GSHIFT)))
        self._launch_runs(arena, payload, dd, sd, ld, owned=True, state=state, maxlen=maxlen)
        if int(state.fixcount.get()[0]):
            self._fixup(arena, payload, dd, sd, ld, fixup_bound, state)
        state.key_base += n

    def _launch_runs(self, dst, src, dd, sd, ld, *, owned, state=None, maxlen=None) -> None:
        n = len(ld)
        if maxlen is None:
            maxlen = int(ld.max())
        if not isinstance(dd, cp.ndarray):
            dd, sd, ld = self._index(dd, sd, ld)
        lanes_log2 = min(5, max(0, math.ceil(math.log2(max(1, (maxlen + 15) // 16)))))
        st = state
        self._k["runs_apply"](
            _grid(n << lanes_log2), (_BLOCK,),
            (dst, src, dd, sd, ld, np.int64(n), np.int32(lanes_log2), np.int32(1 if owned else 0),
             np.uint32(st.key_base if st else 0), st.stamp if st else self._dummy32,
             np.int32(_GSHIFT), st.fixflag if st else self._dummy8,
             st.fixcount if st else self._dummy32))

    def _fixup(self, arena, payload, dd, sd, ld, bound, state) -> None:
        """Replay in order every run touching a flagged granule, clipped to that granule."""
        state.fixups += 1
        n = int(ld.size)
        pairs = cp.empty(bound, cp.uint64)
        npairs = cp.zeros(1, cp.uint32)
        self._k["runs_fix_pairs"](_grid(min(n, 1 << 22)), (_BLOCK,),
                                  (dd, ld, np.int64(n), np.int32(_GSHIFT), state.fixflag, pairs,
                                   npairs))
        pairs = cp.sort(pairs[: int(npairs.get()[0])])
        gran = pairs >> np.uint64(32)
        heads = cp.flatnonzero(cp.concatenate([cp.ones(1, bool), gran[1:] != gran[:-1]]))
        starts = cp.concatenate([heads, cp.array([pairs.size])]).astype(cp.int64)
        ngroups = int(heads.size)
        self._k["runs_fix_apply"](_grid(ngroups), (_BLOCK,),
                                  (arena, payload, dd, sd, ld, pairs, starts, np.int64(ngroups),
                                   np.int32(_GSHIFT), state.fixflag))
        state.fixcount.fill(0)

    # ---- masked, zero, compare, hash ------------------------------------------------------------

    def merge_masked(self, arena, dest, src, lengths, mask_src, payload, masks) -> None:
        lengths = np.asarray(lengths, np.int64)
        if lengths.size == 0:
            return
        starts = _chunk_starts(lengths)
        dd, sd, ld, md = self._index(dest, src, lengths, mask_src)
        cs = cp.asarray(starts)
        total = int(starts[-1])
        self._k["masked_merge"](_grid(total), (_BLOCK,),
                                (arena, payload, masks, dd, sd, ld, md, cs, np.int64(lengths.size),
                                 np.int64(total)))

    def zero_runs(self, arena, dest, lengths) -> None:
        lengths = np.asarray(lengths, np.int64)
        if lengths.size == 0:
            return
        starts = _chunk_starts(lengths)
        dd, ld = self._index(dest, lengths)
        total = int(starts[-1])
        self._k["runs_zero"](_grid(total), (_BLOCK,),
                             (arena, dd, ld, cp.asarray(starts), np.int64(lengths.size),
                              np.int64(total)))

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
