"""The README's Python example runs as written (in a temporary directory)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert '"/tmp/shard0"' in code
    exec(compile(code.replace('"/tmp/shard0"', repr(str(tmp_path / "shard0"))), "README", "exec"),
         {})
