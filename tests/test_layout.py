"""What may import what: the unit tests stand on KVC's packages (and ``kvc.testing``), never
on the cluster harness in ``e2e/``, so they run, and fail, for reasons of their own."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_unit_tests_import_nothing_from_the_cluster_harness() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m == "e2e" or m.startswith("e2e."))
        for path in sorted((ROOT / "tests").rglob("*.py"))
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_the_import_check_sees_every_form_of_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import e2e.cluster\nfrom e2e import helpers\nfrom . import sibling\nimport os\n")
    assert imported_modules(module) == {"e2e.cluster", "e2e", "os"}
