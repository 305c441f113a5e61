"""The README's main job runs and reports success; its checks can fail."""

import subprocess
import sys

from click.testing import CliRunner

from mmsb_dist.cli import main


def test_demo_runs_end_to_end_and_verifies(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--data-dir", str(tmp_path), "--pages", "512",
                                       "--batches", "12", "--backend", "numpy"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "acknowledged batches lost             0" in out
    assert "sealed epochs replayed to their hash" in out and "result" in out and "OK" in out


def test_demo_report_fails_when_a_check_fails():
    from mmsb_dist.demo import DemoReport

    report = DemoReport()
    report.add("x", 1)
    report.ok &= False
    assert report.render().splitlines()[-1].split()[-1] == "FAILED"


def test_command_is_installed_and_has_help():
    out = subprocess.run([sys.executable, "-m", "mmsb_dist.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "demo" in out.stdout
