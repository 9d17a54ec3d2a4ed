"""Fixtures shared by the tests of the agent's writers and of the source types' fetches."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the replica holding a file the agent (root) must never change."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "victim").write_bytes(b"precious")
    return directory
