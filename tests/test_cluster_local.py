"""cluster/local.sh brings up a head and two workers on this machine with `ray start`; the runtime
runs across them (shards on different nodes), and `down` stops exactly those nodes."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from _clikit import ROOT, free_ports

DRIVER = r"""
import json, sys
import numpy as np
import ray
import mmsb_dist as mm

bus = mm.start(shards=2, data_dir=sys.argv[1], namespace="mmsb-local", address=sys.argv[2],
               config={"backend": "numpy"})
pings = ray.get([s.ping.remote() for s in bus.shards], timeout=60)
node_resources = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("mmsb_node_"))
                  for n in ray.nodes() if n["Alive"]}
ids = bus.create_pages(32, 4096)
data = np.arange(32 * 64, dtype=np.uint8).reshape(32, 64) | 1
bus.write_many(ids, np.zeros(32, np.int64), data)
epoch = bus.commit()
got = bus.read_many(ids, epoch=epoch)
ok = all(np.array_equal(g[:64], d) for g, d in zip(got, data))
bus.replay(epoch)
mm.stop(namespace="mmsb-local")
print("RESULT " + json.dumps({"nodes": [p["node"] for p in pings], "ok": ok,
                              "labels": [node_resources[p["node"]] for p in pings],
                              "cluster_nodes": len(node_resources)}))
"""


@pytest.fixture(scope="module")
def local_cluster():
    port, dashboard = free_ports(2)
    temp_dir = tempfile.mkdtemp(prefix="mmsb-l-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MMSB_"))}
    env.update({"MMSB_LOCAL_PORT": str(port), "MMSB_LOCAL_DASHBOARD": str(dashboard),
                "MMSB_LOCAL_TEMP_DIR": temp_dir, "MMSB_LOCAL_HEAD_CPUS": "0",
                "MMSB_LOCAL_WORKER_CPUS": "1", "MMSB_LOCAL_BASE_PORT": "47100",
                "PYTHON": sys.executable,
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    script = str(ROOT / "cluster" / "local.sh")
    try:
        up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr[-3000:]
        yield {"env": env, "address": f"127.0.0.1:{port}", "temp_dir": temp_dir}
    finally:
        down = subprocess.run([script, "down"], env=env, capture_output=True, text=True,
                              timeout=120)
        from mmsb_dist.localray import session_pids, stop_nodes
        left = session_pids(temp_dir, port)
        stop_nodes(temp_dir, port)   # a safety net; the test below asserts `down` was enough
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert down.returncode == 0 and not left, down.stdout + down.stderr + str(left)


def test_runtime_runs_across_two_worker_nodes(local_cluster, tmp_path):
    env = {**local_cluster["env"], "RAY_AUTH_MODE": "token"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "data"),
                           local_cluster["address"]], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import json
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])
    assert result["cluster_nodes"] == 3
    assert len(set(result["nodes"])) == 2, result          # the two shards on different nodes
    assert sorted(result["labels"]) == [["mmsb_node_1"], ["mmsb_node_2"]], result
    assert result["ok"]
