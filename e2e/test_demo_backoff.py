"""The demo supervisor's restart policy, without processes: the back-off as the kubelet's
CrashLoopBackOff (doubling, capped, reset by a stable run), and a component's life through
exits, waits, restarts and probes, on a clock the test moves."""

from __future__ import annotations

import logging
import signal

import pytest

from e2e.demo import BACKOFF, RUNNING, STARTING, BackOff, Supervised, describe_exit, status_table


def test_the_wait_doubles_after_each_quick_exit_up_to_the_cap() -> None:
    policy = BackOff(initial=1, cap=30, stable_after=60)
    delays: list[float] = []
    previous = None
    for _ in range(8):
        previous = policy.delay(previous, ran_for=2)
        delays.append(previous)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_a_stable_run_starts_the_wait_over() -> None:
    policy = BackOff(initial=1, cap=30, stable_after=60)
    assert policy.delay(16, ran_for=59.9) == 30  # not quite stable: still crash-looping
    assert policy.delay(16, ran_for=60) == 1
    assert policy.delay(30, ran_for=3600) == 1


class FakeProcess:
    """A component whose exits, restarts and probe answers the test decides."""

    def __init__(self, name: str = "kvc-controller") -> None:
        self.name = name
        self.pid: int | None = 100
        self.exit_code: int | None = None
        self.answers = False
        self.restarted = 0

    def healthy(self) -> bool:
        return self.exit_code is None and self.answers

    def restart(self) -> object:
        self.restarted += 1
        self.pid = 100 + self.restarted
        self.exit_code, self.answers = None, False
        return self


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_an_exited_component_waits_then_starts_again_and_is_running_once_its_probe_answers(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    process = FakeProcess()
    component = Supervised(process, BackOff(initial=1, cap=30, stable_after=60), clock=clock)
    clock.now += 123
    assert not component.tick()  # running: nothing to do

    process.exit_code = -signal.SIGKILL
    with caplog.at_level(logging.INFO, logger="e2e.demo"):
        assert component.tick()
        assert component.state == BACKOFF
        assert component.row()["pid"] is None
        assert component.row()["last_exit"] == {"code": None, "signal": "SIGKILL", "at": clock.now, "ran_for": 123}
        clock.now += 0.9
        assert not component.tick()
        assert process.restarted == 0  # the back-off is not over

        clock.now += 0.1
        assert component.tick()
        assert process.restarted == 1
        assert component.state == STARTING
        assert not component.tick()  # its probe does not answer yet

        process.answers = True
        assert component.tick()
    assert component.state == RUNNING
    assert component.row() | {"last_exit": None} == {
        "name": "kvc-controller",
        "pid": 101,
        "state": RUNNING,
        "restarts": 1,
        "last_exit": None,
        "started_at": clock.now,
        "restart_at": None,
    }
    assert [record.getMessage() for record in caplog.records] == [
        "kvc-controller exited (killed by SIGKILL) after 123s; restarting in 1s (restart 1)",
        "kvc-controller starting again (pid 101, restart 1)",
        "kvc-controller running again (pid 101, restart 1)",
    ]


def test_a_crash_loop_waits_longer_each_time_until_a_run_lasts(clock: Clock) -> None:
    process = FakeProcess("kvc-webhook")
    component = Supervised(process, BackOff(initial=1, cap=4, stable_after=60), clock=clock)
    waits = []
    for ran_for in (5, 5, 5, 5, 61, 5):
        clock.now += ran_for
        process.exit_code = 1
        assert component.tick()
        waits.append(component.restart_at - clock.now)
        clock.now = component.restart_at
        assert component.tick()  # started again
    assert waits == [1, 2, 4, 4, 1, 2]
    assert component.restarts == 6
    assert component.last_exit is not None
    assert component.last_exit["code"] == 1
    assert component.last_exit["signal"] is None


def test_a_component_that_cannot_be_spawned_stays_in_back_off(clock: Clock) -> None:
    class Unstartable(FakeProcess):
        def restart(self) -> object:
            raise OSError("Resource temporarily unavailable")

    process = Unstartable()
    component = Supervised(process, BackOff(initial=1, cap=30, stable_after=60), clock=clock)
    process.exit_code = 1
    component.tick()
    clock.now = component.restart_at
    assert component.tick()
    assert component.state == BACKOFF
    assert component.restart_at == clock.now + 2
    assert component.restarts == 0


def test_exits_read_as_people_say_them() -> None:
    assert describe_exit(0) == "exit code 0"
    assert describe_exit(2) == "exit code 2"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-signal.SIGTERM) == "killed by SIGTERM"


def test_the_status_table_says_which_component_restarted_and_why() -> None:
    now = 1_800_000_000.0
    table = status_table(
        [
            {"name": "kube-apiserver", "pid": None, "state": RUNNING, "restarts": 0, "started_at": now - 600},
            {
                "name": "kvc-controller",
                "pid": None,
                "state": RUNNING,
                "restarts": 1,
                "last_exit": {"code": None, "signal": "SIGKILL", "at": now - 45, "ran_for": 300},
                "started_at": now - 44,
            },
            {
                "name": "kvc-webhook",
                "pid": None,
                "state": BACKOFF,
                "restarts": 3,
                "last_exit": {"code": 1, "signal": None, "at": now - 2, "ran_for": 1},
                "started_at": now - 3,
                "restart_at": now + 6,
            },
        ],
        now,
    )
    assert table.splitlines() == [
        "NAME             PID   STATUS                    RESTARTS   LAST EXIT              AGE",
        "kube-apiserver   -     Running                   0          -                      10m",
        "kvc-controller   -     Running                   1          SIGKILL (45s ago)      44s",
        "kvc-webhook      -     BackOff (restart in 6s)   3          exit code 1 (2s ago)   -",
    ]
