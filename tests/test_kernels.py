"""Every backend kernel against its definition in kernels/reference.py, on random inputs.

One body per kernel, run on each backend (the ``backend`` fixture). Outputs are poisoned first and
inputs are random (never zeros), so an unwritten byte or a wrong index cannot pass.
"""

import numpy as np
import pytest

from mmsb_dist.kernels import reference as ref


def _runs(rng, arena_size, n, max_len, *, aligned=False, disjoint=False):
    lengths = rng.integers(1, max_len + 1, n)
    if aligned:
        lengths = (lengths + 15) // 16 * 16
    if disjoint:
        slot = max_len + 16
        n = min(n, arena_size // slot)
        lengths = lengths[:n]
        dest = rng.permutation(arena_size // slot)[:n] * slot
    else:
        dest = rng.integers(0, arena_size - lengths)
        if aligned:
            dest -= dest % 16
    src = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1], out=src[1:])
    return dest.astype(np.int64), src, lengths.astype(np.int64)


def _dev(backend, a):
    return backend.upload(np.ascontiguousarray(a))


def _scatter_batches_match_reference(backend, rng, size, runs, state=None, batches=3) -> None:
    """Scatter ``batches`` batches of runs ``runs()`` -> (dest, src, lengths) with random
    payloads into one random arena, on the backend and by the reference; after each batch the
    two must be equal (several batches: stale scatter state from earlier ones must not matter)."""
    arena = rng.integers(0, 256, size, dtype=np.uint8)
    dev = _dev(backend, arena)
    state = backend.scatter_state(size) if state is None else state
    for _ in range(batches):
        dest, src, lengths = runs()
        payload = rng.integers(0, 256, int(np.sum(lengths)), dtype=np.uint8)
        ref.scatter_runs(arena, dest, src, lengths, payload)
        backend.scatter_runs(dev, dest, src, lengths, _dev(backend, payload), state)
        np.testing.assert_array_equal(backend.to_host(dev), arena)


def _back_to_back(lengths):
    """Source offsets of runs whose payloads follow each other."""
    return np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("max_len", [1, 64, 700, 9000])
def test_scatter_runs_matches_reference_with_overlaps(backend, rng, aligned, max_len):
    size = 1 << 16
    arena = rng.integers(0, 256, size, dtype=np.uint8)
    for trial in range(3):  # several batches: stale stamps from earlier batches must not matter
        dest, src, lengths = _runs(rng, size, int(rng.integers(1, 400)), max_len, aligned=aligned)
        payload = rng.integers(0, 256, int(lengths.sum()), dtype=np.uint8)
        want = arena.copy()
        ref.scatter_runs(want, dest, src, lengths, payload)
        dev = _dev(backend, arena)
        state = backend.scatter_state(size)
        backend.scatter_runs(dev, dest, src, lengths, _dev(backend, payload), state)
        np.testing.assert_array_equal(backend.to_host(dev), want)


def test_scatter_runs_heavy_duplicates_keep_batch_order(backend, rng):
    """Many runs hitting the same few bytes at odd alignments: only order decides the result."""
    def runs():
        lengths = rng.integers(1, 40, 2000)
        return rng.integers(0, 200, 2000), _back_to_back(lengths), lengths

    _scatter_batches_match_reference(backend, rng, 4096, runs, batches=4)


@pytest.mark.parametrize("max_len", [3, 64, 5000])
def test_copy_runs_matches_reference(backend, rng, max_len):
    size = 1 << 16
    dst = rng.integers(0, 256, size, dtype=np.uint8)
    dest, src, lengths = _runs(rng, size, 50, max_len, disjoint=True)
    payload = rng.integers(0, 256, int(lengths.sum()), dtype=np.uint8)
    want = dst.copy()
    ref.copy_runs(want, dest, payload, src, lengths)
    dev = _dev(backend, dst)
    backend.copy_runs(dev, dest, _dev(backend, payload), src, lengths)
    np.testing.assert_array_equal(backend.to_host(dev), want)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_merge_masked_matches_reference(backend, rng, aligned, density):
    size = 1 << 16
    arena = rng.integers(0, 256, size, dtype=np.uint8)
    dest, src, lengths = _runs(rng, size, 40, 1500, aligned=aligned, disjoint=True)
    payload = rng.integers(0, 256, int(lengths.sum()), dtype=np.uint8)
    mlen = (lengths + 7) // 8
    mask_src = np.concatenate([[0], np.cumsum(mlen[:-1])]).astype(np.int64)
    bits = rng.random(int(mlen.sum()) * 8) < density
    masks = np.packbits(bits, bitorder="little")
    want = arena.copy()
    ref.merge_masked(want, dest, src, lengths, mask_src, payload, masks)
    dev = _dev(backend, arena)
    backend.merge_masked(dev, dest, src, lengths, mask_src, _dev(backend, payload),
                         _dev(backend, masks))
    np.testing.assert_array_equal(backend.to_host(dev), want)


