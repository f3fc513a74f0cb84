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


def _readme_python_blocks():
    import ast

    text = (ROOT / "README.md").read_text()
    return [ast.parse(block) for block in re.findall(r"```python\n(.*?)```", text, re.S)]


def test_readme_names_work_after_a_plain_import_hfq():
    """Catches README showing a public name that `import hfq` does not provide (e.g. `hfq.models.resolve` when
    hfq.models was not imported by the package) or a config call README shows that its class rejects."""
    import ast

    import hfq

    checked = 0
    for tree in _readme_python_blocks():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hfq":
                assert hasattr(hfq, node.attr), f"README uses hfq.{node.attr}"
                checked += 1
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "hfq" and \
                    node.func.attr.endswith("Config"):
                eval(compile(ast.Expression(node), "README.md", "eval"), {"hfq": hfq})  # builds and validates
    assert checked >= 5
    # calls in prose, e.g. `hfq.models.resolve("smollm2-135m")` (module paths like `hfq.modeling.petr` are imports)
    for dotted in set(re.findall(r"`(hfq(?:\.\w+)+)\(", (ROOT / "README.md").read_text())):
        obj = hfq
        for part in dotted.split(".")[1:]:
            assert hasattr(obj, part), f"README mentions {dotted}, but after `import hfq` {part!r} is missing"
            obj = getattr(obj, part)
