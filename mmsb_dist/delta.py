"""Deltas: the only way page bytes change.

A :class:`DeltaBatch` is an ordered list of deltas held as columns (NumPy arrays), never as Python
objects per delta. Two encodings share one layout:

* *runs*: ``(page, offset, bytes)`` -- set ``len(bytes)`` bytes at ``offset``;
* *masked*: ``(page, offset, mask, bytes)`` -- set byte ``i`` of the range where mask bit ``i`` is 1.

Columns: ``page_ids`` (u64), ``offsets`` (i64), ``data_starts`` (i64, n+1: delta ``i``'s bytes are
``payload[data_starts[i]:data_starts[i+1]]``), ``masked`` (bool), ``mask_starts`` (i64, n+1, empty
ranges for runs), ``payload`` and ``masks`` (u8). Bytes apply in batch order, later bytes win.

Batch-level ``client_id``/``seq`` form the delta id that makes a retried batch apply at most once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmsb_dist import limits
from mmsb_dist.errors import InvalidDeltaError

__all__ = ["DeltaBatch", "compose", "diff"]

_EMPTY_U8 = np.zeros(0, dtype=np.uint8)

# The delta id's client of the batches a shard logs for derived pages (recompute results); client
# ids of writers are below it (Bus draws 63 random bits), and a client batch that claims it is
# refused. Events report its deltas as RECOMPUTE rather than WRITE.
RECOMPUTE_CLIENT_ID = 1 << 63


def _as_u8(data) -> np.ndarray:
    """Bytes-like or array -> flat uint8 view (no copy where the input is contiguous)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    return np.frombuffer(memoryview(data), dtype=np.uint8)


def _starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    return starts


def _gather(src: np.ndarray, src_starts, lengths, dst_starts) -> np.ndarray:
    """Concatenate ``src[src_starts[i]:src_starts[i]+lengths[i]]`` for every i (one compiled pass)."""
    from mmsb_dist.backend import get_backend

    out = np.empty(int(dst_starts[-1]), dtype=np.uint8)
    if out.size:
        get_backend("numpy").copy_runs(out, dst_starts[:-1], src, src_starts, lengths)
    return out