def test_zero_runs_matches_reference(backend, rng):
    size = 1 << 15
    arena = rng.integers(1, 256, size, dtype=np.uint8)
    dest, _, lengths = _runs(rng, size, 30, 900, disjoint=True)
    want = arena.copy()
    ref.zero_runs(want, dest, lengths)
    dev = _dev(backend, arena)
    backend.zero_runs(dev, dest, lengths)
    np.testing.assert_array_equal(backend.to_host(dev), want)


def test_kernels_take_views_that_are_not_16_byte_aligned(backend, rng):
    """A payload or an arena that is a view 8 bytes into its buffer: offsets that look aligned are
    not, and the kernels must fall back to bytes (on the GPU, a 16-byte access there is a
    misaligned-address fault that kills the context)."""
    size, skew = 1 << 14, 8
    base = rng.integers(0, 256, size + skew, dtype=np.uint8)
    dest, src, lengths = _runs(rng, size, 40, 300, aligned=True, disjoint=True)
    payload = rng.integers(0, 256, int(lengths.sum()) + skew, dtype=np.uint8)
    masks = rng.integers(0, 256, (int(lengths.sum()) + 7) // 8 + 1, dtype=np.uint8)
    mask_src = np.concatenate([[0], np.cumsum((lengths[:-1] + 7) // 8)]).astype(np.int64)
    want = base[skew:].copy()
    ref.scatter_runs(want, dest, src, lengths, payload[skew:])
    ref.merge_masked(want, dest, src, lengths, mask_src, payload[skew:], masks)
    ref.zero_runs(want, dest[::2], lengths[::2])
    dev = _dev(backend, base)
    arena, pay = dev[skew:], _dev(backend, payload)[skew:]
    backend.scatter_runs(arena, dest, src, lengths, pay, backend.scatter_state(size))
    backend.merge_masked(arena, dest, src, lengths, mask_src, pay, _dev(backend, masks))
    backend.zero_runs(arena, dest[::2], lengths[::2])
    np.testing.assert_array_equal(backend.to_host(arena), want)
    np.testing.assert_array_equal(backend.to_host(dev)[:skew], base[:skew])
    # 64-byte runs at 64-byte offsets from an aligned payload, into the unaligned arena view (on
    # the GPU such a batch would otherwise go by granule number, 16 bytes at a time).
    n = 200
    dest = rng.integers(0, size // 64, n) * 64
    src, lengths = np.arange(n, dtype=np.int64) * 64, np.full(n, 64, np.int64)
    payload = rng.integers(0, 256, n * 64, dtype=np.uint8)
    ref.scatter_runs(want, dest, src, lengths, payload)
    backend.scatter_runs(arena, dest, src, lengths, _dev(backend, payload),
                         backend.scatter_state(size))
    np.testing.assert_array_equal(backend.to_host(arena), want)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 1000, 4099])
def test_compare_matches_reference(backend, rng, n):
    a = rng.integers(0, 256, n, dtype=np.uint8)
    b = a.copy()
    flip = rng.random(n) < 0.3
    b[flip] ^= rng.integers(1, 256, int(flip.sum()), dtype=np.uint8)
    got = backend.to_host(backend.compare(_dev(backend, a), _dev(backend, b)))
    np.testing.assert_array_equal(got, ref.compare(a, b))


def test_page_hash_matches_reference(backend, rng):
    size = 1 << 18
    arena = rng.integers(0, 256, size, dtype=np.uint8)
    lengths = np.concatenate([np.arange(1, 40), rng.integers(1, 20000, 30)]).astype(np.int64)
    offsets = rng.integers(0, size - lengths)  # unaligned starts exercise the byte path
    offsets[::2] -= offsets[::2] % 16
    got = backend.page_hash(_dev(backend, arena), offsets, lengths)
    np.testing.assert_array_equal(got, ref.page_hash(arena, offsets, lengths))


def test_hash_changes_with_any_byte_and_with_length(rng):
    base = rng.integers(0, 256, 333, dtype=np.uint8)
    h = ref.hash_bytes(base)
    for pos in rng.integers(0, 333, 20):
        other = base.copy()
        other[pos] ^= 1
        assert ref.hash_bytes(other) != h
    assert ref.hash_bytes(np.zeros(8, np.uint8)) != ref.hash_bytes(np.zeros(9, np.uint8))


def test_gpu_is_available_only_with_cooperative_launches(monkeypatch):
    """"auto" picks the CUDA backend only for a device it can drive: the scatter's runs_post is a
    cooperative launch, so a device without them counts as no GPU (and the numpy backend runs)."""
    import sys
    import types

    from mmsb_dist import backend as bk

    for cooperative, want in ((1, True), (0, False)):
        device = types.SimpleNamespace(attributes={"CooperativeLaunch": cooperative})
        fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
            Device=lambda index=0, device=device: device))
        monkeypatch.setitem(sys.modules, "cupy", fake)
        assert bk.gpu_available() is want


@pytest.mark.gpu
def test_page_hashes_agree_between_backends(rng):
    from mmsb_dist.backend import get_backend

    cpu, gpu = get_backend("numpy"), get_backend("cupy")
    arena = rng.integers(0, 256, 1 << 22, dtype=np.uint8)
    lengths = rng.integers(1, 1 << 16, 200).astype(np.int64)
    offsets = (rng.integers(0, arena.size - lengths) // 16 * 16).astype(np.int64)
    np.testing.assert_array_equal(cpu.page_hash(arena, offsets, lengths),
                                  gpu.page_hash(gpu.upload(arena), offsets, lengths))


@pytest.mark.parametrize("run_bytes,align", [(64, 64), (64, 1), (16, 16), (48, 8)])
def test_scatter_uniform_runs_with_collisions(backend, rng, run_bytes, align):
    """Equal-length runs laid out back to back (the 2-D payload fast path), many colliding."""
    size, n = 1 << 15, 3000

    def runs():
        dest = rng.integers(0, (size - run_bytes) // align, n) * align
        return dest, np.arange(n, dtype=np.int64) * run_bytes, np.full(n, run_bytes, np.int64)

    _scatter_batches_match_reference(backend, rng, size, runs)


def test_scatter_whole_granule_runs_of_mixed_lengths_with_collisions(backend, rng):
    """Runs that cover whole 64-byte granules (per-run lengths 64, 128, 192) overlapping each
    other: the scatter takes every ordering decision on the device and never reads a counter."""
    size = 1 << 15

    def runs():
        lengths = rng.integers(1, 4, 2000) * 64
        return rng.integers(0, size // 64 - 3, 2000) * 64, _back_to_back(lengths), lengths

    _scatter_batches_match_reference(backend, rng, size, runs)


@pytest.mark.parametrize("ulen", [64, 128, 192, 4096, 8192])
def test_scatter_uniform_runs_of_whole_granules_with_collisions(backend, rng, ulen):
    """One length for every run, every run at a granule boundary, many on the same granules: on
    the GPU, power-of-two lengths (8192 is cut into 4096-byte pieces) are indexed by granule
    number and copied a thread per chunk; 192 takes the general kernel."""
    size = 1 << 17
    n = 600

    def runs():
        granules = rng.integers(0, (size - ulen) // 64, n // 3)
        dest = rng.choice(granules, n) * 64
        return dest, np.arange(n, dtype=np.int64) * ulen, np.full(n, ulen, np.int64)

    _scatter_batches_match_reference(backend, rng, size, runs)


@pytest.mark.gpu
def test_scatter_indexes_by_granule_only_whole_aligned_power_of_two_runs(backend, rng,
                                                                        monkeypatch):
    """The granule-numbered pass 1 takes the batches it can (64-byte runs at 64-byte places, an
    aligned payload) and no other: a run off a granule boundary, a length that is not a power of
    two, or a payload view that is not 16-byte aligned goes to the general kernel, which gives
    the same bytes."""
    if backend.name != "cupy":
        pytest.skip("the granule-numbered pass belongs to the CUDA scatter")
    taken = []
    launch = backend._launch_granules
    monkeypatch.setattr(backend, "_launch_granules",
                        lambda *a, **k: (taken.append(a[3]), launch(*a, **k)))
    size, n = 1 << 16, 500
    dest = rng.integers(0, size // 64 - 4, n) * 64
    for label, d, ulen, offset, want_taken in (
            ("aligned 64-byte runs", dest, 64, 0, True),
            ("one run off a granule boundary", np.where(np.arange(n) == 7, dest + 16, dest), 64,
             0, False),
            ("192-byte runs", dest, 192, 0, False),
            ("payload view 8 bytes in", dest, 64, 8, False)):
        arena = rng.integers(0, 256, size, dtype=np.uint8)
        payload = rng.integers(0, 256, n * ulen + offset, dtype=np.uint8)
        src, lengths = np.arange(n, dtype=np.int64) * ulen, np.full(n, ulen, np.int64)
        want = arena.copy()
        ref.scatter_runs(want, d, src, lengths, payload[offset:])
        dev = _dev(backend, arena)
        taken.clear()
        backend.scatter_runs(dev, d, src, lengths, _dev(backend, payload)[offset:],
                             backend.scatter_state(size))
        np.testing.assert_array_equal(backend.to_host(dev), want, err_msg=label)
        assert bool(taken) == want_taken, label


@pytest.mark.gpu
@pytest.mark.parametrize("size,n", [(1 << 16, 2000), (1 << 24, 300)],
                         ids=["whole bitmap cleared", "runs walked"])
@pytest.mark.parametrize("kind", ["distinct granules", "granule-numbered", "whole granules",
                                  "partial granules"])
def test_scatter_leaves_its_state_clear_after_every_batch(backend, rng, monkeypatch, kind, size,
                                                          n):
    """The scatter's scratch (seen and conf bitmaps, conflict flags, counters, the bits of runs
    that skipped a granule) is cleared on the device by runs_post (the seen bitmap after every
    batch, the rest after a batch that collided), and the fixup count by the host: a mark left
    behind would leak into the next batch. After batches with collisions (and, for runs
    covering granules partly, fixups) or without any, every word is zero again, whether the
    bitmaps are cleared whole or, for a few runs in a big arena, word by word along the runs."""
    if backend.name != "cupy":
        pytest.skip("the scatter state belongs to the CUDA scatter")
    state = backend.scatter_state(size)
    walked = []
    post = backend._launch_post
    monkeypatch.setattr(backend, "_launch_post",
                        lambda *a, **k: (walked.append(k["walk"]), post(*a, **k)))
    hot = min(size // 64 - 3, 1000)  # granules where the runs collide

    def runs():
        if kind == "distinct granules":
            lengths = np.full(n, 64, np.int64)
            dest = rng.permutation(size // 64)[:n] * 64
        elif kind == "granule-numbered":
            lengths = np.full(n, 64, np.int64)
            dest = rng.integers(0, hot, n) * 64
        elif kind == "whole granules":
            lengths = rng.integers(1, 4, n) * 64
            dest = rng.integers(0, hot, n) * 64
        else:
            lengths = rng.integers(1, 40, n)
            dest = rng.integers(0, 4000, n)
        return dest.astype(np.int64), _back_to_back(lengths), lengths

    _scatter_batches_match_reference(backend, rng, size, runs, state)
    assert not bool(state.bits.any()), kind
    assert not bool(state.skipped.any()), kind
    assert (state.fixups > 0) == (kind == "partial granules")
    assert walked and set(walked) == {size == 1 << 24}  # the clearing under test was taken


@pytest.mark.gpu
def test_scatter_keeps_order_across_a_stamp_key_wrap(backend, rng):
    """Last-writer keys are key_base + run index + 1 in 31 bits; a batch that would wrap them
    clears the stamps first. Batches before and after the wrap must keep batch order."""
    if backend.name != "cupy":
        pytest.skip("the stamp keys belong to the CUDA scatter")
    size = 1 << 14

    def runs():
        lengths = rng.integers(1, 100, 2000)
        return rng.integers(0, size - 100, 2000), _back_to_back(lengths), lengths

    state = backend.scatter_state(size)
    state.key_base = (1 << 31) - 3000
    _scatter_batches_match_reference(backend, rng, size, runs, state)
    assert state.key_base < 1 << 16  # it wrapped


@pytest.mark.gpu
@pytest.mark.parametrize("granules_per_run", [1, 2])
def test_big_granule_batch_keeps_the_last_writer_of_every_granule(backend, rng,
                                                                   granules_per_run):
    """A batch big enough that pass 1 runs in many waves: runs_granules takes it from its end, so
    most colliding granules hold their last writer's bytes after pass 1, and pass 3 leaves those
    (their stamp says the last toucher skipped nothing); the rest it rewrites. Both must hold
    every granule's last writer, for runs of one granule and of two (a run that skipped one of
    its granules is not trusted in the other)."""
    if backend.name != "cupy":
        pytest.skip("the granule-numbered scatter belongs to the CUDA backend")
    size, n, k = 32 << 20, 1 << 19, granules_per_run
    first = rng.integers(0, size // 64 - k + 1, n)  # any granule: two-granule runs overlap halfway
    payload = rng.integers(0, 256, (n, 64 * k), dtype=np.uint8)
    arena = rng.integers(0, 256, size, dtype=np.uint8)
    want = arena.copy()
    touched = (first[:, None] + np.arange(k)).reshape(-1)  # (run, granule) pairs in batch order
    last = np.unique(touched[::-1], return_index=True)[1]  # each granule's last pair
    want.reshape(-1, 64)[touched[::-1][last]] = payload.reshape(-1, 64)[::-1][last]
    dev = _dev(backend, arena)
    state = backend.scatter_state(size)
    backend.scatter_runs(dev, first * 64, np.arange(n, dtype=np.int64) * 64 * k,
                         np.full(n, 64 * k, np.int64), _dev(backend, payload.reshape(-1)), state)
    np.testing.assert_array_equal(backend.to_host(dev), want)
    assert touched.size - last.size > 0.1 * n  # pairs overwritten later in the batch
    # Compact stamps (the conflicted granules' come first): some say "stored in pass 1".
    assert int((state.stamp[: touched.size] & 1).sum()) > 0
    assert not bool(state.skipped.any())


_CONCURRENT_APPLIES = """
import sys, threading
import numpy as np
import numba
from mmsb_dist.arena import PageArena
from mmsb_dist.delta import DeltaBatch

arena = PageArena("numpy")
ids = arena.create_pages(512, 4096)
rng = np.random.default_rng(1)
n = 40_000  # over limits.cpu_parallel_runs_min: validation and scatter both take the threaded kernels
batches = [DeltaBatch.runs(rng.choice(ids, n), rng.integers(0, 64, n) * 64,
                           rng.integers(1, 256, (n, 64), dtype=np.uint8)) for _ in range(4)]
errors = []

def run(batch):
    try:
        for _ in range(20):
            arena.apply(batch)
    except BaseException as exc:
        errors.append(exc)

threads = [threading.Thread(target=run, args=(b,)) for b in batches]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not errors, errors
print("layer", numba.threading_layer())
"""


def test_threaded_kernels_from_several_threads_under_the_workqueue_layer(tmp_path):
    """numba's workqueue layer aborts the process on concurrent parallel calls; the shard makes
    them (one batch validated while another is scattered), so they must take turns there."""
    import os
    import subprocess
    import sys

    from _clikit import ROOT
    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue", NUMBA_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CONCURRENT_APPLIES], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "layer workqueue" in proc.stdout


@pytest.mark.parametrize("kernel", ["scatter_runs_parallel", "scatter_runs_bucketed"])
@pytest.mark.parametrize("parts", [2, 3, 7])
def test_threaded_cpu_scatter_matches_reference_across_range_boundaries(rng, parts, kernel):
    """Each thread owns a byte range of the arena; runs of any length and alignment cross the
    range boundaries (a small arena, many runs) and overlap: the result is the ordered one, for
    runs given by lengths and by spans (``src`` one longer, no lengths), with every thread
    walking the batch or with the batch first filed by range."""
    from mmsb_dist import _cpu
    scatter = getattr(_cpu, kernel)
    size = 999  # not a multiple of 8 or of the thread count
    arena = rng.integers(0, 256, size, dtype=np.uint8)
    for trial in range(4):
        dest, src, lengths = _runs(rng, size, 20_000, 37 if trial < 3 else 500)
        payload = rng.integers(0, 256, int(lengths.sum()), dtype=np.uint8)
        want = arena.copy()
        ref.scatter_runs(want, dest, src, lengths, payload)
        if trial % 2:  # as spans: run i is payload[src[i]:src[i + 1]]
            starts = np.append(_back_to_back(lengths), lengths.sum())
            packed = np.concatenate([payload[s:s + n] for s, n in zip(src, lengths)])
            scatter(arena, dest, starts, np.zeros(0, np.int64), packed, parts)
        else:
            scatter(arena, dest, src, lengths, payload, parts)
        np.testing.assert_array_equal(arena, want)


@pytest.mark.parametrize("kernel", ["scatter_runs_parallel", "scatter_runs_bucketed"])
@pytest.mark.parametrize("phase", [0, 1, 8, 16, 63])
def test_threaded_cpu_scatter_streams_whole_lines_at_any_arena_phase(rng, phase, kernel):
    """The threaded scatters write whole cache lines with streaming stores and the bytes around
    them with plain ones: with the arena starting anywhere in a line, runs of whole lines at line
    boundaries, runs with a partial head and tail, runs shorter than a line and runs crossing the
    threads' ranges give the ordered result, and nothing outside the arena changes."""
    from mmsb_dist import _cpu
    scatter = getattr(_cpu, kernel)
    base = rng.integers(0, 256, 64 + 20_000 + 64, dtype=np.uint8)
    skip = (phase - base.ctypes.data) % 64
    arena = base[skip:skip + 20_000]  # arena byte 0 is at `phase` within its line
    line0 = (-phase) % 64  # the arena offset of the first line boundary

    def outside_bytes():
        return np.concatenate([base[:skip], base[skip + arena.size:]])
    outside = outside_bytes()
    for trial in range(6):
        n = 3000
        lengths = rng.choice([64, 128, 320, 17, 200, 1000], n)
        dest = rng.integers(0, arena.size - lengths)
        on_line = rng.random(n) < 0.6  # most runs start on a line boundary
        dest[on_line] = np.maximum(0, dest[on_line] - (dest[on_line] - line0) % 64)
        src = _back_to_back(lengths)
        payload = rng.integers(0, 256, int(lengths.sum()), dtype=np.uint8)
        want = arena.copy()
        ref.scatter_runs(want, dest, src, lengths, payload)
        scatter(arena, dest, src, lengths, payload, [2, 3, 5][trial % 3])
        np.testing.assert_array_equal(arena, want)
        np.testing.assert_array_equal(outside_bytes(), outside)


def test_cpu_backend_arena_starts_on_a_memory_page():
    """Aligned page offsets must be aligned addresses for the threaded scatter's streaming
    stores: the host arena starts on a 4096-byte boundary, zeroed, at any size."""
    from mmsb_dist.backend import get_backend
    be = get_backend("numpy")
    for size in (1, 4095, 4096, 1 << 20, (1 << 20) + 17):
        arena = be.zeros(size)
        assert arena.size == size and arena.ctypes.data % 4096 == 0
        assert not arena.any()


def test_cpu_scatter_and_copy_take_strided_inputs(rng):
    """The CPU kernels address bytes from the data pointer: a strided payload or source must be
    made contiguous first, not misread."""
    from mmsb_dist.backend import get_backend
    be = get_backend("numpy")
    arena = rng.integers(0, 256, 4096, dtype=np.uint8)
    base = rng.integers(0, 256, 2000, dtype=np.uint8)
    strided = base[::3]
    dest, src, lengths = _runs(rng, 4096, 50, 12)
    src = src % (strided.size - 12)
    want = arena.copy()
    ref.scatter_runs(want, dest, src, lengths, strided.copy())
    be.scatter_runs(arena, dest, src, lengths, strided)
    np.testing.assert_array_equal(arena, want)
    out = np.zeros(64, np.uint8)
    be.copy_runs(out, [0, 20], strided, [5, 100], [17, 30])
    np.testing.assert_array_equal(out[:17], strided[5:22])
    np.testing.assert_array_equal(out[20:50], strided[100:130])
