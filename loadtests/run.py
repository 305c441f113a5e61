"""A bounded Locust run against a local runtime and its HTTP gateway, then a consistency check.

    python loadtests/run.py [--users 8] [--spawn-rate 8] [--run-time 20] [--shards 2]
                            [--out bench-results/loadtest.json] [--dir PARENT]

1. Starts a local Ray instance, ``runtime.start(shards=N)`` over a temporary data directory
   (fsync "always": every acknowledgement is durable) and ``gateway.start_gateway`` on a free
   loopback port with a random bearer token.
2. Runs headless Locust (loadtests/locustfile.py) in a process of its own (gevent's monkey patching
   breaks Ray, so Locust never shares a process with it) for ``--run-time`` seconds (at most 60),
   with a hard wall-clock bound on the process as well.
3. Reads back, through the Python client, every page the Locust users wrote, and compares it with
   the users' record of their acknowledged writes (a page with a write of unknown outcome may hold
   either state). Then commits and replays that epoch (the recorded state hashes must match).
4. Prints RPS and p50/p95/p99 (Locust's figures, per request type and overall), writes them with
   the check's result to ``--out`` as JSON, and exits 1 on any failed request or inconsistency.
"""

from __future__ import annotations

import argparse
import base64
import csv
import glob
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

RUN_TIME_S_MAX = 60          # CI bound on the load itself
LOCUST_GRACE_S = 90          # start-up, spawn and stop on top of the run time (a hard bound)
NAMESPACE = "mmsb-loadtest"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=int(os.environ.get("MMSB_LOAD_USERS", "8")))
    ap.add_argument("--spawn-rate", type=float, default=8.0)
    ap.add_argument("--run-time", type=int, default=int(os.environ.get("MMSB_LOAD_RUN_TIME_S",
                                                                       "20")),
                    help=f"seconds of load (at most {RUN_TIME_S_MAX})")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--out", default="bench-results/loadtest.json")
    ap.add_argument("--dir", default=None, help="parent of the temporary data directory")
    args = ap.parse_args(argv)
    if not 1 <= args.run_time <= RUN_TIME_S_MAX:
        ap.error(f"--run-time must be within [1, {RUN_TIME_S_MAX}] seconds")
    return args


def run_locust(url: str, token: str, args, work: str) -> dict:
    records = os.path.join(work, "records")
    prefix = os.path.join(work, "locust")
    env = {**os.environ, "MMSB_LOAD_TOKEN": token, "MMSB_LOAD_RECORD_DIR": records,
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "locust", "-f", os.path.join(HERE, "locustfile.py"),
           "--headless", "--only-summary", "-u", str(args.users), "-r", str(args.spawn_rate),
           "-t", f"{args.run_time}s", "--stop-timeout", "10", "--host", url, "--csv", prefix,
           "--loglevel", "WARNING"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=args.run_time + LOCUST_GRACE_S)
    return {"exit_code": proc.returncode, "seconds": time.monotonic() - t0,
            "stderr_tail": proc.stderr[-3000:], "stats": read_stats(prefix + "_stats.csv"),
            "failures": read_failures(prefix + "_failures.csv"), "records": records}


