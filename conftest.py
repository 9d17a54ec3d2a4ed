"""Test-run settings shared by tests/ and e2e/."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.fakeclock import FakeClock


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # pytest numbers its temporary directories under one shared /tmp/pytest-of-<user>, and a
    # run may clean up another's: give each run a private one, so suites can run side by side.
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="kvc-pytest-")
        config.stash[_private_basetemp] = Path(config.option.basetemp)


def pytest_unconfigure(config: pytest.Config) -> None:
    private = config.stash.get(_private_basetemp, None)
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)


_private_basetemp = pytest.StashKey[Path]()


@pytest.fixture
def clock() -> FakeClock:
    """A clock for code that takes one, moved by hand (``clock.now += 5``)."""
    return FakeClock()
