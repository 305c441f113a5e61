"""The README's Python examples run as written (with temporary directories)."""

import re
from pathlib import Path

import ray

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_engine_example_runs(tmp_path):
    (code,) = [b for b in _blocks() if "ShardEngine(" in b]
    assert '"/tmp/shard0"' in code
    exec(compile(code.replace('"/tmp/shard0"', repr(str(tmp_path / "shard0"))), "README", "exec"),
         {})


def test_readme_runtime_example_runs(tmp_path):
    (code,) = [b for b in _blocks() if "mm.start(" in b]
    assert '"/tmp/mmsb-data"' in code
    code = code.replace('"/tmp/mmsb-data"', repr(str(tmp_path / "data")))
    code = code.replace("mm.start(shards=2,", "mm.start(namespace='mmsb-readme', shards=2,")
    code = code.replace("mm.stop()", "mm.stop(namespace='mmsb-readme')")
    started_here = not ray.is_initialized()
    try:
        exec(compile(code, "README", "exec"), {})
    finally:
        if started_here:
            ray.shutdown()
