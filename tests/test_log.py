"""The log partition: round trips, LSNs, fsync policies, group commit, retention, recovery.

The oracle is a plain list of what was appended; every frame read back must equal it ("never wrong
data"), and every corruption must end in exactly one of two outcomes: the torn last frame is
truncated (and nothing else), or CorruptionError names the segment and the bad frame's offset.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mmsb_dist.log as logmod
from mmsb_dist import limits
from mmsb_dist.errors import CorruptionError
from mmsb_dist.log import (HEADER_BYTES, LogBusyError, LogClosedError, LogError, LogFailedError,
                           LogPartition)


# ---- helpers -------------------------------------------------------------------------------------

def _frames(rng: random.Random, n: int, size_max: int = 600) -> list[tuple[bytes, int, int]]:
    """n (payload, epoch, lsn_count) with random sizes (empty included) and counts."""
    return [(rng.randbytes(rng.randint(0, size_max)), rng.randint(0, 2**64 - 1),
             rng.randint(1, 5000)) for _ in range(n)]


def _append_all(log: LogPartition, frames) -> list[tuple[int, int, int, bytes]]:
    """Append, and return the oracle: (first_lsn, lsn_count, epoch, payload) per frame."""
    out = []
    for payload, epoch, count in frames:
        out.append((log.append(payload, epoch=epoch, lsn_count=count), count, epoch, payload))
    return out


def _read_all(log: LogPartition, from_lsn: int = 0, to_lsn: int | None = None):
    return [(f.first_lsn, f.lsn_count, f.epoch, bytes(f.payload))
            for f in log.read(from_lsn, to_lsn)]


def _layout(log: LogPartition, oracle) -> list[tuple[str, int, int]]:
    """(segment path, byte offset, frame bytes) of every frame, from the frame sizes alone."""
    out, segs, si, pos = [], log.segments(), 0, 0
    for first, _, _, payload in oracle:
        while not (segs[si].last_lsn is not None and first <= segs[si].last_lsn):
            si, pos = si + 1, 0
        out.append((segs[si].path, pos, HEADER_BYTES + len(payload)))
        pos += HEADER_BYTES + len(payload)
    return out


def _flip(path: str, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _build(path, n: int = 12, seed: int = 1, segment_bytes: int = 1500):
    log = LogPartition(path, fsync="none", segment_bytes_max=segment_bytes)
    oracle = _append_all(log, _frames(random.Random(seed), n))
    layout = _layout(log, oracle)
    log.close()
    return oracle, layout


# ---- round trips and LSNs ------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), n=st.integers(1, 40), segment_bytes=st.integers(64, 6000),
       many=st.booleans(), lo=st.integers(0, 120_000), span=st.integers(1, 120_000))
def test_round_trip_random_frames(seed, n, segment_bytes, many, lo, span):
    rng = random.Random(seed)
    frames = _frames(rng, n, size_max=3000)
    with tempfile.TemporaryDirectory() as d:
        with LogPartition(d, fsync="none", segment_bytes_max=segment_bytes) as log:
            if many:
                cut = rng.randint(0, n)
                firsts = log.append_many(frames[:cut]) + log.append_many(frames[cut:])
                oracle = [(f, c, e, p) for f, (p, e, c) in zip(firsts, frames, strict=True)]
            else:
                oracle = _append_all(log, frames)
            assert _read_all(log) == oracle
        want = [o for o in oracle if o[0] < lo + span and o[0] + o[1] > lo]
        with LogPartition(d, create=False) as log:
            assert log.recovery is None
            assert _read_all(log) == oracle
            assert _read_all(log, lo, lo + span) == want
            assert log.next_lsn == sum(c for _, _, c in frames)


def test_lsns_continue_across_rolls_and_reopen(tmp_path):
    rng = random.Random(2)
    oracle = []
    for _ in range(3):      # three sessions on the same directory
        with LogPartition(tmp_path, fsync="always", segment_bytes_max=1000) as log:
            assert log.next_lsn == (oracle[-1][0] + oracle[-1][1] if oracle else 0)
            oracle += _append_all(log, _frames(rng, 10))
            assert _read_all(log) == oracle
    assert [o[0] for o in oracle] == list(np.cumsum([0] + [o[1] for o in oracle[:-1]]))
    with LogPartition(tmp_path) as log:
        segs = log.segments()
        assert len(segs) > 5
        for a, b in zip(segs, segs[1:], strict=False):
            assert b.first_lsn == a.last_lsn + 1
            assert os.path.basename(b.path) == f"seg-{b.first_lsn:020d}.log"
        assert all(s.bytes <= 1000 for s in segs)


def test_frame_larger_than_a_segment_gets_its_own(tmp_path):
    with LogPartition(tmp_path, fsync="none", segment_bytes_max=1000) as log:
        oracle = _append_all(log, [(b"a" * 10, 1, 1), (b"b" * 5000, 1, 1), (b"c" * 10, 1, 1)])
        assert [s.bytes for s in log.segments()] == [50, 5040, 50]
        assert _read_all(log) == oracle


def test_payload_types_and_argument_checks(tmp_path):
    arr = np.arange(24, dtype=np.uint16).reshape(4, 6)
    with LogPartition(tmp_path) as log:
        log.append(arr, epoch=0, lsn_count=1)
        log.append(pa.py_buffer(b"xyz"), epoch=0, lsn_count=1)
        log.append(bytearray(b"q"), epoch=0, lsn_count=1)
        log.append(memoryview(b"hello")[1:3], epoch=0, lsn_count=1)
        assert [bytes(f.payload) for f in log.read()] == [arr.tobytes(), b"xyz", b"q", b"el"]
        for bad in (dict(payload=arr[:, ::2], epoch=0, lsn_count=1),
                    dict(payload=b"", epoch=-1, lsn_count=1),
                    dict(payload=b"", epoch=2**64, lsn_count=1),
                    dict(payload=b"", epoch=0, lsn_count=0)):
            with pytest.raises(ValueError):
                log.append(bad.pop("payload"), **bad)
        assert log.next_lsn == 4
        assert log.append_many([]) == []


# ---- fsync policies and group commit -------------------------------------------------------------

@pytest.mark.parametrize("policy", ["always", "interval", "none"])
def test_fsync_policies(tmp_path, policy):
    frames = _frames(random.Random(3), 30)
    with LogPartition(tmp_path, fsync=policy, fsync_interval_ms=1.0,
                      segment_bytes_max=4000) as log:
        oracle = _append_all(log, frames)
        stats = log.statistics()
        assert stats["frames"] == 30 and stats["segments"] > 2
        if policy == "always":
            assert stats["fsyncs"] >= stats["groups"] == 30     # one per frame, plus rolls
        elif policy == "none":
            assert stats["fsyncs"] == stats["dir_fsyncs"] == 0
            log.sync()      # fsyncs even here: sealed segments, the directory, the active one
            assert log.statistics()["fsyncs"] == stats["segments"]
        else:
            deadline = time.monotonic() + 5
            while log.statistics()["fsyncs"] == 0 and time.monotonic() < deadline:
                time.sleep(0.002)
            assert log.statistics()["fsyncs"] > 0       # the background thread ran
    with LogPartition(tmp_path) as log:
        assert _read_all(log) == oracle


def _slow_datasync(monkeypatch, seconds: float = 0.002):
    real = os.fdatasync

    def slow(fd):
        time.sleep(seconds)     # a slow disk: appenders pile up behind the leader's fsync
        real(fd)
    monkeypatch.setattr(logmod, "_datasync", slow)


def test_group_commit_batches_concurrent_appenders(tmp_path, monkeypatch):
    _slow_datasync(monkeypatch)
    threads_n, per_thread = 8, 20
    results: dict[int, list] = {}
    start = threading.Barrier(threads_n)

    def worker(t):
        rng = random.Random(100 + t)
        start.wait()
        results[t] = [(log.append(p, epoch=t, lsn_count=c), c, t, p)
                      for p, _, c in _frames(rng, per_thread)]

    with LogPartition(tmp_path, fsync="always", segment_bytes_max=8000) as log:
        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        stats = log.statistics()
        oracle = sorted(o for rs in results.values() for o in rs)
        assert _read_all(log) == oracle
    assert stats["frames"] == threads_n * per_thread
    assert stats["fsyncs"] < stats["frames"]
    assert stats["groups"] < stats["frames"]


def test_append_many_is_one_write_and_one_fsync(tmp_path):
    with LogPartition(tmp_path, fsync="always") as log:
        log.append(b"first", epoch=0, lsn_count=1)
        before = log.statistics()
        firsts = log.append_many([(bytes([i]) * i, 7, i + 1) for i in range(50)])
        after = log.statistics()
        assert firsts == [1 + i * (i + 1) // 2 for i in range(50)]
        assert after["writes"] - before["writes"] == 1
        assert after["fsyncs"] - before["fsyncs"] == 1
        assert after["frames"] - before["frames"] == 50


# ---- retention, read ranges, lifecycle ----------------------------------------------------------

def test_drop_before_deletes_whole_segments_only(tmp_path):
    with LogPartition(tmp_path, fsync="always", segment_bytes_max=500) as log:
        oracle = _append_all(log, [(bytes(100), 0, 10) for _ in range(20)])   # 3 frames a segment
        segs = log.segments()
        dropped = log.drop_before(65)
        assert dropped == [s.path for s in segs if s.last_lsn < 65]
        assert log.first_lsn == 60 and not any(os.path.exists(p) for p in dropped)
        assert _read_all(log) == [o for o in oracle if o[0] >= 60]
        log.drop_before(10**9)      # never the active segment
        assert [s.path for s in log.segments()] == [segs[-1].path]
        assert log.first_lsn == 180
        assert log.append(b"x", epoch=0, lsn_count=1) == 200
    with LogPartition(tmp_path) as log:
        assert log.first_lsn == 180 and log.next_lsn == 201
        assert _read_all(log, 0, 1000)[-1] == (200, 1, 0, b"x")


def test_start_lsn(tmp_path):
    with LogPartition(tmp_path / "a", start_lsn=1000) as log:
        assert log.next_lsn == log.first_lsn == 1000
        assert log.append(b"x", epoch=3, lsn_count=5) == 1000
    with LogPartition(tmp_path / "a", start_lsn=1003) as log:      # within [first, next]: fine
        assert log.next_lsn == 1005
    for bad in (999, 1006):
        with pytest.raises(LogError, match="start_lsn"):
            LogPartition(tmp_path / "a", start_lsn=bad)


def test_read_ranges_include_partial_overlaps(tmp_path):
    with LogPartition(tmp_path, fsync="none", segment_bytes_max=300) as log:
        oracle = _append_all(log, [(bytes([i]) * 50, i, 10) for i in range(12)])   # [10i, 10i+10)
        assert [o[0] for o in _read_all(log, 15, 35)] == [10, 20, 30]
        assert [o[0] for o in _read_all(log, 20, 30)] == [20]
        assert [o[0] for o in _read_all(log, 29, 31)] == [20, 30]
        assert _read_all(log, 120) == [] and _read_all(log, 5, 5) == []
        assert _read_all(log, 119) == oracle[-1:]


def test_close_is_idempotent_and_final(tmp_path):
    log = LogPartition(tmp_path)
    log.append(b"a", epoch=0, lsn_count=1)
    log.close()
    log.close()
    for action in (lambda: log.append(b"b", epoch=0, lsn_count=1), log.sync,
                   lambda: log.read(), lambda: log.drop_before(1)):
        with pytest.raises(LogClosedError):
            action()


def test_one_open_partition_per_directory(tmp_path):
    with LogPartition(tmp_path):
        with pytest.raises(LogBusyError):
            LogPartition(tmp_path)
    with LogPartition(tmp_path):        # the lock went with close()
        pass
    with pytest.raises(FileNotFoundError):
        LogPartition(tmp_path / "missing", create=False)


def test_failed_fsync_poisons_the_partition(tmp_path, monkeypatch):
    log = LogPartition(tmp_path)
    log.append(b"durable", epoch=0, lsn_count=1)

    def broken(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(logmod, "_datasync", broken)
    with pytest.raises(LogFailedError):
        log.append(b"lost?", epoch=0, lsn_count=1)
    with pytest.raises(LogFailedError):      # never retried: fsync errors are not recoverable
        log.append(b"refused", epoch=0, lsn_count=1)
    log.close()
    monkeypatch.undo()
    with LogPartition(tmp_path) as log:     # what reached the OS is still a valid prefix
        assert _read_all(log)[0] == (0, 1, 0, b"durable")


def test_async_append_is_readable_and_durable_once_its_future_completes(tmp_path, monkeypatch):
    _slow_datasync(monkeypatch, 0.05)
    log = LogPartition(tmp_path)
    firsts, durable = log.append_many_async([(b"a", 3, 2), (b"bc", 3, 5)])
    assert firsts == [0, 2]
    assert _read_all(log) == [] or durable.done()  # unseen until written
    durable.result(timeout=10)
    assert log.append(b"d", epoch=4, lsn_count=1) == 7
    assert log.statistics()["fsyncs"] >= 2
    log.close()
    with LogPartition(tmp_path) as log:
        assert _read_all(log) == [(0, 2, 3, b"a"), (2, 5, 3, b"bc"), (7, 1, 4, b"d")]


def test_large_writes_go_out_in_pieces_and_read_back_exactly(tmp_path, monkeypatch):
    """Early writeback cuts a large write into pieces (splitting headers and payloads anywhere);
    the segment bytes are the same as one writev's."""
    monkeypatch.setattr(limits, "log_writeback_piece_bytes", 1000)
    rng = np.random.default_rng(5)
    payloads = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes()
                for n in rng.integers(1, 5000, 40)]
    with LogPartition(tmp_path, segment_bytes_max=60_000) as log:
        log.append_many([(p, 1, 1) for p in payloads[:20]])
        for p in payloads[20:]:
            log.append(p, epoch=2, lsn_count=1)
    with LogPartition(tmp_path) as log:
        assert [r[3] for r in _read_all(log)] == payloads
    views = [memoryview(p) for p in payloads]
    parts = list(logmod._pieces(views, 1000))
    assert all(sum(v.nbytes for v in part) == 1000 for part in parts[:-1])
    assert b"".join(bytes(v) for part in parts for v in part) == b"".join(payloads)


