"""Run every benchmark suite, then write docs/benchmarks.md with tables and PNG plots (docs/img/).

    python benchmarks/run_all.py [--quick] [--only ingest,gateway] [--report-only]
                                 [--doc docs/benchmarks.md] [--img docs/img]

Needs the ``bench`` extra (``pip install -e '.[test,bench]'``: matplotlib for the plots, Ray Serve
for the gateway's design comparison). Run it alone on the machine (it starts Ray several times,
one suite after another) and, on a shared machine, under the Ray lock:
``flock /tmp/mmsb-ray.lock python benchmarks/run_all.py --quick``.

Suites: every ``benchmarks/bench_*.py`` (each with ``--quick`` when asked, and ``--out``), and the
Locust load test (``loadtests/run.py``, 20 s of load with --quick, 60 s without). Each runs in its
own process with a wall-clock bound; a suite that fails or times out is reported as such in the
document, and the others still run. Results go to ``bench-results/<suite>[-quick].json``;
``--report-only`` rebuilds the document from those files without running anything.

The document: what ran, where and how long; every target with its verdict; throughput vs batch
size and shard count; latency percentiles; peers side by side (log and ingest vs Redis, checkpoint
vs raw disk, kernels vs NumPy, the HTTP gateway vs the Python client and Ray Serve); each suite's
own table; then benchmarks/notes.md (the hand-written reference figures and analysis: the H100
runs, profiles) as it is.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NOTES = os.path.join(HERE, "notes.md")

# Wall-clock bound per suite (quick, full), seconds.
TIMEOUT_S = {"default": (900, 3600), "loadtest": (300, 600)}
# Extra arguments per suite (quick, full).
EXTRA = {"loadtest": (["--run-time", "20"], ["--run-time", "60"])}


def suites() -> dict[str, list[str]]:
    """name -> script; every bench_*.py, then the load test."""
    out = {os.path.basename(p)[len("bench_"):-3]: p
           for p in sorted(glob.glob(os.path.join(HERE, "bench_*.py")))}
    out["loadtest"] = os.path.join(ROOT, "loadtests", "run.py")
    return out


def result_path(name: str, quick: bool) -> str:
    return os.path.join(ROOT, "bench-results", f"{name}{'-quick' if quick else ''}.json")


def run_suite(name: str, script: str, quick: bool) -> dict:
    q = 0 if quick else 1
    out = result_path(name, quick)
    cmd = [sys.executable, script, "--out", out] + (["--quick"] if quick and name != "loadtest"
                                                    else []) + EXTRA.get(name, ([], []))[q]
    timeout = TIMEOUT_S.get(name, TIMEOUT_S["default"])[q]
    shown = " ".join("python" if c == sys.executable else os.path.relpath(c, ROOT)
                     if c.startswith(ROOT) else c for c in cmd)
    print(f"== {name}: {shown}", flush=True)
    t0 = time.monotonic()
    stamp = os.path.getmtime(out) if os.path.exists(out) else None
    try:
        # The suites import mmsb_dist from this checkout, installed or not.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=env)
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as exc:
        code, tail = "timeout", f"killed after {timeout} s: {str(exc.stdout)[-1500:]}"
    seconds = time.monotonic() - t0
    fresh = os.path.exists(out) and os.path.getmtime(out) != stamp
    print(f"   {'ok' if code == 0 else f'exit {code}'} in {seconds:.0f} s"
          f"{'' if fresh else ' (no result written)'}", flush=True)
    if code != 0:
        print(tail, flush=True)
    return {"name": name, "command": shown,
            "exit": code, "seconds": seconds, "fresh": fresh, "tail": tail if code != 0 else ""}


# ---- reading results -----------------------------------------------------------------------------

def load(name: str, quick: bool) -> dict | None:
    path = result_path(name, quick)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _per_unit(x, unit):
    """bench_replay stores rates in bytes/s under the unit "GB/s": shown in that unit."""
    return x / 1e9 if unit == "GB/s" and isinstance(x, (int, float)) else x


def _f(x, digits: int = 3) -> str:
    """A figure with ``digits`` significant digits, in plain notation for a table."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return f"{x:,}"
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 0.9995e6:
        return f"{x / 1e6:.{digits}g} M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.{digits}g} k"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |"
            for row in rows]
    return "\n".join(out)


