from __future__ import annotations

import pytest

from kvc.controller.passes import PassMemory
from tests.fakeclock import FakeClock

RUNNING = {"state": "Running", "message": "all 1 volumes ready"}
PENDING = {"state": "Pending", "message": "data: waiting for claim"}


def test_what_was_written_lately_wins_over_a_stale_object(clock: FakeClock) -> None:
    memory = PassMemory(trust_seconds=30, clock=clock)
    assert memory.status("u", PENDING) == PENDING  # nothing written yet: the object
    memory.record("u", "Running", RUNNING)
    clock.now += 5
    # The watch has not delivered the patch yet: the object still says Pending.
    assert memory.status("u", {**PENDING, "observedGeneration": 1}) == {**RUNNING, "observedGeneration": 1}


def test_after_the_trust_window_the_object_wins_so_a_lost_patch_is_written_again(clock: FakeClock) -> None:
    memory = PassMemory(trust_seconds=30, clock=clock)
    memory.record("u", "Running", RUNNING)
    clock.now += 31
    assert memory.status("u", PENDING) == PENDING


def test_a_pass_that_writes_nothing_does_not_extend_the_trust(clock: FakeClock) -> None:
    memory = PassMemory(trust_seconds=30, clock=clock)
    memory.record("u", "Running", RUNNING)
    clock.now += 20
    memory.record("u", "Running", None)
    clock.now += 11
    assert memory.status("u", PENDING) == PENDING


def test_a_running_volumemanager_left_unchanged_is_looked_at_less_often(clock: FakeClock) -> None:
    memory = PassMemory(settled_seconds=10, clock=clock)
    assert memory.due("u")
    memory.record("u", "Running", RUNNING)  # it changed: not settled yet
    assert memory.due("u")
    memory.record("u", "Running", None)
    assert not memory.due("u")
    assert memory.until_due("u") == 10
    clock.now += 9.9
    assert not memory.due("u")
    assert memory.until_due("u") == pytest.approx(0.1)
    clock.now += 0.1
    assert memory.due("u")
    assert memory.until_due("u") == 0


def test_a_settled_volumemanager_is_due_at_once_when_a_pass_changes_it(clock: FakeClock) -> None:
    memory = PassMemory(settled_seconds=10, clock=clock)
    memory.record("u", "Running", None)
    assert memory.until_due("u") == 10
    memory.record("u", "Pending", PENDING)  # e.g. its spec changed: the update handler's pass
    assert memory.until_due("u") == 0


@pytest.mark.parametrize("state", ["Pending", "Running", "Failed"])
def test_an_unchanged_volumemanager_waits_until_one_of_its_inputs_changes(state: str, clock: FakeClock) -> None:
    memory = PassMemory(settled_seconds=10, clock=clock)
    memory.record("u", state, None)
    clock.now += 3
    memory.touch(["other"])
    assert memory.until_due("u") == 7
    memory.touch(["u"])  # e.g. its claim bound
    assert memory.due("u")
    clock.now += 1
    started = memory.now()
    clock.now += 1
    memory.record("u", state, None, started)  # that pass saw the change
    assert memory.until_due("u") == 9


def test_a_change_during_a_pass_is_looked_at_again(clock: FakeClock) -> None:
    memory = PassMemory(settled_seconds=10, clock=clock)
    started = memory.now()
    clock.now += 0.5
    memory.touch(["u"])  # after the pass read its inputs
    clock.now += 0.5
    memory.record("u", "Pending", None, started)
    assert memory.due("u")


def test_a_node_change_wakes_only_those_not_running(clock: FakeClock) -> None:
    memory = PassMemory(settled_seconds=10, clock=clock)
    memory.record("running", "Running", None)
    memory.record("pending", "Pending", None)
    clock.now += 1
    memory.touch_nodes()  # a node joined: placement may succeed now
    assert memory.due("pending")
    assert memory.until_due("running") == 9


def test_forgetting_a_deleted_volumemanager(clock: FakeClock) -> None:
    memory = PassMemory(clock=clock)
    memory.record("u", "Running", RUNNING)
    memory.record("u", "Running", None)
    memory.forget("u")
    assert memory.due("u")
    assert memory.status("u", PENDING) == PENDING
    assert memory.due("other")


def test_one_pass_at_a_time_and_the_one_refused_is_looked_at_again(clock: FakeClock) -> None:
    memory = PassMemory(settled_seconds=10, clock=clock)
    started = memory.now()
    assert memory.begin("u")  # e.g. a watch event's pass
    assert memory.begin("other")  # others are not held up
    clock.now += 0.5
    assert not memory.begin("u")  # the timer's, meanwhile: refused
    clock.now += 0.5
    memory.record("u", "Pending", None, started)
    memory.end("u")
    # The first pass may have read before what the refused one came for: due again.
    assert memory.due("u")
    assert memory.begin("u")
    memory.end("u")
