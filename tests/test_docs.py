"""docs/adding-a-method.md shows the real RTN method, not a made-up one."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_adding_a_method_rtn_example_is_the_real_file():
    """Catches the worked example drifting from quantizers/rtn.py: every code line of the doc's RTN block (comments
    aside) must be a line of the real file."""
    doc = (ROOT / "docs" / "adding-a-method.md").read_text()
    block = re.search(r"## Example 1: RTN.*?```python\n(.*?)```", doc, re.S).group(1)
    real = {line.split("  #")[0].rstrip() for line in (ROOT / "quantizers" / "rtn.py").read_text().splitlines()}
    code = [line.split("  #")[0].rstrip() for line in block.splitlines() if line.strip()]
    assert len(code) >= 8
    missing = [line for line in code if line not in real]
    assert not missing, missing
