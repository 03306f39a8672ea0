"""No function in the package is longer than 60 lines (the developers' guide: small functions)."""

from __future__ import annotations

import ast

from .conftest import ROOT

MAX_LINES = 60


def test_no_function_over_60_lines() -> None:
    long = []
    for path in sorted((ROOT / "cluster_server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                lines = (node.end_lineno or node.lineno) - first + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "split these functions:\n" + "\n".join(long)
