"""Change tracking (twin and diff): ``ShardEngine.track`` on both backends, ``Bus.track`` on Ray.

What must hold: the block gets a writable typed copy of the page (a CuPy array on the CuPy
backend); a normal exit logs exactly one masked delta (one LSN) whose effect makes the page equal
the array; bytes the block did not change are not written (a concurrent write to them survives);
an exception, or no change, logs nothing; a repeated delta id is applied once.
"""

import os

import numpy as np
import pytest
import ray

from mmsb_dist import DeltaBatch, EventKind, decode_events
from mmsb_dist.engine import ShardEngine


def _logged_since(engine, lsn):
    d = engine.events(lsn, with_deltas=True).batch.to_pydict()
    return list(zip(d["lsn"], d["page_id"], d["kind"], d["offset"], d["payload"], d["mask"]))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_engine_track_logs_one_masked_delta_with_the_difference(tmp_path, backend, seed):
    rng = np.random.default_rng(seed)
    e = ShardEngine(tmp_path / "s", backend=backend, fsync="none")
    size = int(rng.integers(1, 400)) * 4
    pid = int(e.create_pages(1, size, dtype="float32")[0])
    other = int(e.create_pages(1, 64)[0])
    e.apply(DeltaBatch.runs([pid], [0], [rng.integers(0, 256, size, dtype=np.uint8)]))
    before = e.log.next_lsn
    n = size // 4
    expected = e.read(pid).copy()
    track = e.track(pid, client_id=7, seq=1)
    with track as arr:
        assert isinstance(arr, e.backend.xp.ndarray) and arr.dtype == np.float32
        assert arr.shape == (n,) and (arr.flags.writeable if isinstance(arr, np.ndarray) else 1)
        idx = rng.choice(n, int(rng.integers(1, n + 1)), replace=False)
        vals = rng.standard_normal(idx.size).astype(np.float32) + 1000
        arr[e.backend.xp.asarray(idx)] = e.backend.xp.asarray(vals)
        e.apply(DeltaBatch.runs([other], [3], [b"zz"]))   # another writer, meanwhile
    expected[idx] = vals
    assert e.read(pid).tobytes() == expected.tobytes()   # bytes: random floats include NaNs
    rows = _logged_since(e, before)
    assert [r[1] for r in rows] == [other, pid]   # the other write, then the tracked delta
    lsn, page, kind, offset, payload, mask = rows[1]
    assert kind == EventKind.WRITE and mask is not None      # one masked delta, one LSN
    assert track.ack.count == 1 and track.ack.first_lsn == lsn == e.log.next_lsn - 1
    lo, hi = int(idx.min()) * 4, int(idx.max()) * 4 + 4       # trimmed to the changed span
    assert lo <= offset and offset + len(payload) <= hi
    # The same delta id again: acknowledged as a duplicate, applied once.
    with e.track(pid, client_id=7, seq=1) as arr:
        arr[0] = -1
    assert track.ack is not None and e.read(pid).tobytes() == expected.tobytes()
    e.close()


def test_engine_track_writes_nothing_on_exception_or_no_change(tmp_path, backend):
    e = ShardEngine(tmp_path / "s", backend=backend, fsync="none")
    pid = int(e.create_pages(1, 128)[0])
    e.apply(DeltaBatch.runs([pid], [0], [b"abc"]))
    state, lsn = e.read(pid).copy(), e.log.next_lsn
    with pytest.raises(ZeroDivisionError):
        with e.track(pid) as arr:
            arr[:] = 9
            1 / 0
    unchanged = e.track(pid)
    with unchanged as arr:
        arr[5] = arr[5]
    assert unchanged.delta is None and unchanged.ack is None
    assert e.log.next_lsn == lsn and np.array_equal(e.read(pid), state)
    # Bytes the block leaves alone are not written: a concurrent change to them survives.
    with e.track(pid) as arr:
        e.apply(DeltaBatch.runs([pid], [0], [b"XYZ"]))
        arr[100] = 1
    got = e.read(pid)
    assert got[:3].tobytes() == b"XYZ" and got[100] == 1
    e.close()


# ---- on Ray --------------------------------------------------------------------------------------

NS = "mmsb-track-test"


@pytest.fixture(scope="module")
def bus(tmp_path_factory):
    from mmsb_dist import runtime

    ray.init(num_cpus=2, include_dashboard=False, namespace=NS, log_to_driver=False)
    b = runtime.start(shards=1, data_dir=str(tmp_path_factory.mktemp("track")), namespace=NS,
                      config={"backend": os.environ.get("MMSB_TEST_BACKEND", "numpy"),
                              "gpus_per_shard": 0.25})
    yield b
    runtime.stop(namespace=NS)
    ray.shutdown()


def _shard_rows(bus, lsn, pid):
    data, _, _ = ray.get(bus.shards[0].events.remote(lsn, [pid], with_deltas=True))
    d = decode_events(data).to_pydict()
    return list(zip(d["lsn"], d["kind"], d["offset"], d["payload"], d["mask"]))


def test_bus_track_writes_one_durable_masked_delta(bus):
    pid = bus.create_page(256, dtype="int32")
    bus.write(pid, 0, np.arange(64, dtype=np.int32).tobytes())
    lsn = ray.get(bus.shards[0].event_position.remote())
    track = bus.track(pid)
    with track as arr:
        assert isinstance(arr, np.ndarray) and arr.dtype == np.int32 and arr.shape == (64,)
        arr[10:20] *= -1
        arr[50] = 7
    want = np.arange(64, dtype=np.int32)
    want[10:20] *= -1
    want[50] = 7
    assert np.array_equal(bus.read(pid), want)               # durable and visible on return
    rows = _shard_rows(bus, lsn, pid)
    assert len(rows) == 1 and rows[0][1] == EventKind.WRITE and rows[0][4] is not None
    assert rows[0][0] == track.ack.first_lsn and track.ack.count == 1
    assert track.delta.client_id == bus.client_id and track.delta.seq > 0


def test_bus_track_writes_nothing_when_the_block_raises(bus):
    pid = bus.create_page(64)
    lsn = ray.get(bus.shards[0].event_position.remote())
    with pytest.raises(KeyError):
        with bus.track(pid) as arr:
            arr[:] = 255
            raise KeyError("user error")
    assert ray.get(bus.shards[0].event_position.remote()) == lsn
    assert not bus.read(pid).any()
