"""The HTTP gateway's overhead: one durable 64-byte write through HTTP vs through the Python client
(Bus.write), in the same run, on the same runtime; and the same through Ray Serve + FastAPI, the
alternative design, to choose between them by measurement.

    python benchmarks/bench_gateway.py [--quick] [--out bench-results/gateway.json] [--no-serve]
                                       [--dir PARENT]

Setup: ray.init(address="local"), runtime.start(shards=1, fsync="always", backend "numpy") over a
temporary directory, pages of 4 KiB, start_gateway(port=0) (aiohttp inside the detached actor
mmsb-gateway; token on, rate limit far above the load: their cost is part of the figure).
Clients, all sequential (one request in flight: latency, not throughput):
  python     Bus.write(page, offset, 64 bytes)                    (one Ray call to the shard)
  aiohttp    POST /v1/write, JSON + base64, http.client keep-alive (client -> gateway actor ->
             shard: one HTTP hop + one Ray call)
  serve      (unless --no-serve or Ray Serve is not installed) a Serve deployment with a FastAPI
             route doing exactly what the gateway's write does (parse JSON, build and encode the
             batch, await the shard's apply), behind Serve's HTTP proxy (client -> proxy actor ->
             replica -> shard: one HTTP hop + two Ray calls)
Rounds interleave the clients (ROUNDS rounds x WRITES writes each, after a warm-up); latencies are
pooled per client: p50/p90/p99; the ratio is the p50 through HTTP over the Python client's p50.
Also the batch path: Arrow IPC bodies of BATCH deltas to POST /v1/batch vs Bus.write_many of the
same deltas (deltas/s, sequential calls), and single-page reads (GET raw vs Bus.read).

Correctness of what was timed: the last write of every client is read back and compared.

Target (issue 7): median single-write latency through HTTP <= 2x the Python client's.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import machine_info, write_json                   # noqa: E402
from mmsb_dist import runtime                                  # noqa: E402
from mmsb_dist.delta import DeltaBatch                         # noqa: E402
from mmsb_dist.formats import encode_deltas                    # noqa: E402
from mmsb_dist.gateway import start_gateway, stop_gateway      # noqa: E402

NAMESPACE = "mmsb-bench-gateway"
TOKEN = "bench-token"
PAGE_BYTES = 4096
WRITE_BYTES = 64
PAGES = 256
ROUNDS = (3, 5)               # (quick, full)
WRITES = (200, 600)           # per client per round
WARMUP = 50
BATCH = 10_000
BATCH_CALLS = (4, 10)         # per client per round
READS = (100, 300)
SERVE_START_S_MAX = 180.0
TARGET_RATIO = 2.0


class Http:
    """A keep-alive HTTP/1.1 client with no per-request overhead of its own to speak of."""

    def __init__(self, url: str, token: str | None):
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=60)
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def post(self, path: str, body: bytes, ctype: str) -> bytes:
        self.conn.request("POST", path, body, {**self.auth, "Content-Type": ctype})
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"POST {path}: {r.status} {data[:300]!r}")
        return data

    def get(self, path: str) -> bytes:
        self.conn.request("GET", path, headers=self.auth)
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path}: {r.status} {data[:300]!r}")
        return data


def _write_body(page: int, offset: int, data: bytes) -> bytes:
    return json.dumps({"page_id": page, "offset": offset,
                       "data": base64.b64encode(data).decode()}).encode()


# ---- the Ray Serve alternative -------------------------------------------------------------------

def start_serve(namespace: str) -> str:
    """The Serve app of _serve_writer.py behind Serve's HTTP proxy; returns its base URL."""
    from ray import serve

    from _serve_writer import ServeWriter

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ServeWriter.bind(namespace), name="mmsb-bench", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- measurement ---------------------------------------------------------------------------------

def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else None


