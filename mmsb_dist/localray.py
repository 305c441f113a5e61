"""Ray nodes on this machine, started with ``ray start`` and stopped by their session's temp dir.

``mmsb-dist start`` (no ``--address``) brings up a Ray head this way so that it outlives the
command, with the dashboard and job server on (``ray job submit`` needs them) and a Prometheus
metrics export port. ``cluster/local.sh`` adds worker nodes to it on the same machine.

Stopping never runs ``ray stop``: that kills every Ray instance on the machine, other users'
included. Every process of a node started here carries its temp dir (which holds the session's
sockets and logs) on its command line, so ``stop_nodes`` ends exactly the processes whose command
line names that dir, by pid: SIGTERM first, SIGKILL for what is left after a bounded wait.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mmsb_dist.errors import MmsbError

# `ray start` returns once the node's processes are up; on a loaded 2-core machine that takes
# 5-20 s (the dashboard is the slowest). Past this the command is stuck, not slow.
RAY_START_TIMEOUT_S = 180.0

# Processes get this long to exit after SIGTERM before they are killed.
STOP_GRACE_S = 10.0


class LocalRayError(MmsbError, RuntimeError):
    """A Ray node on this machine could not be started or stopped as asked."""


def _ray_cli() -> list[str]:
    """``ray`` of this Python (the one mmsb_dist is installed in), whatever PATH says."""
    exe = Path(sys.executable).with_name("ray")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def reachable(host: str, port: int, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _run_ray_start(args: list[str], what: str) -> str:
    cmd = _ray_cli() + ["start", "--disable-usage-stats", *args]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RAY_START_TIMEOUT_S,
                              env=env)
    except subprocess.TimeoutExpired as exc:
        raise LocalRayError(f"`ray start` for the {what} did not finish within "
                            f"{RAY_START_TIMEOUT_S:g} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise LocalRayError(f"`ray start` for the {what} failed (exit {proc.returncode}): "
                            + " | ".join(tail))
    return proc.stdout


def start_head(*, temp_dir: str, port: int, dashboard_port: int, metrics_export_port: int,
               client_server_port: int, num_cpus: int | None = None, object_store_memory_bytes: int | None = None,
               resources: dict | None = None, dashboard: bool = True) -> str:
    """Start a Ray head on 127.0.0.1 that outlives this process; returns its address
    (``127.0.0.1:port``). Refuses when a port is taken (another Ray, or another program)."""
    ports = {"port": port, "metrics_export_port": metrics_export_port,
             "client_server_port": client_server_port}
    if dashboard:
        ports["dashboard_port"] = dashboard_port
    taken = [f"{k}={v}" for k, v in ports.items() if not port_free(v)]
    if taken:
        raise LocalRayError(f"cannot start a local Ray head: port(s) in use: {', '.join(taken)} "
                            "(stop what holds them, or pick free ports under `ray:` in the config)")
    args = ["--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
            "--temp-dir", temp_dir, "--metrics-export-port", str(metrics_export_port),
            "--ray-client-server-port", str(client_server_port),
            "--include-dashboard", "true" if dashboard else "false"]
    if dashboard:
        args += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
    args += _common_args(num_cpus, object_store_memory_bytes, resources)
    _run_ray_start(args, "head")
    return f"127.0.0.1:{port}"


def _common_args(num_cpus, object_store_memory_bytes, resources) -> list[str]:
    args = []
    if num_cpus is not None:
        args += ["--num-cpus", str(int(num_cpus))]
    if object_store_memory_bytes is not None:
        args += ["--object-store-memory", str(int(object_store_memory_bytes))]
    if resources:
        args += ["--resources", json.dumps(resources)]
    return args


def session_pids(temp_dir: str, port: int | None = None) -> list[int]:
    """Pids of the processes of the nodes started with ``temp_dir``: those whose command line
    names it, the Ray client server of the head on ``port`` (its command line names only the
    head's address), and every descendant of those (agents and workers rename themselves)."""
    needle = os.path.abspath(temp_dir)
    address_suffix = None if port is None else f":{int(port)}"
    roots = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = p.info.get("cmdline") or []
        if p.info["pid"] == os.getpid():
            continue
        if any(needle in part for part in cmdline) or (address_suffix is not None and any(
                part.startswith("--address=") and part.endswith(address_suffix)
                for part in cmdline)):
            roots.append(p)
    pids = {p.pid for p in roots}
    for p in roots:
        try:
            pids.update(c.pid for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    pids.discard(os.getpid())
    return sorted(pids)


def stop_nodes(temp_dir: str, port: int | None = None) -> int:
    """End every process of the Ray nodes started with ``temp_dir`` (head on ``port``); returns
    how many there were. Agents ignore SIGTERM at times: what is alive after the grace period is
    killed."""
    procs = []
    for pid in session_pids(temp_dir, port):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=STOP_GRACE_S)
    return len(procs)


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if reachable(host, port, timeout_s=1.0):
            return True
        time.sleep(0.2)
    return False
