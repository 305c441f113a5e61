"""The laws of deltas, on every backend, against the per-byte oracle (tests/oracle.py).

apply: the arena equals the oracle after any batch; compose: applying compose(a, b) equals applying
a then b, and composition is associative; diff: applying diff(old, new) to old gives new; encode ->
decode round-trips exactly; bad input raises the typed error and leaves every byte as it was.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmsb_dist import (DeltaBatch, InvalidDeltaError, PageArena, SerializationError,
                       UnknownPageError, compose, decode_deltas, diff, encode_deltas)
from mmsb_dist import limits
from oracle import PageOracle, random_batch

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

page_sizes = st.one_of(st.integers(1, 64), st.integers(1, 4096), st.integers(1, 1 << 20))


def _world(backend, sizes, seed):
    arena = PageArena(backend)
    oracle = PageOracle()
    pages = {}
    for size in sizes:
        pid = int(arena.create_pages(1, size)[0])
        oracle.create(pid, size)
        pages[pid] = size
    return arena, oracle, pages, np.random.default_rng(seed)


def _assert_same(arena, oracle):
    for pid in oracle.pages:
        assert arena.read(pid).tobytes() == oracle.bytes_of(pid), f"page {pid} differs"
    arena.validate_state()


@SETTINGS
@given(sizes=st.lists(page_sizes, min_size=1, max_size=4), seed=st.integers(0, 2**32),
       batches=st.integers(1, 3), n=st.integers(1, 40), masked=st.sampled_from([0.0, 0.3, 1.0]))
def test_apply_matches_oracle(backend, sizes, seed, batches, n, masked):
    arena, oracle, pages, rng = _world(backend, sizes, seed)
    for _ in range(batches):
        batch = random_batch(rng, pages, n, masked_fraction=masked)
        arena.apply(batch)
        oracle.apply(batch)
    _assert_same(arena, oracle)


@SETTINGS
@given(sizes=st.lists(page_sizes, min_size=1, max_size=3), seed=st.integers(0, 2**32),
       n=st.integers(1, 25))
def test_compose_law_and_associativity(backend, sizes, seed, n):
    arena, oracle, pages, rng = _world(backend, sizes, seed)
    a, b, c = (random_batch(rng, pages, n) for _ in range(3))
    ab = compose(a, b)
    assert len(ab) == len(np.unique(np.concatenate([a.page_ids, b.page_ids])))
    arena.apply(ab)
    oracle.apply(a)
    oracle.apply(b)
    _assert_same(arena, oracle)
    left, right = compose(compose(a, b), c), compose(a, compose(b, c))
    for x, y in zip((left.page_ids, left.offsets, left.payload, left.masks, left.masked),
                    (right.page_ids, right.offsets, right.payload, right.masks, right.masked)):
        np.testing.assert_array_equal(x, y)


@SETTINGS
@given(size=page_sizes, seed=st.integers(0, 2**32), flips=st.integers(0, 50))
def test_diff_turns_old_into_new(backend, size, seed, flips):
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, size, dtype=np.uint8)
    new = old.copy()
    idx = rng.integers(0, size, flips)
    new[idx] = rng.integers(0, 256, flips, dtype=np.uint8)
    arena = PageArena(backend)
    pid = int(arena.create_pages(1, size)[0])
    arena.write(pid, 0, old)
    delta = diff(pid, backend.upload(old), backend.upload(new), backend=backend)
    if np.array_equal(old, new):
        assert delta is None
        return
    assert delta.masked[0] and len(delta) == 1
    changed = np.flatnonzero(old != new)
    assert delta.offsets[0] == changed[0] and delta.lengths[0] == changed[-1] - changed[0] + 1
    arena.apply(delta)
    assert arena.read(pid).tobytes() == new.tobytes()


@SETTINGS
@given(sizes=st.lists(page_sizes, min_size=1, max_size=3), seed=st.integers(0, 2**32),
       n=st.integers(1, 30), client=st.integers(0, 2**64 - 1), seq=st.integers(0, 2**64 - 1))
def test_encode_decode_round_trip(sizes, seed, n, client, seq):
    rng = np.random.default_rng(seed)
    pages = {i: s for i, s in enumerate(sizes)}
    batch = random_batch(rng, pages, n)
    batch = DeltaBatch(batch.page_ids, batch.offsets, batch.data_starts, batch.payload,
                       batch.masked, batch.mask_starts, batch.masks, client, seq)
    out = decode_deltas(encode_deltas(batch))
    assert (out.client_id, out.seq) == (client, seq)
    for name in ("page_ids", "offsets", "data_starts", "payload", "masked", "mask_starts", "masks"):
        np.testing.assert_array_equal(getattr(out, name), getattr(batch, name), err_msg=name)


@SETTINGS
@given(sizes=st.lists(page_sizes, min_size=1, max_size=3), seed=st.integers(0, 2**32),
       n=st.integers(1, 30), data=st.data())
def test_slice_equals_take_of_the_range_and_shares_the_payload(sizes, seed, n, data):
    rng = np.random.default_rng(seed)
    batch = random_batch(rng, {i: s for i, s in enumerate(sizes)}, n)
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    got, want = batch.slice(lo, hi), batch.take(np.arange(lo, hi))
    for name in ("page_ids", "offsets", "data_starts", "payload", "masked", "mask_starts", "masks"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    got.check()
    assert got.payload.size == 0 or np.shares_memory(got.payload, batch.payload)


def test_decode_is_zero_copy_for_payload():
    batch = DeltaBatch.runs([1, 2], [0, 0], np.full((2, 1000), 7, np.uint8))
    buf = encode_deltas(batch)
    out = decode_deltas(buf)
    base = np.frombuffer(buf, np.uint8)
    assert np.shares_memory(out.payload, base)


# ---- bad input: typed error, nothing changed ------------------------------------------------------

def _bad_inputs(pages):
    ids = list(pages)
    big = ids[0]
    yield UnknownPageError, DeltaBatch.runs([123456789], [0], [b"x"])
    yield InvalidDeltaError, DeltaBatch.runs([big], [pages[big]], [b"x"])          # past the end
    yield InvalidDeltaError, DeltaBatch.runs([big], [pages[big] - 1], [b"xy"])      # straddles
    yield InvalidDeltaError, DeltaBatch.runs([big], [-1], [b"x"])
    yield InvalidDeltaError, DeltaBatch.runs([], [], [])                             # empty
    good = DeltaBatch.runs([big], [0], [b"ok"])
    yield InvalidDeltaError, DeltaBatch(good.page_ids, good.offsets, np.array([0, 5]),
                                        good.payload, good.masked, good.mask_starts, good.masks)
    m = DeltaBatch.masked_deltas([big], [0], [b"\x01\x02"], [b"abc"])               # mask too long
    yield InvalidDeltaError, m
    # a valid first delta followed by a bad one: the whole batch is refused
    yield UnknownPageError, DeltaBatch.concat([good, DeltaBatch.runs([987654321], [0], [b"z"])])
    yield InvalidDeltaError, DeltaBatch.concat([good, DeltaBatch.runs([big], [pages[big]], [b"z"])])


def test_bad_input_raises_typed_error_and_changes_nothing(backend, rng):
    arena = PageArena(backend)
    ids = arena.create_pages(3, 100)
    pages = {int(i): 100 for i in ids}
    arena.apply(random_batch(rng, pages, 50))
    before = {p: arena.read(p).tobytes() for p in pages}
    versions = {p: arena.info(p).version for p in pages}
    for err, batch in _bad_inputs(pages):
        with pytest.raises(err) as info:
            arena.apply(batch)
        assert "page=" in str(info.value) or err is InvalidDeltaError
    assert {p: arena.read(p).tobytes() for p in pages} == before
    assert {p: arena.info(p).version for p in pages} == versions
    arena.validate_state()


def test_oversized_batch_is_refused(backend, monkeypatch):
    arena = PageArena(backend)
    pid = int(arena.create_pages(1, 64)[0])
    monkeypatch.setattr(limits, "batch_deltas_max", 3)
    with pytest.raises(InvalidDeltaError, match="batch_deltas_max"):
        arena.apply(DeltaBatch.runs([pid] * 4, [0, 1, 2, 3], [b"a"] * 4))
    monkeypatch.setattr(limits, "batch_deltas_max", 1 << 20)
    monkeypatch.setattr(limits, "batch_bytes_max", 10)
    with pytest.raises(InvalidDeltaError, match="batch_bytes_max"):
        arena.apply(DeltaBatch.runs([pid], [0], [b"x" * 11]))
    assert arena.read(pid).tobytes() == bytes(64)


def test_wrong_dtype_write_is_refused(backend):
    arena = PageArena(backend)
    pid = int(arena.create_pages(1, 64, dtype="float32")[0])
    arena.write(pid, 0, np.arange(4, dtype=np.float32))
    with pytest.raises(InvalidDeltaError, match="dtype"):
        arena.write(pid, 0, np.arange(4, dtype=np.int64))
    np.testing.assert_array_equal(arena.read(pid)[:4], np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("cut", ["truncate", "flip", "garbage", "wrong_kind"])
def test_malformed_arrow_is_refused(backend, rng, cut):
    arena = PageArena(backend)
    ids = arena.create_pages(2, 256)
    pages = {int(i): 256 for i in ids}
    arena.apply(random_batch(rng, pages, 10))
    before = [arena.read(p).tobytes() for p in pages]
    data = bytearray(encode_deltas(random_batch(rng, pages, 20)).to_pybytes())
    if cut == "truncate":
        data = data[: int(rng.integers(1, len(data) - 1))]
    elif cut == "flip":  # flip bits in the metadata region (schema / buffer lengths)
        for pos in rng.integers(0, 200, 8):
            data[pos] ^= 0xFF
    elif cut == "garbage":
        data = bytearray(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    else:
        from mmsb_dist import encode_events
        data = bytearray(encode_events(1, 1, [1], [0]).to_pybytes())
    with pytest.raises((SerializationError, InvalidDeltaError)):
        arena.apply(decode_deltas(bytes(data)))
    assert [arena.read(p).tobytes() for p in pages] == before


@pytest.mark.parametrize("threads", [3, 6], ids=["threads walk the batch", "batch filed by range"])
def test_large_batches_take_the_threaded_paths_and_keep_order(backend, rng, monkeypatch, threads):
    """Over limits.cpu_parallel_runs_min deltas the CPU backend validates and scatters on several
    threads (from limits.cpu_bucketed_scatter_threads_min on, with the batch filed by range);
    order, bounds and the first-fault report must be those of the serial definition."""
    monkeypatch.setattr(limits, "cpu_parallel_runs_min", 1000)
    if hasattr(backend, "threads"):
        monkeypatch.setattr(backend, "threads", threads)
        assert (threads >= limits.cpu_bucketed_scatter_threads_min) == (threads == 6)
    arena = PageArena(backend)
    ids = arena.create_pages(50, 512)
    pages = {int(i): 512 for i in ids}
    oracle = PageOracle()
    for pid in pages:
        oracle.create(pid, 512)
    arena.page_hashes(ids)  # every page's hash is current: only the stamps mark pages again
    batch = random_batch(rng, {p: pages[p] for p in list(pages)[:30]}, 5000, masked_fraction=0.0,
                         max_len=300)
    arena.apply(batch, version=7)
    oracle.apply(batch)
    _assert_same(arena, oracle)
    touched = set(batch.page_ids.tolist())
    assert arena.versions(ids).tolist() == [7 if int(p) in touched else 0 for p in ids]
    slots = arena.slots_of(ids)
    fresh = backend.to_host(backend.page_hash(arena._buf, arena._offsets[slots],
                                              arena._sizes[slots]))
    assert np.array_equal(arena.page_hashes(ids), fresh)  # every touched page was marked
    before = {p: arena.read(p).tobytes() for p in pages}
    late_bad = DeltaBatch.concat([random_batch(rng, pages, 4000, masked_fraction=0.0),
                                  DeltaBatch.runs([int(ids[0])], [510], [b"abc"]),
                                  DeltaBatch.runs([424242], [0], [b"x"])])
    with pytest.raises(InvalidDeltaError) as info:  # the earlier of the two faults is reported
        arena.apply(late_bad)
    assert info.value.page == int(ids[0]) and info.value.offset == 510
    assert {p: arena.read(p).tobytes() for p in pages} == before
