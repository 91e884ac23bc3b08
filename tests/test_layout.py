"""The engine's layout rules (issue 28), checked on the source: small units, and the algorithm independent of the
configuration, so that a score, a visibility rule or a backend is one place to change."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tokenfilter"
ENGINE = [p for d in ("integration", "algorithm") for p in sorted((SRC / d).rglob("*.py"))]


def _imports(path: Path, type_checking: bool = False) -> set[str]:
    """Modules ``path`` imports (those under ``if TYPE_CHECKING:`` only with ``type_checking``)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if not type_checking:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped |= {id(n) for n in ast.walk(node)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: str(p.relative_to(SRC)))
def test_no_class_over_200_lines_no_function_over_60(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        size = node.end_lineno - node.lineno + 1
        if isinstance(node, ast.ClassDef):
            assert size <= 200, f"class {node.name} is {size} lines"
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert size <= 60, f"function {node.name} is {size} lines"


def test_algorithm_does_not_import_the_configuration():
    for path in sorted((SRC / "algorithm").rglob("*.py")):
        imported = _imports(path, type_checking=True)
        assert not any(m.startswith(("tokenfilter.config", "tokenfilter.integration")) for m in imported), path


def test_configuration_imports_no_engine_at_import_time():
    """config.py -> algorithm only; the engine is imported inside ``apply`` (no import circle)."""
    tree = ast.parse((SRC / "config.py").read_text())
    imported = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith("tokenfilter.integration") for m in imported), imported
    for path in sorted((SRC / "integration").rglob("*.py")):
        assert "tokenfilter.config" not in _imports(path), path


def test_option_strings_are_read_in_the_plan_only():
    """Outside ``integration/plan.py``, the engine never reads the options that name a behaviour."""
    options = ("skip", "kv", "recent", "granularity", "path", "score", "fusion", "schedule")
    for path in sorted((SRC / "integration").rglob("*.py")):
        if path.name == "plan.py":
            continue
        text = path.read_text()
        for name in options:
            assert f"cfg.{name}" not in text and f"config.{name}" not in text, (path, name)
