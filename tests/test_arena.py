"""Page arena: batched create/free with reuse, growth with compaction, typed views, snapshots."""

import numpy as np
import pytest

from mmsb_dist import (CapacityError, InvalidPageError, PageArena, UnknownPageError,
                       limits)
from mmsb_dist.arena import DTYPES
from oracle import PageOracle, random_batch


def test_create_read_free_reuse(backend, rng):
    arena = PageArena(backend, capacity_bytes=4096)
    ids = arena.create_pages(10, 100)
    assert ids.tolist() == list(range(10))
    for pid in ids:
        arena.write(int(pid), 0, rng.integers(1, 256, 100, dtype=np.uint8))
    offsets_before = {int(p): arena.info(int(p)).offset for p in ids}
    arena.free_pages(ids[:5])
    with pytest.raises(UnknownPageError):
        arena.read(int(ids[0]))
    again = arena.create_pages(5, 100)  # same aligned size: the freed extents come back, zeroed
    assert {arena.info(int(p)).offset for p in again} == {offsets_before[int(p)] for p in ids[:5]}
    for pid in again:
        assert not arena.read(int(pid)).any()
    arena.validate_state()


def test_growth_compacts_and_keeps_bytes(backend, rng):
    arena = PageArena(backend, capacity_bytes=1024)
    oracle = PageOracle()
    pages = {}
    for size in rng.integers(1, 3000, 60):
        for pid in arena.create_pages(3, int(size)):
            pages[int(pid)] = int(size)
            oracle.create(int(pid), int(size))
        if rng.random() < 0.3:  # free some, so growth has holes to compact away
            victim = int(rng.choice(list(pages)))
            arena.free_pages([victim])
            del pages[victim], oracle.pages[victim]
        batch = random_batch(rng, pages, 20)
        arena.apply(batch)
        oracle.apply(batch)
    assert arena.capacity_bytes > 1024
    for pid in pages:
        assert arena.read(pid).tobytes() == oracle.bytes_of(pid)
    arena.validate_state()


def test_one_million_pages_in_one_batch(backend):
    arena = PageArena(backend)
    ids = arena.create_pages(1_000_000, 64)
    assert arena.page_count == 1_000_000
    arena.write(int(ids[-1]), 60, b"tail")
    assert arena.read(int(ids[-1]))[60:].tobytes() == b"tail"
    arena.free_pages(ids[::2])
    assert arena.page_count == 500_000
    arena.validate_state()


@pytest.mark.parametrize("dtype", DTYPES)
def test_typed_views(backend, dtype, rng):
    arena = PageArena(backend)
    itemsize = np.dtype(dtype).itemsize
    pid = int(arena.create_pages(1, 64 * itemsize, dtype=dtype)[0])
    values = rng.integers(0, 100, 64).astype(dtype)
    arena.write(pid, 0, values)
    got = arena.read(pid)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, values)
    view = arena.view(pid)
    assert view.dtype == np.dtype(dtype) and view.shape == (64,)
    assert arena.info(pid).dtype == dtype


def test_create_refuses_bad_arguments_and_changes_nothing(backend):
    arena = PageArena(backend)
    arena.create_pages(ids=[5, 6], size=16)
    for kwargs, err in [
        (dict(n=1, size=0), InvalidPageError),
        (dict(n=1, size=limits.page_bytes_max + 1), CapacityError),
        (dict(n=1, size=6, dtype="float32"), InvalidPageError),
        (dict(n=1, size=8, dtype="complex64"), InvalidPageError),
        (dict(ids=[7, 5], size=8), InvalidPageError),      # 5 exists: 7 must not be created
        (dict(ids=[8, 8], size=8), InvalidPageError),
        (dict(ids=[2**64 - 1], size=8), InvalidPageError),
    ]:
        with pytest.raises(err):
            arena.create_pages(**kwargs)
    assert sorted(arena.page_ids().tolist()) == [5, 6]
    with pytest.raises(UnknownPageError):
        arena.free_pages([5, 99])
    assert sorted(arena.page_ids().tolist()) == [5, 6]
    arena.validate_state()


def test_read_many_and_versions(backend, rng):
    arena = PageArena(backend)
    ids = arena.create_pages(20, 33)
    batch = random_batch(rng, {int(i): 33 for i in ids}, 100)
    arena.apply(batch, version=42)
    many = arena.read_many(ids)
    for pid, got in zip(ids, many):
        assert got.tobytes() == arena.read(int(pid)).tobytes()
    touched = set(batch.page_ids.tolist())
    for pid in ids:
        assert arena.info(int(pid)).version == (42 if int(pid) in touched else 0)


def test_snapshot_round_trip_and_state_hash(backend, rng):
    arena = PageArena(backend)
    ids = np.concatenate([arena.create_pages(10, int(s)) for s in rng.integers(1, 5000, 5)])
    sizes = {int(p): arena.info(int(p)).size for p in ids}
    arena.apply(random_batch(rng, sizes, 200))
    arena.free_pages(ids[3:7])
    snap = arena.snapshot()
    assert snap.state_hash() == arena.state_hash()
    copy = PageArena.from_snapshot(snap, backend)
    assert copy.state_hash() == arena.state_hash()
    for pid in arena.page_ids():
        assert copy.read(int(pid)).tobytes() == arena.read(int(pid)).tobytes()
        assert copy.info(int(pid)).version == arena.info(int(pid)).version
    copy.validate_state()
    h = arena.state_hash()
    arena.write(int(arena.page_ids()[0]), 0, b"\x01")
    assert arena.state_hash() != h or arena.read(int(arena.page_ids()[0]))[0] == 1
