"""Helpers for tests that run the `mmsb-dist` command against a Ray head it starts itself: free
loopback ports, a private temp dir and state dir, the environment the command and Ray's own
commands need, and a teardown that stops only that head."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND_TIMEOUT_S = 300


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class CliHead:
    """`mmsb-dist start` / `stop` with settings from MMSB_* variables (the documented layer)."""

    def __init__(self, tmp: Path, namespace: str, shards: int = 2, **extra):
        self.namespace = namespace
        self.temp_dir = tempfile.mkdtemp(prefix="mmsb-t-", dir="/tmp")  # short: socket paths
        self.port, self.dashboard_port, self.metrics_port, client = free_ports(4)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MMSB_", "RAY_"))}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.update({"MMSB_STATE_DIR": str(tmp / "state"), "MMSB_NAMESPACE": namespace,
                    "MMSB_DATA_DIR": str(tmp / "data"), "MMSB_SHARDS": str(shards),
                    "MMSB_BACKEND": "numpy", "MMSB_RAY_PORT": str(self.port),
                    "MMSB_RAY_DASHBOARD_PORT": str(self.dashboard_port),
                    "MMSB_RAY_METRICS_EXPORT_PORT": str(self.metrics_port),
                    "MMSB_RAY_CLIENT_SERVER_PORT": str(client),
                    "MMSB_RAY_TEMP_DIR": self.temp_dir, "MMSB_RAY_NUM_CPUS": "4",
                    "MMSB_RAY_OBJECT_STORE_MEMORY_BYTES": str(200 << 20)})
        env.update(extra)
        self.env = env
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        # What a driver or `ray job submit` needs to reach a head started by `mmsb-dist start`
        # (it prints these): the address, and token authentication (Ray >= 2.59 default).
        self.client_env = {**env, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}

    def cli(self, *args, timeout=COMMAND_TIMEOUT_S, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "mmsb_dist.cli", *args], env=self.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def run(self, argv, timeout=COMMAND_TIMEOUT_S, cwd=ROOT) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.client_env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)

    def teardown(self) -> None:
        from mmsb_dist.localray import stop_nodes

        try:
            self.cli("stop", timeout=120, check=False)
        finally:
            stop_nodes(self.temp_dir, self.port)   # whatever `stop` left: this head only
            shutil.rmtree(self.temp_dir, ignore_errors=True)
