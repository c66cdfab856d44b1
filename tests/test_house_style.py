"""House rules checked on the source: small functions (``shared/docs/design.md``)."""

from __future__ import annotations

import ast
from pathlib import Path

import fdjax

LIMIT = 80


def test_no_function_in_fdjax_is_longer_than_80_lines():
    root = Path(fdjax.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines})")
    assert not long, long
    assert len(list(root.rglob("*.py"))) > 30  # it read the package
