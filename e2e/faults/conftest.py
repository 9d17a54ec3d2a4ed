"""The fault suite's seed, and a way to leave the suite out.

The seed comes from ``KVC_FAULT_SEED`` or is drawn at random; it is shown in the run's
header, when the test starts and in every failure, so that a run can be replayed.
The suite runs with ``make test`` and ``make test-e2e`` too (about three minutes);
``KVC_FAULTS=0`` skips it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SEED = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    text = os.environ.get("KVC_FAULT_SEED", "").strip()
    try:
        seed = int(text) if text else random.SystemRandom().randrange(1, 1_000_000)
    except ValueError:
        raise pytest.UsageError(f"KVC_FAULT_SEED must be a whole number, not {text!r}") from None
    config.stash[SEED] = seed


def pytest_report_header(config: pytest.Config) -> str:
    return f"KVC fault suite seed: {config.stash[SEED]} (replay: KVC_FAULT_SEED={config.stash[SEED]} make test-faults)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("KVC_FAULTS", "").strip() != "0":
        return
    skip = pytest.mark.skip(reason="KVC_FAULTS=0: the fault suite is left out")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fault_seed(pytestconfig: pytest.Config) -> int:
    return pytestconfig.stash[SEED]