def _pack_payloads(payloads, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat payload, starts) from a 2-D array (one row per delta) or a sequence of bytes-likes."""
    if isinstance(payloads, np.ndarray) and payloads.ndim == 2:
        if payloads.shape[0] != n:
            raise InvalidDeltaError(f"{payloads.shape[0]} payload rows for {n} deltas")
        rows = np.ascontiguousarray(payloads).view(np.uint8).reshape(n, -1)
        return rows.reshape(-1), np.arange(n + 1, dtype=np.int64) * rows.shape[1]
    parts = [_as_u8(p) for p in payloads]
    if len(parts) != n:
        raise InvalidDeltaError(f"{len(parts)} payloads for {n} deltas")
    lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=n)
    flat = np.concatenate(parts) if parts else _EMPTY_U8
    return flat, _starts(lengths)


@dataclass(frozen=True, eq=False)
class DeltaBatch:
    page_ids: np.ndarray
    offsets: np.ndarray
    data_starts: np.ndarray
    payload: np.ndarray
    masked: np.ndarray
    mask_starts: np.ndarray
    masks: np.ndarray
    client_id: int = 0
    seq: int = 0
    meta: dict = field(default_factory=dict)

    # ---- construction ---------------------------------------------------------------------------

    @classmethod
    def runs(cls, page_ids, offsets, payloads, *, lengths=None, client_id: int = 0,
             seq: int = 0) -> "DeltaBatch":
        """Runs: ``payloads`` is a 2-D array (one row per delta), a sequence of bytes-likes, or a
        flat byte array cut by ``lengths``."""
        ids = np.ascontiguousarray(page_ids, dtype=np.uint64).reshape(-1)
        n = ids.size
        if lengths is not None:
            flat = _as_u8(payloads)
            starts = _starts(np.asarray(lengths, dtype=np.int64).reshape(-1))
        else:
            flat, starts = _pack_payloads(payloads, n)
        return cls(ids, np.ascontiguousarray(offsets, dtype=np.int64).reshape(-1), starts, flat,
                   np.zeros(n, dtype=bool), np.zeros(n + 1, dtype=np.int64), _EMPTY_U8,
                   client_id, seq)

    @classmethod
    def masked_deltas(cls, page_ids, offsets, masks, payloads, *, client_id: int = 0,
                      seq: int = 0) -> "DeltaBatch":
        """Masked deltas: ``masks[i]`` holds ceil(len(payloads[i]) / 8) bytes, LSB first."""
        ids = np.ascontiguousarray(page_ids, dtype=np.uint64).reshape(-1)
        n = ids.size
        flat, starts = _pack_payloads(payloads, n)
        mflat, mstarts = _pack_payloads(masks, n)
        return cls(ids, np.ascontiguousarray(offsets, dtype=np.int64).reshape(-1), starts, flat,
                   np.ones(n, dtype=bool), mstarts, mflat, client_id, seq)

    @classmethod
    def concat(cls, batches, *, client_id: int = 0, seq: int = 0) -> "DeltaBatch":
        batches = list(batches)
        if not batches:
            return cls.runs(np.zeros(0, np.uint64), np.zeros(0, np.int64), [])
        dbase = np.cumsum([0] + [b.payload.size for b in batches[:-1]])
        mbase = np.cumsum([0] + [b.masks.size for b in batches[:-1]])
        data_starts = np.concatenate([[0]] + [b.data_starts[1:] + o for b, o in zip(batches, dbase)])
        mask_starts = np.concatenate([[0]] + [b.mask_starts[1:] + o for b, o in zip(batches, mbase)])
        return cls(np.concatenate([b.page_ids for b in batches]),
                   np.concatenate([b.offsets for b in batches]),
                   data_starts.astype(np.int64), np.concatenate([b.payload for b in batches]),
                   np.concatenate([b.masked for b in batches]), mask_starts.astype(np.int64),
                   np.concatenate([b.masks for b in batches]), client_id, seq)

    def take(self, rows) -> "DeltaBatch":
        """The deltas at ``rows`` (in that order) as a new batch with the same delta id."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows]
        mlengths = np.diff(self.mask_starts)[rows]
        starts, mstarts = _starts(lengths), _starts(mlengths)
        payload = _gather(self.payload, self.data_starts[rows], lengths, starts)
        masks = _gather(self.masks, self.mask_starts[rows], mlengths, mstarts)
        return DeltaBatch(self.page_ids[rows], self.offsets[rows], starts, payload,
                          self.masked[rows], mstarts, masks, self.client_id, self.seq)

    def slice(self, lo: int, hi: int) -> "DeltaBatch":
        """Deltas ``lo..hi-1`` as a new batch with the same delta id: views of this batch's
        payload and masks, only the start columns rebased (no payload copy)."""
        d0, d1 = int(self.data_starts[lo]), int(self.data_starts[hi])
        m0, m1 = int(self.mask_starts[lo]), int(self.mask_starts[hi])
        return DeltaBatch(self.page_ids[lo:hi], self.offsets[lo:hi],
                          self.data_starts[lo:hi + 1] - d0, self.payload[d0:d1],
                          self.masked[lo:hi], self.mask_starts[lo:hi + 1] - m0,
                          self.masks[m0:m1], self.client_id, self.seq)

    # ---- properties -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.page_ids.size)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.data_starts)

    @property
    def nbytes(self) -> int:
        """Payload plus mask bytes: what ``batch_bytes_max`` bounds."""
        return int(self.payload.size + self.masks.size)

    def delta(self, i: int) -> tuple[int, int, bytes, bytes | None]:
        """Delta ``i`` as ``(page, offset, payload, mask or None)``; for tests and debugging."""
        data = self.payload[self.data_starts[i]:self.data_starts[i + 1]].tobytes()
        mask = (self.masks[self.mask_starts[i]:self.mask_starts[i + 1]].tobytes()
                if self.masked[i] else None)
        return int(self.page_ids[i]), int(self.offsets[i]), data, mask

    # ---- validation -----------------------------------------------------------------------------

    def check(self) -> None:
        """Structural validation (no page table needed): raises InvalidDeltaError naming the first
        delta at fault. Bounds against page sizes are checked by the arena."""
        from mmsb_dist import _cpu

        self.check_frame()
        code, i = _cpu.shape_fault(self.offsets, self.data_starts, self.masked, self.mask_starts,
                                   limits.page_bytes_max)
        if code != _cpu.OK:
            raise self.fault(code, i)

    def check_frame(self) -> None:
        """The O(1) part of validation: count and size limits, column shapes, buffer coverage."""
        n = len(self)
        if n == 0:
            raise InvalidDeltaError("empty batch: a batch needs at least one delta")
        if n > limits.batch_deltas_max:
            raise InvalidDeltaError(f"batch of {n} deltas is over limits.batch_deltas_max "
                                    f"({limits.batch_deltas_max})")
        if self.nbytes > limits.batch_bytes_max:
            raise InvalidDeltaError(f"batch of {self.nbytes} bytes is over limits.batch_bytes_max "
                                    f"({limits.batch_bytes_max})")
        for name, arr, size in (("offsets", self.offsets, n), ("masked", self.masked, n),
                                ("data_starts", self.data_starts, n + 1),
                                ("mask_starts", self.mask_starts, n + 1)):
            if arr.shape != (size,):
                raise InvalidDeltaError(f"column {name} has shape {arr.shape}, expected ({size},)")
        self._check_starts(self.data_starts, self.payload.size, "payload")
        self._check_starts(self.mask_starts, self.masks.size, "mask")

    def fault(self, code: int, i: int, page_bytes: int | None = None) -> Exception:
        """The typed error for fault ``code`` (see _cpu) at delta ``i``."""
        from mmsb_dist import _cpu
        from mmsb_dist.errors import UnknownPageError

        if code == _cpu.UNKNOWN_PAGE:
            return UnknownPageError(f"delta {i}: no page with id {int(self.page_ids[i])}",
                                    page=int(self.page_ids[i]), offset=int(self.offsets[i]),
                                    length=int(self.data_starts[i + 1] - self.data_starts[i]))
        n = int(self.data_starts[i + 1] - self.data_starts[i])
        message = {
            _cpu.NO_BYTES: "delta with no bytes",
            _cpu.BAD_OFFSET: f"offset outside [0, limits.page_bytes_max={limits.page_bytes_max})",
            _cpu.BAD_MASK: f"mask of {int(self.mask_starts[i + 1] - self.mask_starts[i])} bytes, "
                           f"expected {(n + 7) // 8 if self.masked[i] else 0}",
            _cpu.OUT_OF_BOUNDS: f"range beyond the page's {page_bytes} bytes",
        }[code]
        return self._at(i, message)

    def _check_starts(self, starts: np.ndarray, total: int, what: str) -> None:
        # Monotonic starts are checked per delta by _cpu.shape_fault (lengths >= 1, mask sizes).
        if starts[0] != 0 or starts[-1] != total:
            raise InvalidDeltaError(f"{what} offsets do not cut the {total}-byte {what} buffer "
                                    "into consecutive ranges")

    def _at(self, i, message: str) -> InvalidDeltaError:
        i = int(i)
        return InvalidDeltaError(f"delta {i}: {message}", page=int(self.page_ids[i]),
                                 offset=int(self.offsets[i]),
                                 length=int(self.data_starts[i + 1] - self.data_starts[i]))

    def kind_segments(self) -> list[tuple[int, int, bool]]:
        """Maximal ranges ``[lo, hi)`` of consecutive deltas of one encoding, in order, as
        ``(lo, hi, masked)``. Each is applied with one kernel launch."""
        m = self.masked
        if m.size == 0:
            return []
        if not m.any() or m.all():   # one encoding throughout: the usual batch
            return [(0, int(m.size), bool(m[0]))]
        cuts = np.flatnonzero(m[1:] != m[:-1]) + 1
        bounds = np.concatenate([[0], cuts, [m.size]])
        return [(int(a), int(b), bool(m[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def compose(*batches: DeltaBatch) -> DeltaBatch:
    """One delta per page with the combined effect of ``batches`` applied in order.

    ``apply(compose(a, b)) == apply(a); apply(b)`` on any state; later bytes win. The result is a
    normal form (a page's delta spans exactly the bytes any input touched, as a run where every
    byte in the span is set, else masked), so composition is associative as a value, not only in
    effect. Pages appear in the order of their first delta.
    """
    from mmsb_dist import _cpu
    from mmsb_dist.backend import get_backend

    batch = DeltaBatch.concat(batches)
    batch.check()
    uniq, first, inverse = np.unique(batch.page_ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # pages in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    group = rank[inverse]
    lengths = batch.lengths
    ends = batch.offsets + lengths
    lo = np.full(uniq.size, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.zeros(uniq.size, dtype=np.int64)
    np.minimum.at(lo, group, batch.offsets)
    np.maximum.at(hi, group, ends)
    span = hi - lo
    base = _starts(span)
    dest = base[group] + (batch.offsets - lo[group])
    data = np.zeros(int(base[-1]), dtype=np.uint8)
    cover = np.zeros_like(data)
    ones = np.ones(batch.payload.size, dtype=np.uint8)
    src = batch.data_starts[:-1]
    for a, b, masked in batch.kind_segments():
        if masked:
            msrc = batch.mask_starts[a:b]
            _cpu.merge_masked(data, dest[a:b], src[a:b], lengths[a:b], msrc, batch.payload, batch.masks)
            _cpu.merge_masked(cover, dest[a:b], src[a:b], lengths[a:b], msrc, ones, batch.masks)
        else:
            cpu = get_backend("numpy")
            cpu.scatter_runs(data, dest[a:b], src[a:b], lengths[a:b], batch.payload)
            cpu.scatter_runs(cover, dest[a:b], src[a:b], lengths[a:b], ones)
    full = np.logical_and.reduceat(cover.astype(bool), base[:-1]) if span.size else np.zeros(0, bool)
    masked = ~full
    mlen = np.where(masked, (span + 7) // 8, 0)
    mstarts = _starts(mlen)
    masks = np.zeros(int(mstarts[-1]), dtype=np.uint8)
    for p in np.flatnonzero(masked):  # one packbits per partially covered page
        masks[mstarts[p]:mstarts[p + 1]] = np.packbits(cover[base[p]:base[p + 1]], bitorder="little")
    # Bytes outside the coverage carry no meaning; zero them so equal effects give equal values.
    data[cover == 0] = 0
    return DeltaBatch(uniq[order], lo, base, data, masked, mstarts, masks,
                      batches[-1].client_id, batches[-1].seq)


def diff(page_id: int, old, new, *, backend=None) -> DeltaBatch | None:
    """The masked delta that turns ``old`` into ``new`` (same length), trimmed to the changed span;
    ``None`` when they are equal. Runs the compare kernel on ``backend`` (host arrays: CPU)."""
    from mmsb_dist.backend import get_backend

    be = backend or get_backend("numpy")
    a = old.reshape(-1).view(np.uint8)
    b = new.reshape(-1).view(np.uint8)
    if a.size != b.size:
        raise InvalidDeltaError(f"diff of ranges of different lengths ({a.size} != {b.size})",
                                page=int(page_id))
    mask = be.to_host(be.compare(a, b))
    nz = np.flatnonzero(mask)
    if nz.size == 0:
        return None
    bits = np.unpackbits(mask[nz[0]:nz[-1] + 1], bitorder="little")
    lo = int(np.argmax(bits))
    hi = int(bits.size - np.argmax(bits[::-1]))  # one past the last set bit
    first = int(nz[0]) * 8 + lo
    last = int(nz[0]) * 8 + hi - 1
    span_mask = np.packbits(bits[lo:hi], bitorder="little")
    payload = be.to_host(b[first:last + 1])
    return DeltaBatch.masked_deltas([page_id], [first], [span_mask], [payload])
