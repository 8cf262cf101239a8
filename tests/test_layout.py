"""The layers of DESIGN.md: the otmel library never imports the Ray entrypoints (jobs)."""

from __future__ import annotations

import ast
from pathlib import Path

import otmel

#: the command layer: it runs the jobs (otmel <command>, otmel demo)
COMMANDS = {"cli.py", "demo.py"}


def test_the_library_does_not_import_the_jobs_package():
    offenders = []
    for path in sorted(Path(otmel.__file__).parent.glob("*.py")):
        if path.name in COMMANDS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.startswith("otmel.jobs")]
    assert not offenders, offenders
