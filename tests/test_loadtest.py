"""The CI load test: loadtests/run.py starts a runtime and its gateway, runs a bounded headless
Locust in a process of its own, and checks every acknowledged write. Asserts no failed request and
a consistent state, never speed. Also: the consistency check itself catches a lost write."""

import base64
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "loadtests"))

import run as loadrun  # noqa: E402  (loadtests/run.py; imports neither Ray nor Locust at import)

RUN_TIME_S = int(os.environ.get("MMSB_LOAD_RUN_TIME_S", "20"))


def test_locust_run_has_no_failures_and_every_acknowledged_write_is_readable(tmp_path):
    out = tmp_path / "loadtest.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "loadtests", "run.py"),
                           "--run-time", str(RUN_TIME_S), "--users", "6", "--out", str(out)],
                          capture_output=True, text=True, timeout=RUN_TIME_S + 300, cwd=ROOT)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    summary, consistency = result["summary"], result["consistency"]
    assert summary["requests"] > 0 and summary["failures"] == 0, result["locust"]["failures"]
    for key in ("rps", "p50_ms", "p95_ms", "p99_ms"):
        assert summary[key] is not None and summary[key] >= 0
    names = {row["name"] for row in result["locust"]["stats"]}
    assert {"/v1/write", "/v1/batch", "/v1/pages/[id]", "/v1/commit"} <= names   # the whole mix
    assert consistency["ok"] and consistency["acked_writes"] > 0, consistency
    assert consistency["mismatched_pages"] == 0 and result["replay_ok"]
    assert proc.returncode == 0, proc.stdout[-3000:]


class _FakeBus:
    def __init__(self, pages):
        self.pages = pages

    def read_many(self, ids):
        return [np.frombuffer(self.pages[int(p)], np.uint8) for p in ids]


def _record(tmp_path, pages, doubt=None):
    doc = {"users": [{"uid": 0, "acked_writes": 3, "read_mismatches": 0,
                      "pages": {str(p): base64.b64encode(d).decode() for p, d in pages.items()},
                      "doubt": {str(p): [[o, base64.b64encode(d).decode()] for o, d in ws]
                                for p, ws in (doubt or {}).items()}}]}
    (tmp_path / "acked-1.json").write_text(json.dumps(doc))
    return str(tmp_path)


def test_consistency_check_catches_a_lost_write_and_accepts_either_outcome_in_doubt(tmp_path):
    acked = {1: b"abcd", 2: b"wxyz"}
    records = _record(tmp_path, acked, doubt={2: [(1, b"QQ")]})
    assert loadrun.check_consistency(_FakeBus(acked), records)["ok"]
    assert loadrun.check_consistency(_FakeBus({1: b"abcd", 2: b"wQQz"}), records)["ok"]
    lost = loadrun.check_consistency(_FakeBus({1: b"abc\0", 2: b"wxyz"}), records)
    assert not lost["ok"] and lost["first_mismatched"] == [1]
    assert not loadrun.check_consistency(_FakeBus({1: b"abcd", 2: b"wQyz"}), records)["ok"]