# ---- figures -------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ingest(ingest: dict, img: str) -> str | None:
    """write_many deltas/s vs batch size, one line per shard count, Redis as a line."""
    writes = [c for c in ingest.get("configs", []) if c.get("kind") == "write"]
    if not writes:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for c in writes:
        sizes = sorted(int(k.rsplit("_", 1)[1]) for k in c if k.startswith("write_many_"))
        ax.plot(sizes, [c[f"write_many_{s}"]["deltas_per_s"] / 1e6 for s in sizes], "o-",
                label=f"write_many, {c['shards']} shard(s)")
    redis = (ingest.get("baselines", {}).get("redis") or {}).get("deltas_per_s")
    if redis:
        ax.axhline(redis / 1e6, color="red", ls="--", label="Redis SETRANGE, appendfsync always")
        ax.axhline(3 * redis / 1e6, color="red", ls=":", label="target: 3x Redis")
    ax.set_xscale("log")
    ax.set_xlabel("deltas per write_many call (64 B each)")
    ax.set_ylabel("M deltas/s (durable)")
    ax.set_title("Ingest throughput vs batch size and shard count")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, img, "ingest-throughput.png")


def latency_rows(ingest, gateway, loadtest) -> list[tuple[str, float, float, float]]:
    """(what, p50, p95-or-p90, p99) in ms."""
    rows = []
    for c in (ingest or {}).get("configs", []):
        if c.get("kind") == "write" and "naive" in c:
            rows.append((f"Bus.write, {c['shards']} shard(s)", c["naive"]["p50_ms"], None,
                         c["naive"].get("p99_ms")))
        if c.get("kind") == "commit":
            rows.append((f"Bus.commit, {c['shards']} shards", c["commit"]["p50_ms"], None,
                         c["commit"]["p99_ms"]))
    for name, s in (gateway or {}).get("single_write", {}).items():
        label = {"python": "Bus.write (gateway run)", "aiohttp": "HTTP write, aiohttp gateway",
                 "serve": "HTTP write, Ray Serve + FastAPI"}.get(name, name)
        rows.append((label, s["p50_ms"], s.get("p90_ms"), s["p99_ms"]))
    for r in (loadtest or {}).get("locust", {}).get("stats", []):
        if r["name"] != "Aggregated" and r["requests"] > 20:
            rows.append((f"Locust {r['type']} {r['name']}", r["p50_ms"], r["p95_ms"],
                         r["p99_ms"]))
    return rows