def _num(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_stats(path: str) -> list[dict]:
    """Locust's per-endpoint rows (and "Aggregated"): count, failures, RPS, latency percentiles."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append({"type": row["Type"], "name": row["Name"],
                         "requests": int(row["Request Count"]),
                         "failures": int(row["Failure Count"]),
                         "rps": _num(row["Requests/s"]), "p50_ms": _num(row["50%"]),
                         "p95_ms": _num(row["95%"]), "p99_ms": _num(row["99%"]),
                         "max_ms": _num(row["Max Response Time"]),
                         "mean_ms": _num(row["Average Response Time"])})
    return rows


def read_failures(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as fh:
        return [dict(r) for r in csv.DictReader(fh)][:20]


def check_consistency(bus, records: str) -> dict:
    """Every page a user wrote holds what its acknowledged writes say (or, for a page with a write
    of unknown outcome, that state with those writes applied)."""
    import numpy as np

    expected, doubt, acked, read_mismatches, users = {}, {}, 0, 0, 0
    for path in sorted(glob.glob(os.path.join(records, "acked-*.json"))):
        with open(path) as fh:
            for user in json.load(fh)["users"]:
                users += 1
                acked += user["acked_writes"]
                read_mismatches += user["read_mismatches"]
                for p, data in user["pages"].items():
                    expected[int(p)] = base64.b64decode(data)
                for p, ws in user["doubt"].items():
                    doubt[int(p)] = [(o, base64.b64decode(d)) for o, d in ws]
    if not expected:
        return {"ok": False, "users": users, "pages": 0, "acked_writes": acked,
                "reason": "no record of acknowledged writes"}
    ids = sorted(expected)
    got = bus.read_many(np.array(ids, dtype=np.uint64))
    bad = []
    for p, g in zip(ids, got):
        data = g.view(np.uint8).tobytes()
        if data == expected[p]:
            continue
        if p in doubt:
            alt = bytearray(expected[p])
            for o, d in doubt[p]:
                alt[o:o + len(d)] = d
            if data == bytes(alt):
                continue
        bad.append(p)
    return {"ok": not bad and read_mismatches == 0 and acked > 0, "users": users,
            "pages": len(ids), "acked_writes": acked, "pages_in_doubt": len(doubt),
            "mismatched_pages": len(bad), "first_mismatched": bad[:10],
            "read_your_writes_mismatches": read_mismatches}


def report(result: dict) -> None:
    print(f"\nLocust: {result['users']} users, {result['run_time_s']} s of load against "
          f"{result['shards']} shards (fsync always)")
    print(f"{'request':<34}{'count':>8}{'fail':>6}{'RPS':>9}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'p99 ms':>9}")
    for row in result["locust"]["stats"]:
        print(f"{(row['type'] + ' ' + row['name']).strip():<34}{row['requests']:>8}"
              f"{row['failures']:>6}{row['rps'] or 0:>9.1f}{row['p50_ms'] or 0:>9.0f}"
              f"{row['p95_ms'] or 0:>9.0f}{row['p99_ms'] or 0:>9.0f}")
    c = result["consistency"]
    print(f"consistency: {'OK' if c['ok'] else 'FAILED'}: {c.get('acked_writes', 0)} acknowledged "
          f"writes on {c.get('pages', 0)} pages, {c.get('mismatched_pages', '?')} mismatched, "
          f"{c.get('pages_in_doubt', 0)} in doubt; replay of epoch {result.get('epoch')}: "
          f"{'OK' if result.get('replay_ok') else 'FAILED'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray

    from mmsb_dist import runtime
    from mmsb_dist.gateway import start_gateway, stop_gateway

    work = tempfile.mkdtemp(prefix="mmsb-loadtest-", dir=args.dir)
    token = secrets.token_urlsafe(24)
    result = {"users": args.users, "spawn_rate": args.spawn_rate, "run_time_s": args.run_time,
              "shards": args.shards, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.shards + 1),
                 include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
        bus = runtime.start(shards=args.shards, data_dir=os.path.join(work, "data"),
                            namespace=NAMESPACE, config={"backend": "numpy", "fsync": "always"})
        # The load generator is one client (one address): the rate limit must not be what is
        # measured, so it is far above what two cores can serve.
        url = start_gateway(namespace=NAMESPACE, port=0, token=token, rate_per_s=1e6,
                            rate_burst=1_000_000)
        result["gateway"] = url
        result["locust"] = run_locust(url, token, args, work)
        result["consistency"] = check_consistency(bus, result["locust"]["records"])
        epoch = bus.commit()
        result["epoch"] = epoch
        result["replay_ok"] = bool(bus.replay(epoch))
    finally:
        try:
            stop_gateway(NAMESPACE)
            runtime.stop(namespace=NAMESPACE)
        finally:
            ray.shutdown()
            shutil.rmtree(work, ignore_errors=True)
    agg = next((r for r in result["locust"]["stats"] if r["name"] == "Aggregated"), None)
    result["summary"] = {"requests": agg["requests"] if agg else 0,
                         "failures": agg["failures"] if agg else None,
                         "rps": agg["rps"] if agg else None,
                         "p50_ms": agg and agg["p50_ms"], "p95_ms": agg and agg["p95_ms"],
                         "p99_ms": agg and agg["p99_ms"]}
    ok = (agg is not None and agg["requests"] > 0 and agg["failures"] == 0
          and result["consistency"]["ok"] and result["replay_ok"])
    result["ok"] = ok
    report(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {args.out}")
    if not ok:
        print(result["locust"]["stderr_tail"], file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
