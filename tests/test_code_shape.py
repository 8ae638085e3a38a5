"""The code stays readable: small modules and small functions (issue #10's limits).

No module of the package over 350 lines and no function over 60 lines; the
Triton kernels (kernels/) may have functions up to 100 lines.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = {"vllm_kvcomp": 60, "kernels": 100}


def _modules():
    for folder in MAX_FUNCTION_LINES:
        yield from sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_and_function_sizes(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name}: {len(text.splitlines())} lines"
    limit = MAX_FUNCTION_LINES[path.relative_to(ROOT).parts[0]]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= limit, f"{path.name}:{node.lineno} {node.name} is {length} lines (limit {limit})"