def plot_latency(rows, img: str) -> str | None:
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.2))
    y = list(range(len(rows)))
    p50 = [r[1] or 0 for r in rows]
    p99 = [r[3] or 0 for r in rows]
    ax.barh(y, p99, color="#f4a582", label="p99")
    ax.barh(y, p50, color="#4393c3", label="p50")
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
    top = max(p99 + p50)
    ax.xaxis.set_major_locator(FixedLocator([t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500,
                                                         1000) if t <= 2 * top]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ms (log scale)")
    ax.set_title("Latency percentiles (one request in flight per client, except Locust)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, img, "latency.png")


def peer_rows(res: dict) -> list[tuple[str, str, float, str, float]]:
    """(comparison, ours, value, peer, value) with a common unit per row."""
    rows = []
    log = res.get("log")
    if log and log.get("redis_always_fsync"):
        for k in ("log_1_thread", "log_4_threads"):
            rows.append((f"log append ({k.split('_', 1)[1].replace('_', ' ')}), M deltas/s",
                         "mmsb log", log[k]["deltas_per_s"] / 1e6, "Redis always-fsync",
                         log["redis_always_fsync"]["deltas_per_s"] / 1e6))
    ingest = res.get("ingest")
    redis = ((ingest or {}).get("baselines", {}).get("redis") or {}).get("deltas_per_s")
    if ingest and redis:
        best = max(((c[k]["deltas_per_s"], c["shards"], c[k]["batch"])
                    for c in ingest["configs"] if c.get("kind") == "write"
                    for k in c if k.startswith("write_many_")), default=None)
        if best:
            rows.append((f"durable ingest, best write_many ({best[2]} / call, {best[1]} shard(s)),"
                         " M deltas/s", "mmsb runtime", best[0] / 1e6, "Redis always-fsync",
                         redis / 1e6))
    ck = res.get("checkpoint")
    if ck:
        by = {r["key"]: r for r in ck.get("rows", [])}
        if "ckpt_write" in by and "raw_write" in by:
            rows.append(("checkpoint write, GB/s", "write_checkpoint", by["ckpt_write"]["GBps"],
                         "raw write + fsync", by["raw_write"]["GBps"]))
    kern = (res.get("kernels") or {}).get("cpu", {}).get("runs_64B")
    if kern:
        rows.append(("apply 64-byte runs (CPU), M deltas/s", "PageArena.apply",
                     kern["apply_deltas_per_s"] / 1e6, "NumPy fancy index",
                     kern["fancy_deltas_per_s"] / 1e6))
        if "fancy_rows_deltas_per_s" in kern:
            rows.append(("apply 64-byte runs (CPU), M deltas/s", "PageArena.apply",
                         kern["apply_deltas_per_s"] / 1e6, "NumPy fancy 64-byte rows",
                         kern["fancy_rows_deltas_per_s"] / 1e6))
    gw = res.get("gateway")
    if gw:
        sw = gw["single_write"]
        rows.append(("single durable write p50, ms (lower is better)", "HTTP (aiohttp gateway)",
                     sw["aiohttp"]["p50_ms"], "Python client", sw["python"]["p50_ms"]))
        if "serve" in sw:
            rows.append(("single durable write p50, ms (lower is better)", "HTTP (aiohttp gateway)",
                         sw["aiohttp"]["p50_ms"], "Ray Serve + FastAPI", sw["serve"]["p50_ms"]))
    return rows


def plot_peers(rows, img: str) -> str | None:
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(rows), figsize=(2.3 * len(rows) + 1, 3.6))
    axes = [axes] if len(rows) == 1 else list(axes)
    for ax, (what, ours, a, peer, b) in zip(axes, rows):
        ax.bar([0, 1], [a, b], color=["#4393c3", "#bababa"])
        ax.set_xticks([0, 1], [ours, peer], fontsize=7, rotation=20, ha="right")
        ax.set_title(textwrap.fill(what, 28), fontsize=7)
        for x, v in enumerate((a, b)):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle("Side by side with peers and floors (same run)", fontsize=9)
    return _save(fig, img, "peers.png")


def _save(fig, img: str, name: str) -> str:
    os.makedirs(img, exist_ok=True)
    fig.tight_layout()
    path = os.path.join(img, name)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return name


# ---- the document --------------------------------------------------------------------------------

def targets_table(res: dict) -> str:
    rows = []
    for r in (res.get("ingest") or {}).get("rows", []):
        if r.get("verdict"):
            rows.append(["ingest", r["measure"], f"{_f(r['value'])} {r['unit']}",
                         f"{_f(r['ratio'])}" if r.get("ratio") is not None else "",
                         r["target"], r["verdict"]])
    for measure, verdict in ((res.get("replay") or {}).get("targets") or {}).items():
        rows.append(["replay", measure, "", "", "see its table", verdict])
    ck = (res.get("checkpoint") or {}).get("targets")
    if ck:
        rows.append(["checkpoint", "checkpoint write vs raw write", "", _f(ck["write"]),
                     f">= {ck['target_fraction']:g}", "PASS" if ck["write_ok"] else "MISS"])
        rows.append(["checkpoint", "restore vs raw read", "", _f(ck["restore_vs_read"]),
                     f">= {ck['target_fraction']:g}", "PASS" if ck["restore_ok"] else "MISS"])
    log = res.get("log")
    if log and log.get("log_vs_redis"):
        rows.append(["log", "log append (4 threads) vs Redis always-fsync", "",
                     _f(log["log_vs_redis"]["4_threads"]), ">= 3x", "PASS"
                     if log["log_vs_redis"]["4_threads"] >= 3 else "MISS"])
    gw = res.get("gateway")
    if gw:
        rows.append(["gateway", "HTTP single-write p50 vs Python client p50",
                     f"{gw['single_write']['aiohttp']['p50_ms']:.2f} ms",
                     _f(gw["ratio_http_vs_python_p50"]), f"<= {gw['target_ratio']:g}x",
                     "PASS" if gw["pass"] else "MISS"])
    prop = (res.get("propagation") or {}).get("same_shard")
    if prop:
        for fn in ("copy", "user x+1"):
            hop = prop[fn]["eager_hop_us"]
            rows.append(["propagation", f"same-shard hop, eager, {fn} (vs Python call chain)",
                         f"{hop:.2f} us", _f(hop / prop[fn]["python_chain_hop_us"]),
                         "<= 10 us", "PASS" if hop <= 10 else "MISS"])
    lt = res.get("loadtest")
    if lt:
        s = lt["summary"]
        rows.append(["loadtest", "Locust: failed requests; acknowledged writes readable",
                     f"{s['failures']} failed of {s['requests']}", "",
                     "0 failed, consistent", "PASS" if lt["ok"] else "MISS"])
    if not rows:
        return "_No results._"
    return table(["suite", "measure", "value", "ratio", "target", "verdict"], rows)


def suite_tables(res: dict) -> list[str]:
    out = []
    ingest = res.get("ingest")
    if ingest:
        out += ["### Ingest — `benchmarks/bench_ingest.py`", "",
                table(["measure", "value", "unit", "baseline", "ratio", "target", "verdict"],
                      [[r["measure"], r["value"], r["unit"], r.get("baseline"), r.get("ratio"),
                        r.get("target") or "", r.get("verdict") or ""] for r in ingest["rows"]]),
                ""]
    log = res.get("log")
    if log:
        rows = [["raw sequential write, fsync at end", log["raw_fsync_at_end"]["deltas_per_s"],
                 log["raw_fsync_at_end"]["mb_per_s"], ""]]
        for k in ("log_1_thread", "log_4_threads"):
            rows.append([k.replace("_", " "), log[k]["deltas_per_s"], log[k]["mb_per_s"],
                         log["log_vs_redis"][k.split("_", 1)[1]]
                         if log.get("log_vs_redis") else ""])
        if log.get("redis_always_fsync"):
            rows.append(["Redis SETRANGE -P64, appendfsync always",
                         log["redis_always_fsync"]["deltas_per_s"],
                         log["redis_always_fsync"]["mb_per_s"], 1.0])
        out += ["### Log — `benchmarks/bench_log.py`", "",
                table(["row", "deltas/s", "MB/s", "vs Redis"], rows), ""]
    ck = res.get("checkpoint")
    if ck:
        out += ["### Checkpoints — `benchmarks/bench_checkpoint.py`", "",
                table(["measure", "GB/s", "of raw write"],
                      [[r["what"], r.get("GBps"), r.get("of_raw_write")] for r in ck["rows"]]),
                ""]
    rp = res.get("replay")
    if rp:
        out += ["### Restore + replay — `benchmarks/bench_replay.py`", "",
                table(["measure", "value", "unit", "baseline", "ratio", "target", "verdict"],
                      [[r.get("measure", ""), _per_unit(r.get("value"), r.get("unit")),
                        r.get("unit", ""), _per_unit(r.get("baseline"), r.get("unit")),
                        r.get("ratio"), r.get("target") or "", r.get("verdict") or ""]
                       for r in rp["table"]]), ""]
    pr = res.get("propagation")
    if pr and pr.get("same_shard"):
        rows = [[f"same shard, {fn}", v.get("eager_hop_us"), v.get("barrier_hop_us"),
                 v.get("python_chain_hop_us"), "us per hop (baseline: plain Python call chain)"]
                for fn, v in pr["same_shard"].items() if isinstance(v, dict)]
        cs = pr.get("cross_shard") or {}
        if cs:
            rows.append([f"cross shard, {cs.get('hops')} hops", cs.get("eager_hop_ms"),
                         cs.get("barrier_ms_per_hop"), cs.get("ray_rtt_ms"),
                         "ms per hop (baseline: Ray round trip)"])
        out += ["### Propagation — `benchmarks/bench_propagation.py`", "",
                table(["chain", "eager", "at the barrier", "baseline", "unit"], rows), ""]
    kn = (res.get("kernels") or {}).get("cpu")
    if kn:
        rows = [[k, v.get("apply_deltas_per_s"), v.get("fancy_deltas_per_s"),
                 v.get("ratio_vs_fancy"), v.get("fancy_rows_deltas_per_s", "—"),
                 v.get("ratio_vs_fancy_rows", "—")]
                for k, v in kn.items() if "apply_deltas_per_s" in v]
        if "create_pages" in kn:
            cp = kn["create_pages"]
            rows.append(["create pages (us/page; baseline: dict table)", cp["us_per_page"],
                         cp["dict_table_s"] * 1e6 / cp["pages"], cp["ratio_vs_dict"], "", ""])
        out += ["### Kernels (CPU) — `benchmarks/bench_kernels.py`", "",
                table(["workload", "apply deltas/s", "NumPy fancy index", "ratio",
                       "NumPy fancy 64-byte rows", "ratio"], rows), ""]
    return out


def gateway_section(gw: dict | None, lt: dict | None) -> list[str]:
    out = []
    if gw:
        sw = gw["single_write"]
        base = sw["python"]["p50_ms"]
        out += ["### Gateway overhead — `benchmarks/bench_gateway.py`", "",
                "One durable 64-byte write, one request in flight, interleaved rounds, same "
                "runtime (1 shard, fsync always):", "",
                table(["client", "p50 ms", "p90 ms", "p99 ms", "p50 vs Python client"],
                      [[k, v["p50_ms"], v["p90_ms"], v["p99_ms"], f"{v['p50_ms'] / base:.2f}x"]
                       for k, v in sw.items()]), ""]
        if not gw["serve"].get("measured"):
            out += [f"Ray Serve: not measured ({gw['serve'].get('why', '--no-serve')}).", ""]
        b, rd = gw["batch"], gw["read"]
        out += [table(["path", "Python client", "HTTP gateway", "ratio"],
                      [[f"batches of {b['python']['batch']} deltas, deltas/s (write_many vs "
                        "Arrow IPC body)", b["python"]["deltas_per_s"],
                        b["aiohttp"]["deltas_per_s"],
                        b["aiohttp"]["deltas_per_s"] / b["python"]["deltas_per_s"]],
                       ["read one 4 KiB page, p50 ms (Bus.read vs GET raw)",
                        rd["python"]["p50_ms"], rd["aiohttp"]["p50_ms"],
                        rd["aiohttp"]["p50_ms"] / rd["python"]["p50_ms"]]]), ""]
    if lt:
        c = lt["consistency"]
        out += ["### Load test — `python loadtests/run.py`", "",
                f"{lt['users']} Locust users for {lt['run_time_s']} s against {lt['shards']} shards "
                "(fsync always) through the gateway, in a process of its own; then every page the "
                f"users wrote is read back through the Python client: {c.get('acked_writes')} "
                f"acknowledged writes on {c.get('pages')} pages, {c.get('mismatched_pages')} "
                f"mismatched ({c.get('pages_in_doubt', 0)} pages with a write in flight at the "
                f"stop); replay of the final epoch {'verified' if lt.get('replay_ok') else 'FAILED'}."
                f" Verdict: **{'PASS' if lt['ok'] else 'FAIL'}**.", "",
                table(["request", "count", "failures", "RPS", "p50 ms", "p95 ms", "p99 ms"],
                      [[f"{r['type']} {r['name']}".strip(), r["requests"], r["failures"],
                        r["rps"], r["p50_ms"], r["p95_ms"], r["p99_ms"]]
                       for r in lt["locust"]["stats"]]), ""]
    return out


def machine_line(res: dict) -> str:
    m = next((r["machine"] for r in res.values() if r and isinstance(r.get("machine"), dict)
              and "cpu" in r["machine"]), None)
    if not m:
        return ""
    return (f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_bytes'] / 2**30:.0f} GiB, "
            f"{m.get('filesystem', '?')} on {m.get('device', '?')}; Python {m['python']}, "
            f"NumPy {m.get('numpy', '?')}, pyarrow {m.get('pyarrow', '?')}.")


def write_doc(doc: str, img: str, quick: bool, runs: list[dict]) -> None:
    res = {name: load(name, quick) for name in suites()}
    lat = latency_rows(res.get("ingest"), res.get("gateway"), res.get("loadtest"))
    peers = peer_rows(res)
    rel = os.path.relpath(img, os.path.dirname(os.path.abspath(doc)))
    figs = {"ingest": plot_ingest(res["ingest"], img) if res.get("ingest") else None,
            "latency": plot_latency(lat, img), "peers": plot_peers(peers, img)}
    mode = "quick" if quick else "full"
    lines = ["# Benchmarks", "",
             "<!-- Generated by `python benchmarks/run_all.py` from bench-results/*.json; do not "
             "edit by hand. The hand-written part comes from benchmarks/notes.md. -->", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `python benchmarks/run_all.py"
             f"{' --quick' if quick else ''}` ({mode} sizes). Every figure sits beside a baseline "
             "measured in the same run; ratios, not absolute times, are what carry over to "
             "another machine. " + machine_line(res), ""]
    if runs:
        lines += ["| suite | command | status | seconds |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | `{r['command']}` | "
                  f"{'ok' if r['exit'] == 0 else 'exit ' + str(r['exit'])} | {r['seconds']:.0f} |"
                  for r in runs]
        lines.append("")
    missing = [n for n, r in res.items() if r is None]
    if missing:
        lines += [f"No results for: {', '.join(missing)}.", ""]
    lines += ["## Targets", "", targets_table(res), ""]
    lines += ["## Throughput vs batch size and shard count", ""]
    if figs["ingest"]:
        lines += [f"![ingest throughput]({rel}/{figs['ingest']})", ""]
    lines += ["## Latency percentiles", ""]
    if figs["latency"]:
        lines += [f"![latency]({rel}/{figs['latency']})", "",
                  table(["what", "p50 ms", "p90/p95 ms", "p99 ms"],
                        [[a, b, c, d] for a, b, c, d in lat]), ""]
    lines += ["## Peers side by side", ""]
    if figs["peers"]:
        lines += [f"![peers]({rel}/{figs['peers']})", "",
                  table(["comparison", "ours", "value", "peer", "value", "ratio"],
                        [[a, b, c, d, e, c / e if e else None] for a, b, c, d, e in peers]), ""]
    lines += ["## Gateway and load test", ""] + gateway_section(res.get("gateway"),
                                                                  res.get("loadtest"))
    lines += ["## Each suite's table", ""] + suite_tables(res)
    if os.path.exists(NOTES):
        notes = open(NOTES).read()
        notes = "\n".join(("#" + ln if ln.startswith("#") else ln) for ln in notes.splitlines()
                          if not ln.startswith("<!--") and not ln.startswith("     under the")
                          and "docs/benchmarks.md is regenerated" not in ln)
        lines += ["## Reference measurements and analysis (hand-written)", "",
                  "Kept from earlier runs, including the H100 host's GPU figures (from "
                  "benchmarks/notes.md).", "", notes.strip(), ""]
    os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
    with open(doc, "w") as fh:
        fh.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {os.path.relpath(doc, ROOT)} and {len([f for f in figs.values() if f])} plots "
          f"in {os.path.relpath(img, ROOT)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every suite's quick sizes (~10 min)")
    ap.add_argument("--only", default=None, help="comma-separated suites to run (report: all)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the document only")
    ap.add_argument("--doc", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--img", default=os.path.join(ROOT, "docs", "img"))
    args = ap.parse_args(argv)
    try:
        _plt()
    except ImportError:
        ap.error("matplotlib is missing: pip install -e '.[bench]'")
    all_suites = suites()
    chosen = list(all_suites) if not args.only else args.only.split(",")
    unknown = [n for n in chosen if n not in all_suites]
    if unknown:
        ap.error(f"unknown suites {unknown}; known: {', '.join(all_suites)}")
    log = os.path.join(ROOT, "bench-results", f"run_all{'-quick' if args.quick else ''}.json")
    if args.report_only:   # the suites' status as the last run recorded it
        runs = json.load(open(log)) if os.path.exists(log) else []
    else:
        runs = [run_suite(n, all_suites[n], args.quick) for n in chosen]
        os.makedirs(os.path.dirname(log), exist_ok=True)
        with open(log, "w") as fh:
            json.dump(runs, fh, indent=2)
    write_doc(args.doc, args.img, args.quick, runs)
    return 0 if args.report_only or all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