def test_async_append_reports_a_failed_fsync(tmp_path, monkeypatch):
    log = LogPartition(tmp_path)

    def broken(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(logmod, "_datasync", broken)
    _, durable = log.append_many_async([(b"lost?", 0, 1)])
    with pytest.raises(LogFailedError):
        durable.result(timeout=10)
    with pytest.raises(LogFailedError):
        log.append_many_async([(b"refused", 0, 1)])
    log.close()


# ---- corruption and recovery ---------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), n=st.integers(2, 14), data=st.data())
def test_any_bit_flip_truncates_the_torn_tail_or_is_refused(seed, n, data):
    """Flip one bit anywhere (header or payload, any frame, any segment). The frame holding it is
    the one recovery reports: truncated if it is the last frame of the last segment, refused with
    CorruptionError(segment, offset) otherwise. Frames that survive equal what was appended."""
    with tempfile.TemporaryDirectory() as d:
        oracle, layout = _build(d, n, seed)
        k = data.draw(st.integers(0, n - 1), label="frame")
        path, offset, size = layout[k]
        inner = data.draw(st.integers(0, size - 1), label="byte in frame")
        _flip(path, offset + inner, data.draw(st.integers(0, 7), label="bit"))
        if k == n - 1:
            with LogPartition(d) as log:
                assert log.recovery == (path, offset, size, log.recovery.reason)
                assert _read_all(log) == oracle[:-1]
                assert log.next_lsn == oracle[-1][0]
        else:
            with pytest.raises(CorruptionError) as err:
                LogPartition(d)
            assert (err.value.path, err.value.position) == (path, offset)


@pytest.mark.parametrize("where", ["header", "payload"])
def test_bit_flips_in_the_last_frame_are_a_torn_tail(tmp_path, where):
    oracle, layout = _build(tmp_path, n=6, seed=4)
    path, offset, size = layout[-1]
    assert size > HEADER_BYTES + 8
    spots = range(HEADER_BYTES) if where == "header" else range(HEADER_BYTES, size, 7)
    with open(path, "rb") as f:
        pristine = f.read()
    for spot in spots:
        for bit in (0, 5, 7):
            with open(path, "wb") as f:
                f.write(pristine)
            _flip(path, offset + spot, bit)
            with LogPartition(tmp_path) as log:
                assert log.recovery[:3] == (path, offset, size), (spot, bit)
                assert _read_all(log) == oracle[:-1]


@pytest.mark.parametrize("where", ["header", "payload"])
def test_bit_flips_in_a_middle_frame_are_refused(tmp_path, where):
    oracle, layout = _build(tmp_path, n=6, seed=4, segment_bytes=10**6)    # one segment
    path, offset, size = layout[2]
    spot = offset + (9 if where == "header" else HEADER_BYTES + size // 3)
    _flip(path, spot, 3)
    with pytest.raises(CorruptionError) as err:
        LogPartition(tmp_path)
    assert (err.value.path, err.value.position) == (path, offset)
    assert "followed by a valid frame" in str(err.value) and path in str(err.value)


@pytest.mark.parametrize("where", ["header", "payload"])
def test_bit_flips_in_a_non_last_segment_are_refused(tmp_path, where):
    oracle, layout = _build(tmp_path, n=12, seed=5)
    last_of_first = max(i for i, spot in enumerate(layout) if spot[0] == layout[0][0])
    path, offset, size = layout[last_of_first]      # its last frame: would look torn if alone
    _flip(path, offset + (0 if where == "header" else size - 1), 1)
    with pytest.raises(CorruptionError, match="not the last") as err:
        LogPartition(tmp_path)
    assert (err.value.path, err.value.position) == (path, offset)


def test_truncated_last_frame_is_cut_back_to_the_previous_one(tmp_path):
    oracle, layout = _build(tmp_path, n=6, seed=6)
    path, offset, size = layout[-1]
    for keep in (1, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 1, size - 1):
        os.truncate(path, offset + keep)
        with LogPartition(tmp_path) as log:
            assert log.recovery[:3] == (path, offset, keep)
            assert _read_all(log) == oracle[:-1]
            assert os.path.getsize(path) == offset
            log.append(oracle[-1][3], epoch=oracle[-1][2], lsn_count=oracle[-1][1])
        with LogPartition(tmp_path) as log:
            assert log.recovery is None and _read_all(log) == oracle


def test_truncation_in_a_non_last_segment_is_refused(tmp_path):
    oracle, layout = _build(tmp_path, n=12, seed=7)
    path, offset, size = layout[0]
    os.truncate(path, offset + size - 1)
    with pytest.raises(CorruptionError) as err:
        LogPartition(tmp_path)
    assert (err.value.path, err.value.position) == (path, offset)


def test_zero_filled_tail_is_torn_but_zeros_mid_log_are_refused(tmp_path):
    oracle, layout = _build(tmp_path, n=12, seed=8)
    last_path = layout[-1][0]
    end = os.path.getsize(last_path)
    with open(last_path, "ab") as f:
        f.write(bytes(4096))       # preallocated or torn to zeros
    with LogPartition(tmp_path) as log:
        assert log.recovery[:3] == (last_path, end, 4096)
        assert _read_all(log) == oracle
    first_path = layout[0][0]
    end = os.path.getsize(first_path)
    with open(first_path, "ab") as f:
        f.write(bytes(100))
    with pytest.raises(CorruptionError) as err:
        LogPartition(tmp_path)
    assert (err.value.path, err.value.position) == (first_path, end)


def test_zeroed_frame_before_a_valid_one_is_refused(tmp_path):
    oracle, layout = _build(tmp_path, n=6, seed=9, segment_bytes=10**6)
    path, offset, size = layout[-2]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(size))
    with pytest.raises(CorruptionError, match="followed by a valid frame") as err:
        LogPartition(tmp_path)
    assert (err.value.path, err.value.position) == (path, offset)


def test_missing_segment_is_an_lsn_gap(tmp_path):
    oracle, layout = _build(tmp_path, n=12, seed=10)
    paths = sorted({p for p, _, _ in layout})
    os.remove(paths[1])
    with pytest.raises(CorruptionError, match="LSN gap") as err:
        LogPartition(tmp_path)
    assert (err.value.path, err.value.position) == (paths[2], 0)


def test_empty_or_headerless_last_segment(tmp_path):
    oracle, layout = _build(tmp_path, n=6, seed=11)
    nxt = oracle[-1][0] + oracle[-1][1]
    empty = os.path.join(tmp_path, f"seg-{nxt:020d}.log")
    open(empty, "wb").close()       # a crash right after a roll created the file
    with LogPartition(tmp_path) as log:
        assert log.recovery is None and log.segments()[-1].path == empty
        assert _read_all(log) == oracle and log.next_lsn == nxt
    with open(empty, "wb") as f:
        f.write(b"\0" * 17)         # ... or after a torn first write in it
    with LogPartition(tmp_path) as log:
        assert log.recovery[:3] == (empty, 0, 17)
        assert log.append(b"next", epoch=0, lsn_count=1) == nxt
    os.rename(empty, os.path.join(tmp_path, f"seg-{nxt + 5:020d}.log"))    # a name off the LSNs
    with pytest.raises(CorruptionError, match="LSN gap"):
        LogPartition(tmp_path)


def test_checksummed_frame_of_an_unknown_version_is_never_dropped(tmp_path):
    oracle, layout = _build(tmp_path, n=3, seed=12)
    path, _, _ = layout[-1]
    end = oracle[-1][0] + oracle[-1][1]
    head = struct.pack("<4sHHIIQQI", b"MMSL", 2, 0, 3, 1, end, 0, 0)
    crc = logmod.crc32c.crc32c(head, logmod.crc32c.crc32c(b"new"))
    with open(path, "ab") as f:
        f.write(head + struct.pack("<I", crc) + b"new")
    with pytest.raises(CorruptionError, match="unreadable frame"):
        LogPartition(tmp_path)


def test_corruption_after_open_is_caught_on_read(tmp_path):
    with LogPartition(tmp_path, fsync="none", segment_bytes_max=10**6) as log:
        oracle = _append_all(log, _frames(random.Random(13), 5))
        path, offset, size = _layout(log, oracle)[3]
        _flip(path, offset + size - 1, 0)
        with pytest.raises(CorruptionError) as err:
            _read_all(log)
        assert (err.value.path, err.value.position) == (path, offset)
        assert _read_all(log, 0, oracle[3][0]) == oracle[:3]


# ---- replay while opening (recover_into) ---------------------------------------------------------

def _open_replaying(path, from_lsn: int = 0, fail_at: int | None = None, **kw):
    """Open with recover_into; returns (log, frames handed over as oracle tuples, first LSNs told)."""
    got, told = [], []

    def on_frame(frame):
        if fail_at is not None and frame.first_lsn >= fail_at:
            raise RuntimeError("replay stopped")
        got.append((frame.first_lsn, frame.lsn_count, frame.epoch, bytes(frame.payload)))

    def recover_into(first_lsn):
        told.append(first_lsn)
        return from_lsn, on_frame

    return LogPartition(path, recover_into=recover_into, **kw), got, told


def test_recover_into_hands_over_what_read_returns(tmp_path):
    oracle, _ = _build(tmp_path, n=30, seed=21)                    # several segments
    last_first, last_count = oracle[-1][0], oracle[-1][1]
    for from_lsn in (0, oracle[7][0] + 1, last_first, last_first + last_count):
        log, got, told = _open_replaying(tmp_path, from_lsn)
        with log:
            assert len(log.segments()) > 2
            assert told == [0]
            assert got == _read_all(log, from_lsn)
            assert got == [o for o in oracle if o[0] + o[1] > from_lsn]
    with LogPartition(tmp_path, recover_into=lambda first: None) as log:   # None: no replay
        assert _read_all(log) == oracle
    with LogPartition(tmp_path / "new", start_lsn=500,
                      recover_into=lambda first: (first, pytest.fail)) as log:
        assert log.next_lsn == 500                                  # told 500, nothing to hand over


def test_recover_into_hands_over_only_verified_frames(tmp_path):
    oracle, layout = _build(tmp_path / "torn", n=6, seed=4, segment_bytes=10**6)
    path, offset, size = layout[-1]
    _flip(path, offset + size - 1, 2)                               # torn tail: the last frame
    log, got, _ = _open_replaying(tmp_path / "torn")
    with log:
        assert log.recovery is not None and log.recovery.position == offset
        assert got == oracle[:-1]
    oracle, layout = _build(tmp_path / "mid", n=6, seed=4, segment_bytes=10**6)
    path, offset, size = layout[2]
    _flip(path, offset + size - 1, 2)                               # a middle frame
    for _ in range(2):   # refused the same way twice: the failed open released the directory
        got = []
        with pytest.raises(CorruptionError) as err:
            LogPartition(tmp_path / "mid",
                         recover_into=lambda first: (0, lambda f: got.append(bytes(f.payload))))
        assert (err.value.path, err.value.position) == (path, offset)
        assert got == [o[3] for o in oracle[:2]]                    # delivered before the damage


def test_an_error_from_recover_into_abandons_the_open(tmp_path):
    oracle, _ = _build(tmp_path, n=12, seed=6)
    with pytest.raises(RuntimeError, match="replay stopped"):
        _open_replaying(tmp_path, fail_at=oracle[5][0])

    def refuse(first_lsn):
        raise RuntimeError("no checkpoint for you")
    with pytest.raises(RuntimeError, match="no checkpoint"):
        LogPartition(tmp_path, recover_into=refuse)
    with LogPartition(tmp_path) as log:                             # not left locked or changed
        assert _read_all(log) == oracle


def test_handed_over_payloads_stay_valid_after_the_open(tmp_path):
    oracle, _ = _build(tmp_path, n=10, seed=8, segment_bytes=10**6)
    kept = []
    with LogPartition(tmp_path, recover_into=lambda first: (0, kept.append)) as log:
        log.append(b"more", epoch=1, lsn_count=1)
    assert [(f.first_lsn, f.lsn_count, f.epoch, bytes(f.payload)) for f in kept] == oracle
