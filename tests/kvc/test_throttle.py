from __future__ import annotations

from kvc.throttle import Throttle
from tests.fakeclock import FakeClock


def test_each_key_is_let_through_once_per_interval(clock: FakeClock) -> None:
    throttle = Throttle(2.0, clock=clock)
    assert throttle.due("team-a")
    assert not throttle.due("team-a")
    assert throttle.due("team-b")  # keys do not share an interval
    clock.now += 1.9
    assert not throttle.due("team-a")
    clock.now += 0.1
    assert throttle.due("team-a")


def test_without_a_key_it_is_once_per_interval_for_the_process(clock: FakeClock) -> None:
    throttle = Throttle(30.0, clock=clock)
    assert throttle.due()
    clock.now += 29
    assert not throttle.due()
    clock.now += 1
    assert throttle.due()
