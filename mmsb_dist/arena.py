"""A shard's pages: one contiguous backend buffer plus a host page table.

The page table is slot-indexed NumPy arrays (id, offset, size, version, dtype, live) and an
open-addressing index id -> slot, so every lookup, validation and translation is vectorized over a
batch. Free space is reused by pages of the same aligned size; when the buffer is full it grows
(x ``limits.arena_growth_factor`` at least) and live pages are packed into the new buffer, which also
returns the space of freed pages of other sizes.

Invariants (checked by :meth:`PageArena.validate_state`): the index maps exactly the live ids to
their slots; live extents are aligned, inside ``[0, top)`` and pairwise disjoint; free extents are
disjoint from live ones.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numba
import numpy as np

from mmsb_dist import _cpu, limits
from mmsb_dist.backend import Backend, get_backend
from mmsb_dist.delta import DeltaBatch
from mmsb_dist.errors import CapacityError, InvalidDeltaError, InvalidPageError, UnknownPageError

__all__ = ["PageArena", "PageInfo", "ArenaSnapshot", "SnapshotFill", "DTYPES"]

# Page dtypes by code (the code is what page tables and checkpoints store).
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
          "float16", "float32", "float64")
_DTYPE_CODE = {name: code for code, name in enumerate(DTYPES)}
_ALIGN = limits.page_alignment_bytes


def dtype_code(dtype) -> int:
    name = np.dtype(dtype).name
    if name not in _DTYPE_CODE:
        raise InvalidPageError(f"unsupported page dtype {name!r}; supported: {', '.join(DTYPES)}")
    return _DTYPE_CODE[name]


def _host_pass(serial, parallel, n: int, *args):
    """A host pass over a batch of ``n`` deltas (page-table lookups, stamps: random accesses that
    threads overlap): ``parallel(*args, threads)`` from ``limits.cpu_parallel_runs_min`` deltas
    on, with as many threads as numba has up to ``limits.cpu_translate_threads_max``, else
    ``serial(*args)``. Returns what the kernel returns."""
    threads = 1
    if n >= limits.cpu_parallel_runs_min:
        threads = min(numba.get_num_threads(), limits.cpu_translate_threads_max)
    if threads > 1:
        return _cpu.run_parallel(parallel, *args, threads)
    return serial(*args)


def _align(n):
    return (n + (_ALIGN - 1)) // _ALIGN * _ALIGN


@dataclass(frozen=True)
class PageInfo:
    page_id: int
    offset: int
    size: int
    version: int
    dtype: str


@dataclass(frozen=True, eq=False)
class ArenaSnapshot:
    """A host copy of an arena's pages: what a checkpoint stores and a restore loads.

    ``data`` holds the pages' bytes back to back in the order of ``page_ids`` (``starts[i]`` is where
    page i begins; ``starts`` has n+1 entries). ``dtypes`` are codes into ``DTYPES``.
    """

    page_ids: np.ndarray   # u64[n]
    sizes: np.ndarray      # i64[n]
    versions: np.ndarray   # u64[n]
    dtypes: np.ndarray     # u8[n]
    hashes: np.ndarray     # u64[n], page hashes of the bytes in ``data``
    data: np.ndarray       # u8[sum(sizes)]
    next_id: int = 0

    @property
    def starts(self) -> np.ndarray:
        starts = np.zeros(self.sizes.size + 1, np.int64)
        np.cumsum(self.sizes, out=starts[1:])
        return starts

    def state_hash(self) -> int:
        return int(_cpu.combine_hashes(self.page_ids, self.hashes))


class SnapshotFill:
    """How much of a snapshot's ``data`` is copied yet (``PageArena.begin_snapshot``): the copier
    reports each chunk, a reader (the checkpoint writer) waits for the bytes it needs, so the
    write of a checkpoint overlaps the copy it writes from."""

    def __init__(self, total: int):
        self.total = int(total)
        self._done = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    def advance(self, done: int) -> None:
        with self._cond:
            self._done = int(done)
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The copy stopped: every waiter gets ``error`` (the snapshot is never complete)."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def wait(self, upto: int | None = None) -> None:
        """Return once the first ``upto`` bytes (None: all) are copied."""
        upto = self.total if upto is None else min(int(upto), self.total)
        with self._cond:
            while self._done < upto and self._error is None:
                self._cond.wait()
            if self._done < upto:
                raise RuntimeError("the snapshot's copy failed") from self._error


class PageArena:
    def __init__(self, backend: Backend | str = "auto",
                 capacity_bytes: int = limits.arena_bytes_initial):
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self._buf = self.backend.zeros(_align(max(int(capacity_bytes), _ALIGN)))
        self._scatter = self.backend.scatter_state(self._buf.size)
        self._top = 0  # bytes [0, top) have been handed out at least once
        self._free_extents: dict[int, list[np.ndarray]] = {}  # aligned size -> offsets
        self._nslots = 0
        self._free_slots: list[np.ndarray] = []
        self._ids = np.zeros(0, np.uint64)
        self._offsets = np.zeros(0, np.int64)
        self._sizes = np.zeros(0, np.int64)
        self._versions = np.zeros(0, np.uint64)
        self._dtypes = np.zeros(0, np.uint8)
        self._live = np.zeros(0, bool)
        self._dirty = np.zeros(0, bool)   # content changed since its hash was last taken
        self._hashes = np.zeros(0, np.uint64)
        self._resize_table(64)
        self._keys = np.full(128, _cpu.EMPTY_KEY, np.uint64)
        self._vals = np.zeros(128, np.int64)
        self._count = 0
        self.table_version = 0  # moves with every create and free (a validation made before is stale)
        self._next_id = 0
        self._apply_stamp = 0

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return int(self._buf.size)

    @property
    def page_count(self) -> int:
        return self._count

    @property
    def live_bytes(self) -> int:
        return int(self._sizes[: self._nslots][self._live[: self._nslots]].sum())

    @property
    def buffer(self):
        """The backend buffer (uint8). Kernels and benchmarks use it; callers must not keep it
        across a create (growth replaces it)."""
        return self._buf

    # ---- page table helpers --------------------------------------------------------------------

    def _resize_table(self, cap: int) -> None:
        for name in ("_ids", "_offsets", "_sizes", "_versions", "_dtypes", "_live", "_dirty",
                     "_hashes"):
            old = getattr(self, name)
            new = np.zeros(cap, dtype=old.dtype)
            new[: old.size] = old
            setattr(self, name, new)

    def _resize_index(self, cap: int) -> None:
        live = np.flatnonzero(self._live[: self._nslots])
        self._keys = np.full(cap, _cpu.EMPTY_KEY, np.uint64)
        self._vals = np.zeros(cap, np.int64)
        _cpu.index_insert(self._keys, self._vals, self._ids[live], live.astype(np.int64))

    def slots_of(self, page_ids) -> np.ndarray:
        """Slots of ``page_ids``; UnknownPageError naming the first unknown id."""
        ids = np.ascontiguousarray(page_ids, dtype=np.uint64).reshape(-1)
        out = np.empty(ids.size, np.int64)
        bad = _cpu.index_lookup(self._keys, self._vals, ids, out)
        if bad >= 0:
            raise UnknownPageError(f"no page with id {int(ids[bad])}", page=int(ids[bad]))
        return out

    def present(self, page_ids) -> np.ndarray:
        """Whether each id names a live page."""
        ids = np.ascontiguousarray(page_ids, dtype=np.uint64).reshape(-1)
        out = np.zeros(ids.size, bool)
        _cpu.index_present(self._keys, ids, out)
        return out

    def info(self, page_id: int) -> PageInfo:
        s = int(self.slots_of([page_id])[0])
        return PageInfo(int(self._ids[s]), int(self._offsets[s]), int(self._sizes[s]),
                        int(self._versions[s]), DTYPES[self._dtypes[s]])

    def versions(self, page_ids) -> np.ndarray:
        """The version (LSN of the last write) of each page; UnknownPageError for a missing one."""
        return self._versions[self.slots_of(page_ids)].copy()

    def spans(self, page_ids) -> dict[int, tuple[int, int, str]]:
        """page id -> (offset in the buffer, size, dtype) of the live pages among ``page_ids``;
        absent ones are left out. Valid until the next create (growth moves pages)."""
        ids = np.ascontiguousarray(page_ids, dtype=np.uint64).reshape(-1)
        ids = ids[self.present(ids)]
        slots = self.slots_of(ids)
        return dict(zip(ids.tolist(), zip(self._offsets[slots].tolist(),
                                          self._sizes[slots].tolist(),
                                          (DTYPES[d] for d in self._dtypes[slots].tolist()))))

    def page_ids(self) -> np.ndarray:
        """Live page ids, in slot order."""
        live = self._live[: self._nslots]
        return self._ids[: self._nslots][live].copy()

    # ---- create and free -----------------------------------------------------------------------

    def create_pages(self, n: int | None = None, size: int = 4096, dtype="uint8",
                     ids=None) -> np.ndarray:
        """Create pages (zeroed) and return their ids. With ``ids`` None the arena numbers them."""
        ids, code, size = self.check_create(n, size, dtype, ids)
        self.create_validated(ids, code, size)
        return ids

    def create_validated(self, ids: np.ndarray, code: int, size: int) -> None:
        """Create pages that check_create accepted (what it returned), without checking again."""
        n = ids.size
        if n:
            self.table_version += 1
            asize = _align(size)
            slots = self._take_slots(n)
            offsets = self._take_extents(n, asize)
            inserted = _cpu.index_insert(self._keys, self._vals, ids, slots)
            assert inserted < 0, "ids were checked to be new"
            self._count += n
            self._ids[slots], self._offsets[slots], self._sizes[slots] = ids, offsets, size
            self._versions[slots], self._dtypes[slots] = 0, code
            self._live[slots], self._dirty[slots] = True, True
            self._next_id = max(self._next_id, int(ids.max()) + 1)

    def check_create(self, n, size, dtype, ids=None) -> tuple[np.ndarray, int, int]:
        """Validate a create without changing anything: (ids it would create, dtype code, size).
        With ``ids`` None they are the next ``n`` ids of the arena's counter."""
        code = dtype_code(dtype)
        size = int(size)
        itemsize = np.dtype(DTYPES[code]).itemsize
        if size < 1 or size > limits.page_bytes_max:
            raise (CapacityError if size > 0 else InvalidPageError)(
                f"page size {size} outside [1, limits.page_bytes_max={limits.page_bytes_max}]",
                length=size)
        if size % itemsize:
            raise InvalidPageError(f"page size {size} is not a multiple of the {DTYPES[code]} "
                                   f"item size ({itemsize})", length=size)
        return self._new_ids(n, ids), code, size

    def _new_ids(self, n, ids) -> np.ndarray:
        if ids is None:
            if n is None or int(n) < 0:
                raise InvalidPageError("create_pages needs a page count or ids")
            n = int(n)
            if n > limits.pages_per_call_max:
                raise InvalidPageError(f"{n} pages in one call is over limits.pages_per_call_max")
            return np.arange(self._next_id, self._next_id + n, dtype=np.uint64)
        ids = np.ascontiguousarray(ids, dtype=np.uint64).reshape(-1)
        if n is not None and int(n) != ids.size:
            raise InvalidPageError(f"{n} pages asked for with {ids.size} ids")
        if ids.size > limits.pages_per_call_max:
            raise InvalidPageError(f"{ids.size} pages in one call is over "
                                   "limits.pages_per_call_max")
        if np.any(ids == _cpu.EMPTY_KEY):
            raise InvalidPageError("page id 2**64-1 is reserved", page=int(_cpu.EMPTY_KEY))
        uniq = np.unique(ids)
        if uniq.size != ids.size:
            dup = uniq[np.flatnonzero(np.bincount(np.searchsorted(uniq, ids)) > 1)[0]]
            raise InvalidPageError(f"page id {int(dup)} given twice", page=int(dup))
        self._refuse_existing(ids)
        return ids

    def _refuse_existing(self, ids: np.ndarray) -> None:
        if self._count == 0:
            return
        found = np.flatnonzero(self.present(ids))
        if found.size:
            pid = int(ids[found[0]])
            raise InvalidPageError(f"page {pid} already exists", page=pid)

    def _take_slots(self, n: int) -> np.ndarray:
        got = []
        while self._free_slots and sum(a.size for a in got) < n:
            a = self._free_slots.pop()
            need = n - sum(x.size for x in got)
            if a.size > need:
                self._free_slots.append(a[need:])
                a = a[:need]
            got.append(a)
        reused = sum(a.size for a in got)
        fresh = n - reused
        if self._nslots + fresh > self._ids.size:
            self._resize_table(max(self._ids.size * 2, self._nslots + fresh))
        got.append(np.arange(self._nslots, self._nslots + fresh, dtype=np.int64))
        self._nslots += fresh
        if 2 * (self._count + n) > self._keys.size:
            self._resize_index(1 << int(np.ceil(np.log2(4 * (self._count + n)))))
        return np.concatenate(got).astype(np.int64)

    def _take_extents(self, n: int, asize: int) -> np.ndarray:
        pool = self._free_extents.get(asize, [])
        reusable = sum(a.size for a in pool)
        fresh = n - min(n, reusable)
        if self._top + fresh * asize > self._buf.size:
            self._grow(n * asize)  # compacts: the free extents are gone afterwards
            pool, fresh = [], n
        got, left = [], n - fresh
        while left:
            a = pool.pop()
            if a.size > left:
                pool.append(a[left:])
                a = a[:left]
            got.append(a)
            left -= a.size
        if got:
            reused = np.concatenate(got)
            self.backend.zero_runs(self._buf, reused, np.full(reused.size, asize, np.int64))
        got.append(self._top + np.arange(fresh, dtype=np.int64) * asize)
        self._top += fresh * asize
        if not pool:
            self._free_extents.pop(asize, None)
        return np.concatenate(got)

    def _grow(self, extra: int) -> None:
        live = np.flatnonzero(self._live[: self._nslots])
        sizes = self._sizes[live]
        packed = np.zeros(live.size, np.int64)
        if live.size:
            np.cumsum(_align(sizes[:-1]), out=packed[1:])
        used = int(packed[-1] + _align(sizes[-1])) if live.size else 0
        cap = max(self._buf.size * limits.arena_growth_factor, _align(used + extra))
        new = self.backend.zeros(cap)
        if live.size:
            self.backend.copy_runs(new, packed, self._buf, self._offsets[live], sizes)
        self._buf = new
        self._scatter = self.backend.scatter_state(cap)
        self._offsets[live] = packed
        self._top = used
        self._free_extents.clear()

    def check_free(self, page_ids) -> tuple[np.ndarray, np.ndarray]:
        """Validate a free without changing anything: (ids, their slots)."""
        ids = np.ascontiguousarray(page_ids, dtype=np.uint64).reshape(-1)
        if np.unique(ids).size != ids.size:
            raise InvalidPageError("free_pages got the same id twice")
        return ids, self.slots_of(ids)

    def free_pages(self, page_ids) -> None:
        """Free pages; all must exist (UnknownPageError otherwise, and nothing is freed)."""
        self.free_validated(*self.check_free(page_ids))

    def free_validated(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Free what check_free accepted (its ids and slots), without checking again."""
        if ids.size == 0:
            return
        self.table_version += 1
        _cpu.index_delete(self._keys, self._vals, ids)
        self._count -= ids.size
        self._live[slots] = False
        self._dirty[slots] = False
        self._free_slots.append(slots)
        asizes = _align(self._sizes[slots])
        for asize in np.unique(asizes):
            self._free_extents.setdefault(int(asize), []).append(self._offsets[slots[asizes == asize]])

    # ---- deltas --------------------------------------------------------------------------------

    def validate(self, batch: DeltaBatch, shaped: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Check a whole batch against the page table; returns (slots, absolute dest offsets).
        Raises the typed error of the first delta at fault; changes nothing. ``shaped``: the
        batch's structure was checked already (decode_deltas does), so only the table is."""
        if not shaped:
            batch.check()
        n = len(batch)
        slots = np.empty(n, np.int64)
        dest = np.empty(n, np.int64)
        args = (batch.page_ids, batch.offsets, batch.data_starts, self._keys, self._vals,
                self._offsets, self._sizes, slots, dest)
        code, i = _host_pass(_cpu.translate, _cpu.translate_parallel, n, *args)
        if code != _cpu.OK:
            size = int(self._sizes[self.slots_of(batch.page_ids[i:i + 1])[0]]) \
                if code == _cpu.OUT_OF_BOUNDS else None
            raise batch.fault(code, i, size)
        return slots, dest

    def apply(self, batch: DeltaBatch, version: int | None = None) -> np.ndarray:
        """Validate, then apply a whole batch in order. Returns the slots it touched."""
        slots, dest = self.validate(batch)
        self.apply_validated(batch, slots, dest, version)
        return slots

    def apply_validated(self, batch: DeltaBatch, slots, dest, version: int | None = None) -> None:
        be = self.backend
        payload = be.upload(batch.payload)
        masks = be.upload(batch.masks) if batch.masks.size else None
        lengths = None   # built only for masked segments: runs read data_starts directly
        src = batch.data_starts[:-1]
        for a, b, masked in batch.kind_segments():
            if not masked:
                be.scatter_spans(self._buf, dest[a:b], batch.data_starts[a:b + 1], payload,
                                 self._scatter)
                continue
            if lengths is None:
                lengths = batch.lengths
            for wave in _occurrence_waves(batch.page_ids[a:b]):
                w = wave + a
                be.merge_masked(self._buf, dest[w], src[w], lengths[w], batch.mask_starts[w],
                                payload, masks)
        if version is None:
            self._apply_stamp += 1
            version = self._apply_stamp
        # A random store per delta: on a big batch, milliseconds on one thread.
        _host_pass(_cpu.stamp_pages, _cpu.stamp_pages_parallel, len(slots), self._versions,
                   self._dirty, slots, np.uint64(version))

    def write(self, page_id: int, offset: int, data, version: int | None = None) -> None:
        """One run. ``data`` as an array must be uint8 or the page's dtype."""
        s = int(self.slots_of([page_id])[0])
        if isinstance(data, np.ndarray) and data.dtype not in (np.uint8, np.dtype(DTYPES[self._dtypes[s]])):
            raise InvalidDeltaError(f"data of dtype {data.dtype} written to a "
                                    f"{DTYPES[self._dtypes[s]]} page", page=int(page_id),
                                    offset=int(offset), length=int(data.nbytes))
        self.apply(DeltaBatch.runs([page_id], [offset], [data]), version)

    # ---- reads ---------------------------------------------------------------------------------

    def view(self, page_id: int):
        """A typed view of the page on the backend (no copy). Read-only on the CPU backend; valid
        until the next create (growth moves pages)."""
        s = int(self.slots_of([page_id])[0])
        off, size = int(self._offsets[s]), int(self._sizes[s])
        v = self._buf[off:off + size].view(DTYPES[self._dtypes[s]])
        if isinstance(v, np.ndarray):
            v.flags.writeable = False
        return v

    def read(self, page_id: int) -> np.ndarray:
        """A host copy of the page, typed."""
        return np.array(self.backend.to_host(self.view(page_id)), copy=True)

    def read_many(self, page_ids) -> list[np.ndarray]:
        """Host copies of several pages, gathered on the backend and moved in one transfer."""
        slots = self.slots_of(page_ids)
        sizes = self._sizes[slots]
        starts = np.zeros(slots.size + 1, np.int64)
        np.cumsum(sizes, out=starts[1:])
        staging = self.backend.zeros(max(int(starts[-1]), 1))
        self.backend.copy_runs(staging, starts[:-1], self._buf, self._offsets[slots], sizes)
        host = self.backend.to_host(staging)
        return [host[starts[i]:starts[i + 1]].view(DTYPES[self._dtypes[s]]).copy()
                for i, s in enumerate(slots)]

    # ---- hashes --------------------------------------------------------------------------------

    def page_hashes(self, page_ids=None) -> np.ndarray:
        """Hashes of pages (all live pages in slot order when ``page_ids`` is None)."""
        if page_ids is None:
            slots = np.flatnonzero(self._live[: self._nslots])
        else:
            slots = self.slots_of(page_ids)
        self._refresh_hashes()
        return self._hashes[slots].copy()

    def _refresh_hashes(self) -> None:
        dirty = np.flatnonzero(self._dirty[: self._nslots])
        if dirty.size:
            self._hashes[dirty] = self.backend.page_hash(self._buf, self._offsets[dirty],
                                                         self._sizes[dirty])
            self._dirty[dirty] = False

    def state_hash(self) -> int:
        """Order-independent hash of every live page's id and bytes (see reference.combine_page_hashes)."""
        self._refresh_hashes()
        live = np.flatnonzero(self._live[: self._nslots])
        return int(_cpu.combine_hashes(self._ids[live], self._hashes[live]))

    # ---- snapshots -----------------------------------------------------------------------------

    def snapshot(self, reuse: np.ndarray | None = None) -> ArenaSnapshot:
        """A consistent host copy of every live page (gathered on the backend, one transfer).
        On the CPU backend ``reuse`` (the ``data`` of an earlier snapshot nobody reads any more)
        is written over when large enough: fresh memory costs a page fault per 4 KiB."""
        snap, copy = self.begin_snapshot(reuse)
        copy(SnapshotFill(snap.data.size))
        return snap

    def begin_snapshot(self, reuse: np.ndarray | None = None) -> tuple[ArenaSnapshot, object]:
        """``snapshot`` in two steps: the snapshot, whose table and hashes are final but whose
        ``data`` is filled only by ``copy(fill)``, which reports its progress to ``fill`` (a
        SnapshotFill) chunk by chunk on the CPU backend (the GPU's one transfer happens here).
        The arena must not change until ``copy`` returns."""
        slots = np.flatnonzero(self._live[: self._nslots])
        self._refresh_hashes()
        sizes = self._sizes[slots].copy()
        starts = np.zeros(slots.size + 1, np.int64)
        np.cumsum(sizes, out=starts[1:])
        total = max(int(starts[-1]), 1)
        offsets = self._offsets[slots]
        on_host = self.backend.xp is np
        if on_host and reuse is not None and reuse.base is not None and reuse.base.size >= total:
            staging = reuse.base[:total]
        else:
            staging = self.backend.zeros(total)
        if not on_host:
            self.backend.copy_runs(staging, starts[:-1], self._buf, offsets, sizes)
        # The staging buffer is the copy (on the GPU, to_host makes the host one): no second copy.
        data = self.backend.to_host(staging)[: int(starts[-1])]
        snap = ArenaSnapshot(self._ids[slots].copy(), sizes, self._versions[slots].copy(),
                             self._dtypes[slots].copy(), self._hashes[slots].copy(), data,
                             self._next_id)

        def copy(fill: SnapshotFill) -> None:
            if on_host:
                for a, b in page_chunks(starts, limits.checkpoint_io_chunk_bytes):
                    self.backend.copy_runs(staging, starts[a:b], self._buf, offsets[a:b],
                                           sizes[a:b])
                    fill.advance(int(starts[b]))
            fill.advance(int(starts[-1]))

        return snap, copy

    @classmethod
    def from_snapshot(cls, snap: ArenaSnapshot, backend: Backend | str = "auto") -> "PageArena":
        """A new arena holding exactly the snapshot's pages (ids, bytes, versions, dtypes)."""
        arena = cls(backend, capacity_bytes=max(int(_align(snap.sizes).sum()), _ALIGN))
        n = snap.page_ids.size
        if n:
            slots = arena._take_slots(n)
            asizes = _align(snap.sizes)
            offsets = np.zeros(n, np.int64)
            np.cumsum(asizes[:-1], out=offsets[1:])
            arena._top = int(asizes.sum())
            arena.backend.copy_runs(arena._buf, offsets, arena.backend.upload(snap.data),
                                    snap.starts[:-1], snap.sizes)
            assert _cpu.index_insert(arena._keys, arena._vals, snap.page_ids, slots) < 0
            arena._count = n
            arena._ids[slots], arena._offsets[slots] = snap.page_ids, offsets
            arena._sizes[slots], arena._versions[slots] = snap.sizes, snap.versions
            arena._dtypes[slots], arena._live[slots], arena._dirty[slots] = snap.dtypes, True, True
        arena._next_id = int(snap.next_id)
        return arena

    # ---- invariants ----------------------------------------------------------------------------

    def validate_state(self) -> None:
        """Assert every invariant of the page table; cheap enough to run after every test."""
        n = self._nslots
        live = np.flatnonzero(self._live[:n])
        assert live.size == self._count, (live.size, self._count)
        assert np.count_nonzero(self._keys != _cpu.EMPTY_KEY) == self._count
        if live.size:
            assert np.array_equal(self.slots_of(self._ids[live]), live)
        offs, sizes = self._offsets[live], self._sizes[live]
        assert np.all(offs % _ALIGN == 0) and np.all(offs + sizes <= self._top)
        assert self._top <= self._buf.size
        order = np.argsort(offs)
        ends = offs[order] + _align(sizes[order])
        assert np.all(ends[:-1] <= offs[order][1:]), "live pages overlap"
        free = np.concatenate([np.concatenate(v) for v in self._free_extents.values()]) \
            if self._free_extents else np.zeros(0, np.int64)
        assert not np.intersect1d(free, offs).size, "a free extent is also live"


def page_chunks(starts: np.ndarray, chunk: int) -> list[tuple[int, int]]:
    """Consecutive groups [a, b) of the pages laid out at ``starts`` (n+1 offsets), each ending at
    the first page end at or past a multiple of ``chunk`` bytes (a larger page is a group)."""
    n = starts.size - 1
    if n <= 0:
        return []
    cuts = np.unique(np.concatenate([[0, n], np.searchsorted(starts, np.arange(0, starts[-1],
                                                                           chunk))]))
    return list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))


def _occurrence_waves(page_ids: np.ndarray) -> list[np.ndarray]:
    """Split masked deltas into waves in which every page appears at most once; wave k holds the
    k-th delta of each page. Deltas of different pages never overlap, so applying waves in order
    keeps per-page order while each wave runs in parallel."""
    if page_ids.size <= 1:
        return [np.arange(page_ids.size)]
    order = np.argsort(page_ids, kind="stable")
    sorted_ids = page_ids[order]
    new_group = np.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]])
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(order.size), 0))
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size) - group_start
    if rank.max() == 0:
        return [np.arange(page_ids.size)]
    return [np.flatnonzero(rank == k) for k in range(int(rank.max()) + 1)]
