"""The runtime's metrics read back from Ray's Prometheus export, and the same numbers in
Bus.stats()."""

import re
import time
import urllib.request

import numpy as np
import pytest
import ray

from _clikit import free_ports
from mmsb_dist import runtime

NAMESPACE = "mmsb-metrics"
EXPORT_WAIT_S = 90.0   # Ray exports every few seconds; the first export takes longer


@pytest.fixture(scope="module")
def bus_and_port(tmp_path_factory):
    (port,) = free_ports(1)
    ray.init(num_cpus=3, include_dashboard=False, namespace=NAMESPACE, log_to_driver=False,
             _metrics_export_port=port)
    try:
        bus = runtime.start(shards=2, data_dir=str(tmp_path_factory.mktemp("metrics")),
                            namespace=NAMESPACE, config={"backend": "numpy"})
        yield bus, port
    finally:
        runtime.stop(namespace=NAMESPACE)
        ray.shutdown()


def _samples(port: int) -> dict:
    """{(name, frozenset of labels): value} of the mmsb_* samples on the export endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_mmsb_\w+)\{([^}]*)\}\s+(\S+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def _value(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def test_metrics_reach_prometheus_and_match_stats(bus_and_port):
    bus, port = bus_and_port
    ids = bus.create_pages(64, 4096)
    rng = np.random.default_rng(5)
    n = 3000
    bus.write_many(ids[rng.integers(0, 64, n)], rng.integers(0, 64, n) * 64,
                   rng.integers(1, 256, (n, 64), dtype=np.uint8))
    bus.commit()
    bus.commit()
    stats = bus.stats()
    writes = {str(s["shard"]): s["metrics"]["writes"] for s in stats["shards"]}
    assert sum(writes.values()) == n
    assert stats["coordinator"]["commits"] == 2
    deadline, samples = time.monotonic() + EXPORT_WAIT_S, {}
    while time.monotonic() < deadline:
        try:
            samples = _samples(port)
        except OSError:
            samples = {}
        if (_value(samples, "ray_mmsb_writes_total", namespace=NAMESPACE) >= n
                and _value(samples, "ray_mmsb_commits_total", namespace=NAMESPACE) >= 2):
            break
        time.sleep(1.0)
    names = {name for name, _ in samples}
    assert _value(samples, "ray_mmsb_writes_total", namespace=NAMESPACE) == n, sorted(names)
    for shard, count in writes.items():   # the same numbers as Bus.stats(), shard by shard
        assert _value(samples, "ray_mmsb_writes_total", namespace=NAMESPACE, shard=shard) == count
    assert _value(samples, "ray_mmsb_commits_total", namespace=NAMESPACE) == 2
    for name in ("ray_mmsb_write_bytes_total", "ray_mmsb_apply_seconds_count",
                 "ray_mmsb_batch_deltas_count", "ray_mmsb_commit_seconds_count",
                 "ray_mmsb_log_bytes", "ray_mmsb_replay_lag_lsns", "ray_mmsb_committed_epoch"):
        assert name in names, sorted(names)
    assert _value(samples, "ray_mmsb_log_bytes", namespace=NAMESPACE) > n * 64
    assert _value(samples, "ray_mmsb_replay_lag_lsns", namespace=NAMESPACE) > 0


def test_checkpoint_clears_the_replay_lag(bus_and_port):
    bus, _ = bus_and_port
    bus.commit()
    epoch = bus.checkpoint()
    for s in bus.stats()["shards"]:
        m = s["metrics"]
        assert m["checkpoint_epoch"] == epoch
        # the seal record of the epoch is the only thing after the checkpoint's cut
        assert m["replay_lag_lsns"] <= 1
