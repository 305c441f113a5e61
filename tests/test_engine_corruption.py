"""Damaged bytes under a shard: each case ends in truncation of exactly the torn tail or in a typed
CorruptionError naming the file, never in wrong data."""

import glob
import os

import numpy as np
import pytest

from mmsb_dist import CorruptionError, DeltaBatch
from mmsb_dist.engine import ShardEngine


def _build(path, rng):
    """A shard with pages, 3 sealed epochs (checkpoint at 2) and 3 more batches after them."""
    e = ShardEngine(path, backend="numpy")
    ids = e.create_pages(6, 1024)
    states = []
    for epoch in range(1, 4):
        for _ in range(3):
            e.apply(DeltaBatch.runs(ids, rng.integers(0, 900, 6),
                                    rng.integers(1, 256, (6, 100), dtype=np.uint8)))
        e.seal()
        if epoch == 2:
            e.checkpoint()
    for _ in range(3):
        e.apply(DeltaBatch.runs(ids, rng.integers(0, 900, 6),
                                rng.integers(1, 256, (6, 100), dtype=np.uint8)))
        states.append({int(p): e.read(int(p)).tobytes() for p in ids})
    e.close()
    return ids, states


def _flip(path, position):
    with open(path, "r+b") as fh:
        fh.seek(position)
        byte = fh.read(1)[0]
        fh.seek(position)
        fh.write(bytes([byte ^ 0x10]))


def _segment(path):
    return sorted(glob.glob(os.path.join(path, "log", "seg-*.log")))[-1]


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header"])
def test_torn_last_frame_is_truncated_exactly(tmp_path, damage):
    rng = np.random.default_rng(1)
    ids, states = _build(tmp_path / "s", rng)
    seg = _segment(tmp_path / "s")
    size = os.path.getsize(seg)
    if damage == "truncate":
        os.truncate(seg, size - 37)
    elif damage == "flip_payload":
        _flip(seg, size - 10)
    else:  # inside the last frame's header: find it by reading the frame sizes
        with ShardEngine(tmp_path / "s", backend="numpy") as e:
            last = list(e.log.read(0))[-1]
        _flip(seg, size - len(last.payload) - 20)
    with ShardEngine(tmp_path / "s", backend="numpy") as e:
        assert e.log.recovery is not None and e.log.recovery.bytes_dropped > 0
        got = {int(p): e.read(int(p)).tobytes() for p in ids}
    assert got == states[-2]  # exactly the last batch is gone, everything before it is intact


def test_flip_in_a_middle_frame_is_refused(tmp_path):
    rng = np.random.default_rng(2)
    _build(tmp_path / "s", rng)
    seg = _segment(tmp_path / "s")
    _flip(seg, os.path.getsize(seg) // 2)
    with pytest.raises(CorruptionError) as info:
        ShardEngine(tmp_path / "s", backend="numpy")
    assert info.value.path and info.value.path.endswith(".log") and info.value.position is not None


@pytest.mark.parametrize("target", ["pages.arrow", "manifest.json"])
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_checkpoint_is_refused(tmp_path, target, how):
    rng = np.random.default_rng(3)
    _build(tmp_path / "s", rng)
    (path,) = glob.glob(str(tmp_path / "s" / "checkpoints" / "shard-*" / "epoch-*" / target))
    if how == "flip":
        _flip(path, os.path.getsize(path) // 3)
    else:
        os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(CorruptionError) as info:
        ShardEngine(tmp_path / "s", backend="numpy")
    assert target in str(info.value)


def _helpers_alive() -> list:
    import threading
    return [t for t in threading.enumerate() if t.name.startswith("mmsb-replay")]


@pytest.mark.parametrize("decode_thread", [False, True])
def test_a_logged_batch_that_no_longer_applies_is_refused_and_frees_the_log(tmp_path,
                                                                             decode_thread,
                                                                             monkeypatch):
    from mmsb_dist import limits
    from mmsb_dist.formats import encode_deltas
    from mmsb_dist.log import LogPartition
    monkeypatch.setattr(limits, "replay_decode_thread_cpus_min", 1 if decode_thread else 10**6)
    rng = np.random.default_rng(4)
    _build(tmp_path / "s", rng)
    with LogPartition(tmp_path / "s" / "log") as log:   # checksummed, but page 999 never existed
        for page in (999, 0):
            batch = encode_deltas(DeltaBatch.runs([page], [0], [b"abc"]))
            log.append(batch, epoch=4, lsn_count=1)
    for _ in range(2):  # the same error again: the failed open let go of the log's directory
        with pytest.raises(CorruptionError, match="no longer applies"):
            ShardEngine(tmp_path / "s", backend="numpy")
    assert not _helpers_alive()


def test_a_checkpoint_the_log_does_not_continue_is_refused(tmp_path):
    import shutil
    from mmsb_dist import EpochError
    rng = np.random.default_rng(5)
    _build(tmp_path / "s", rng)
    shutil.copytree(tmp_path / "s", tmp_path / "t")
    shutil.rmtree(tmp_path / "s" / "log")               # the checkpoint's LSN is past a new log
    with pytest.raises(CorruptionError, match="does not meet the log"):
        ShardEngine(tmp_path / "s", backend="numpy")
    with ShardEngine(tmp_path / "t", backend="numpy", segment_bytes_max=256) as e:
        # a log that starts after LSN 0 (small segments: compaction can drop whole ones) ...
        e.apply(DeltaBatch.runs(e.arena.page_ids()[:1], [0], [b"z"]))
        e.seal()
        e.checkpoint()
        e.seal()
        e.compact(1)
        assert e.log.first_lsn > 0
    shutil.rmtree(tmp_path / "t" / "checkpoints")       # ... with no checkpoint to start from
    with pytest.raises(EpochError, match="no checkpoint covers"):
        ShardEngine(tmp_path / "t", backend="numpy")
    assert not _helpers_alive()