def _lat(samples_s: list[float]) -> dict:
    ms = [1e3 * s for s in samples_s]
    return {"n": len(ms), "p50_ms": _pct(ms, 50), "p90_ms": _pct(ms, 90), "p99_ms": _pct(ms, 99),
            "mean_ms": statistics.fmean(ms)}


def run(args) -> dict:
    q = 0 if args.quick else 1
    work = tempfile.mkdtemp(prefix="mmsb-bench-gateway-", dir=args.dir)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False,
             namespace=NAMESPACE, log_to_driver=False)
    result: dict = {"machine": machine_info(work), "quick": args.quick}
    try:
        bus = runtime.start(shards=1, data_dir=os.path.join(work, "data"), namespace=NAMESPACE,
                            config={"backend": "numpy", "fsync": "always"})
        ids = bus.create_pages(PAGES, PAGE_BYTES)
        url = start_gateway(namespace=NAMESPACE, port=0, token=TOKEN, rate_per_s=1e6,
                            rate_burst=1_000_000)
        gw = Http(url, TOKEN)
        clients = {"python": lambda p, o, d: bus.write(p, o, d),
                   "aiohttp": lambda p, o, d: gw.post("/v1/write", _write_body(p, o, d),
                                                      "application/json")}
        result["serve"] = {"measured": False}
        if not args.no_serve:
            try:
                t0 = time.perf_counter()
                serve_url = start_serve(NAMESPACE)
                sv = Http(serve_url, None)
                clients["serve"] = lambda p, o, d: sv.post("/v1/write", _write_body(p, o, d),
                                                           "application/json")
                result["serve"] = {"measured": True, "start_s": time.perf_counter() - t0}
            except ImportError as exc:
                result["serve"] = {"measured": False, "why": f"Ray Serve not installed ({exc})"}
        rng = np.random.default_rng(0)
        samples = {name: [] for name in clients}
        last = {}
        for name, fn in clients.items():   # warm-up: connections, code paths, first-touch
            for _ in range(WARMUP):
                fn(int(ids[0]), 0, bytes(WRITE_BYTES))
        for rnd in range(ROUNDS[q]):
            order = list(clients)[rnd % len(clients):] + list(clients)[:rnd % len(clients)]
            for name in order:
                fn = clients[name]
                for _ in range(WRITES[q]):
                    p = int(ids[rng.integers(0, PAGES)])
                    o = int(rng.integers(0, PAGE_BYTES // WRITE_BYTES)) * WRITE_BYTES
                    d = rng.integers(1, 256, WRITE_BYTES, dtype=np.uint8).tobytes()
                    t0 = time.perf_counter()
                    fn(p, o, d)
                    samples[name].append(time.perf_counter() - t0)
                    last[name] = (p, o, d)
        result["single_write"] = {name: _lat(s) for name, s in samples.items()}
        # Verify: each client's last write is there (a later client may have overwritten the same
        # slot only if it drew the same one: compare against the latest writer of that slot).
        verified = {}
        for name, (p, o, d) in last.items():
            later = [n for n, (p2, o2, _) in last.items() if (p2, o2) == (p, o)]
            got = bytes(bus.read(p)[o:o + WRITE_BYTES])
            verified[name] = got == d or len(later) > 1
        result["verified"] = verified

        # Batches: Arrow IPC bodies through HTTP vs write_many, sequential calls.
        pool = rng.integers(1, 256, (BATCH, WRITE_BYTES), dtype=np.uint8)
        batch_s = {"python": [], "aiohttp": []}
        for rnd in range(ROUNDS[q]):
            for name in (["python", "aiohttp"] if rnd % 2 == 0 else ["aiohttp", "python"]):
                for _ in range(BATCH_CALLS[q]):
                    pages = ids[rng.integers(0, PAGES, BATCH)]
                    offs = rng.integers(0, PAGE_BYTES // WRITE_BYTES, BATCH) * WRITE_BYTES
                    if name == "python":
                        t0 = time.perf_counter()
                        bus.write_many(pages, offs, pool)
                    else:
                        t0 = time.perf_counter()
                        body = encode_deltas(DeltaBatch.runs(pages, offs, pool)).to_pybytes()
                        gw.post("/v1/batch", body, "application/vnd.apache.arrow.stream")
                    batch_s[name].append(time.perf_counter() - t0)
        result["batch"] = {name: {"batch": BATCH, "calls": len(s),
                                  "deltas_per_s": BATCH * len(s) / sum(s),
                                  "call_p50_ms": 1e3 * statistics.median(s)}
                           for name, s in batch_s.items()}

        # Reads of one 4 KiB page: raw bytes through HTTP vs Bus.read.
        read_s = {"python": [], "aiohttp": []}
        for rnd in range(ROUNDS[q]):
            for _ in range(READS[q]):
                p = int(ids[rng.integers(0, PAGES)])
                t0 = time.perf_counter()
                a = bus.read(p)
                read_s["python"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                b = gw.get(f"/v1/pages/{p}")
                read_s["aiohttp"].append(time.perf_counter() - t0)
                assert a.tobytes() == b
        result["read"] = {name: _lat(s) for name, s in read_s.items()}
    finally:
        try:
            if result.get("serve", {}).get("measured"):
                from ray import serve
                serve.shutdown()
            stop_gateway(NAMESPACE)
            runtime.stop(namespace=NAMESPACE)
        finally:
            ray.shutdown()
            shutil.rmtree(work, ignore_errors=True)
    sw = result["single_write"]
    result["ratio_http_vs_python_p50"] = sw["aiohttp"]["p50_ms"] / sw["python"]["p50_ms"]
    if "serve" in sw:
        result["ratio_serve_vs_python_p50"] = sw["serve"]["p50_ms"] / sw["python"]["p50_ms"]
    result["target_ratio"] = TARGET_RATIO
    result["pass"] = result["ratio_http_vs_python_p50"] <= TARGET_RATIO
    return result


def print_table(r: dict) -> None:
    print(f"\nsingle 64-byte durable write, sequential ({r['single_write']['python']['n']} per "
          "client, interleaved rounds)")
    print(f"{'client':<10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'vs python p50':>15}")
    base = r["single_write"]["python"]["p50_ms"]
    for name, s in r["single_write"].items():
        print(f"{name:<10}{s['p50_ms']:>9.2f}{s['p90_ms']:>9.2f}{s['p99_ms']:>9.2f}"
              f"{s['p50_ms'] / base:>14.2f}x")
    if not r["serve"].get("measured"):
        print(f"serve: not measured ({r['serve'].get('why', '--no-serve')})")
    b = r["batch"]
    print(f"\nbatches of {BATCH} deltas: write_many {b['python']['deltas_per_s'] / 1e6:.2f} M/s, "
          f"HTTP Arrow {b['aiohttp']['deltas_per_s'] / 1e6:.2f} M/s "
          f"({b['aiohttp']['deltas_per_s'] / b['python']['deltas_per_s']:.2f}x)")
    rd = r["read"]
    print(f"read 4 KiB p50: Bus.read {rd['python']['p50_ms']:.2f} ms, HTTP raw "
          f"{rd['aiohttp']['p50_ms']:.2f} ms")
    print(f"\ntarget: HTTP p50 <= {TARGET_RATIO:g}x python: "
          f"{r['ratio_http_vs_python_p50']:.2f}x {'PASS' if r['pass'] else 'MISS'}; "
          f"verified: {r['verified']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (about a minute)")
    ap.add_argument("--out", default="bench-results/gateway.json")
    ap.add_argument("--no-serve", action="store_true", help="skip the Ray Serve comparison")
    ap.add_argument("--dir", default=None, help="parent of the temp dir (default: the system's)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    result["seconds"] = time.perf_counter() - t0
    print_table(result)
    write_json(args.out, result, result["seconds"])
    return 0 if all(result["verified"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
