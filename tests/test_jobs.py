"""`mmsb-dist start` on a local Ray head, the examples submitted with `ray job submit`, their
results checked through `connect()`, the epoch commands and status, then `mmsb-dist stop`."""

import json
import sys

import pytest

from _clikit import ROOT, CliHead

NAMESPACE = "mmsb-jobs"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = CliHead(tmp_path_factory.mktemp("jobs"), NAMESPACE)
    try:
        out = h.cli("start").stdout
        assert "started" in out and h.dashboard in out and h.address in out
        yield h
    finally:
        h.teardown()


def _submit(head, script, *args):
    argv = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address",
            head.dashboard, "--working-dir", str(ROOT / "examples"), "--", "python", script,
            "--namespace", NAMESPACE, *args]
    proc = head.run(argv, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def _check(head, kind, result):
    proc = head.run([sys.executable, str(ROOT / "tests" / "_jobcheck.py"), kind, NAMESPACE,
                     json.dumps(result)], timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stdout + proc.stderr[-3000:]


def test_grid_job_results_read_back_through_connect(head):
    result = _submit(head, "grid.py", "--rows", "128", "--cols", "64", "--band-rows", "16",
                     "--steps", "8")
    assert len(result["epochs"]) == 9 and result["checksum"] > 0
    _check(head, "grid", result)


def test_embedding_job_results_read_back_through_connect(head):
    result = _submit(head, "embedding.py", "--rows", "2048", "--dim", "16", "--rows-per-page",
                     "128", "--workers", "2", "--rounds", "2", "--steps", "300")
    assert result["rows_updated"] > 0
    _check(head, "embedding", result)


def test_epoch_commands_and_status(head):
    epoch = int(head.cli("commit").stdout.split()[-1])
    assert int(head.cli("checkpoint").stdout.split()[-1]) == epoch
    assert "every state hash matches" in head.cli("replay", str(epoch)).stdout
    new = int(head.cli("restore", str(epoch)).stdout.split()[-1])
    assert new > epoch
    stats = json.loads(head.cli("status", "--json").stdout)
    assert sorted(s["shard"] for s in stats["shards"]) == [0, 1]
    assert new in stats["committed"] and stats["coordinator"]["last_committed"] == new
    assert all(s["metrics"]["checkpoint_epoch"] == epoch for s in stats["shards"])
    table = head.cli("status").stdout
    assert "replay lag" in table and f"epoch {epoch}" in table and "committed epochs" in table
    line = head.cli("replay", "99999", check=False)
    assert line.returncode == 1 and "never committed" in line.stderr and "Traceback" not in line.stderr
