"""Where code lives: pipelines' nodes do not import each other, the harness is not installed."""

from __future__ import annotations

import ast
from pathlib import Path

import attention_ctr

PACKAGE = Path(attention_ctr.__file__).parent


def test_no_nodes_module_imports_another_pipeline():
    offenders = []
    for nodes in sorted((PACKAGE / "pipelines").glob("*/nodes.py")):
        for node in ast.walk(ast.parse(nodes.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            offenders += [
                f"{nodes.parent.name}/nodes.py imports {name}"
                for name in names
                if name.startswith("attention_ctr.pipelines")
                and not name.startswith(f"attention_ctr.pipelines.{nodes.parent.name}")
            ]
    assert offenders == [], "shared code belongs in a library module of attention_ctr"


def test_the_test_harness_is_not_part_of_the_package():
    assert not (PACKAGE / "sandbox.py").exists()
