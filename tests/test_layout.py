"""What may import what (docs/architecture.md): the unit tests stand on KVC's packages (and
``kvc.testing``), never on the cluster harness in ``e2e/``, so they run, and fail, for reasons
of their own; and ``kvc`` needs nothing of the webhook server but the command that starts it
(the wiring the webhook and the controller share is ``kvc.wiring``)."""

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


def offenders(directory: Path, forbidden: str, allowed: tuple[str, ...] = ()) -> dict[str, list[str]]:
    found = {}
    for path in sorted(directory.rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if name in allowed:
            continue
        modules = sorted(m for m in imported_modules(path) if m == forbidden or m.startswith(f"{forbidden}."))
        if modules:
            found[name] = modules
    return found


def test_unit_tests_import_nothing_from_the_cluster_harness() -> None:
    assert offenders(ROOT / "tests", "e2e") == {}


def test_kvc_imports_the_webhook_server_only_in_the_command_that_runs_it() -> None:
    assert offenders(ROOT / "kvc", "webhook", allowed=("kvc/cli.py",)) == {}


def test_the_webhook_server_knows_nothing_of_the_workers_that_run_it() -> None:
    """workers runs server's ``serve`` in each worker process; the other way would be a cycle."""
    assert "webhook.workers" not in imported_modules(ROOT / "webhook" / "server.py")


def test_the_import_check_sees_every_form_of_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import e2e.cluster\nfrom e2e import helpers\nfrom . import sibling\nimport os\n")
    assert imported_modules(module) == {"e2e.cluster", "e2e", "os"}
