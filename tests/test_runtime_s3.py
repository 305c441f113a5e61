"""Shard checkpoints on an S3-compatible store (moto's server on loopback) through the runtime's
``checkpoint_uri``: checkpoint, kill a shard (it recovers from the S3 checkpoint and its local
log), replay and read as of the checkpointed epoch."""

import os
import time

import numpy as np
import pytest
import ray

from _s3kit import KEY, REGION, SECRET, moto_s3
from mmsb_dist import runtime
from mmsb_dist.runtime import _shard_name

NS = "mmsb-s3-test"


@pytest.fixture(scope="module")
def s3_uri():
    with moto_s3("mmsb") as (port, client):
        yield (f"s3://{KEY}:{SECRET}@mmsb/run?endpoint_override=127.0.0.1:{port}"
               f"&scheme=http&region={REGION}&allow_delayed_open=true"), client


def test_checkpoints_on_s3_survive_a_shard_restart(s3_uri, tmp_path, rng):
    uri, client = s3_uri
    ray.init(num_cpus=3, include_dashboard=False, namespace=NS, log_to_driver=False)
    try:
        bus = runtime.start(shards=2, data_dir=str(tmp_path), namespace=NS,
                            config={"backend": "numpy", "checkpoint_uri": uri})
        ids = bus.create_pages(64, 4096)
        data = rng.integers(1, 256, (64, 4096), dtype=np.uint8)
        bus.write_many(ids, np.zeros(64, np.int64), data)
        epoch = bus.commit()
        assert bus.checkpoint() == epoch
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="mmsb")["Contents"]]
        for shard in range(2):
            assert any(k.startswith(f"run/shard-{shard:04d}/epoch-{epoch:020d}/") for k in keys)
        assert not any("checkpoints" in p for p in os.listdir(tmp_path / "shard-0000"))
        bus.write_many(ids[:8], np.zeros(8, np.int64), data[:8, ::-1].copy())
        later = bus.commit()

        victim = ray.get_actor(_shard_name(1), namespace=NS)
        pid = ray.get(victim.ping.remote())["pid"]
        ray.kill(victim, no_restart=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if ray.get(victim.ping.remote(), timeout=5)["pid"] != pid:
                    break
            except (ray.exceptions.RayError, TimeoutError):
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("shard 1 did not come back within 60 s")
        got = bus.read_many(ids)
        want = data.copy()
        want[:8] = data[:8, ::-1]
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
        bus.replay(epoch)
        bus.replay(later)
        assert all(np.array_equal(g, w) for g, w in zip(bus.read_many(ids, epoch=epoch), data))
        runtime.stop(namespace=NS)
    finally:
        ray.shutdown()
