"""The README's main job runs and reports success; its checks can fail; the command's help and
its refusals (one clear line, exit 1, no traceback)."""

import subprocess
import sys

from click.testing import CliRunner

from mmsb_dist.cli import main


def test_demo_runs_end_to_end_and_verifies(tmp_path):
    # The demo starts (and shuts down) its own local Ray instance in this process.
    result = CliRunner().invoke(main, ["demo", "--data-dir", str(tmp_path), "--pages", "256",
                                       "--batches", "12", "--backend", "numpy"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "pages differing from the acknowledged writes  0" in out
    assert "committed epochs replayed to their hashes" in out
    assert "shard killed" in out and "recovered" in out
    assert out.splitlines()[-1].split()[-1] == "OK"


def test_demo_report_fails_when_a_check_fails():
    from mmsb_dist.demo import DemoReport

    report = DemoReport()
    report.add("x", 1)
    report.ok &= False
    assert report.render().splitlines()[-1].split()[-1] == "FAILED"


def test_demo_model_keeps_the_last_write_of_each_cell():
    import numpy as np

    from mmsb_dist.demo import CELL_BYTES, apply_to_model

    model = np.zeros((2, 4 * CELL_BYTES), np.uint8)
    pages, cells = np.array([1, 1, 0, 1]), np.array([64, 64, 0, 128])
    payload = np.stack([np.full(CELL_BYTES, v, np.uint8) for v in (1, 2, 3, 4)])
    apply_to_model(model, pages, cells, payload)
    assert model[1, 64] == 2 and model[0, 0] == 3 and model[1, 128] == 4 and model[1, 0] == 0


def test_command_is_installed_and_has_help():
    out = subprocess.run([sys.executable, "-m", "mmsb_dist.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for command in ("start", "status", "stop", "commit", "checkpoint", "replay", "restore",
                    "bench", "demo"):
        assert command in out.stdout


def _refused(args, env=None, tmp_path=None):
    env = {"MMSB_STATE_DIR": str(tmp_path / "state"), **(env or {})}
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_bad_configuration_gets_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("shards: 2\nshardz: 3\n")
    assert "unknown key 'shardz'" in _refused(["--config", str(bad), "start"], tmp_path=tmp_path)
    bad.write_text("ray:\n  port: six\n")
    line = _refused(["--config", str(bad), "start"], tmp_path=tmp_path)
    assert "'ray.port'" in line and "integer" in line and str(bad) in line
    line = _refused(["start", "--shards", "0"], tmp_path=tmp_path)
    assert "'shards'" in line and "greater than 0" in line
    line = _refused(["start"], env={"MMSB_SHARDS": "100000"}, tmp_path=tmp_path)
    assert "MMSB_SHARDS" in line and "SHARDS_MAX" in line
    line = _refused(["start", "--address", "127.0.0.1:9", "--data-dir", str(tmp_path / "d")],
                    tmp_path=tmp_path)
    assert "unreachable" in line and "127.0.0.1:9" in line
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os
        if os.access(ro, os.W_OK):  # root writes anywhere: use a path under a file instead
            (tmp_path / "file").write_text("x")
            target = str(tmp_path / "file" / "data")
        else:
            target = str(ro / "data")
        line = _refused(["start", "--data-dir", target], tmp_path=tmp_path)
        assert "not writable" in line and target in line
    finally:
        ro.chmod(0o700)


def test_commands_without_a_runtime_say_how_to_start_one(tmp_path):
    line = _refused(["--namespace", "nobody-here", "status"], tmp_path=tmp_path)
    assert "mmsb-dist start" in line and "nobody-here" in line


def test_bench_names_the_suites_it_has():
    result = CliRunner().invoke(main, ["bench", "no-such-suite"])
    assert result.exit_code == 1 and "no benchmark suite 'no-such-suite'" in result.output
    assert "ingest" in result.output
