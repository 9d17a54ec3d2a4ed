"""The agent's bookkeeping of its replicas, without an API server: paths, retries, settings changes."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import wait
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import urllib3

from kvc.agent import agent as agent_module
from kvc.agent.agent import RETRY_BASE_SECONDS, Agent
from kvc.agent.files import Manifest, ManifestFile, ReplicaDir
from kvc.api.models import VolumeConfig, VolumeStatus
from kvc.sources.base import FetchRequest, Source, SourceContext
from kvc.sources.registry import SourceRegistry
from kvc.sources.transfer import FetchError
from tests.fakeclock import FakeClock


class Copies(Source):
    """A node-local source that writes one file holding its ``content`` option."""

    source_type = "Fake"
    access_modes: ClassVar[frozenset[str]] = frozenset({"ReadOnlyMany"})
    node_local = True

    def validate_options(self, config: VolumeConfig) -> list[str]:
        return []

    def provision(self, ctx: SourceContext, config: VolumeConfig) -> VolumeStatus:
        raise NotImplementedError

    def fetch(self, request: FetchRequest) -> Manifest:
        content = request.options.get("content", "").encode()
        with request.replica.tree(request.limits.budget(request.replica.staging)) as tree:
            tree.file("data.txt").write_bytes(content)
        request.progress.add(len(content))
        manifest = Manifest(source="fake", files=[ManifestFile("data.txt", len(content))])
        request.replica.publish(manifest)
        return manifest


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock(time.monotonic())
    # Only the agent module sees the fake clock.
    monkeypatch.setattr(agent_module, "time", SimpleNamespace(monotonic=fake))
    return fake


def make_agent(tmp_path: Path, min_free_disk: int = 0) -> Agent:
    agent = Agent(
        "node-1",
        tmp_path / "root",
        None,
        extra_roots={"/data/kvc": tmp_path / "extra"},
        registry=SourceRegistry({"Fake": Copies()}),
        min_free_disk=min_free_disk,
    )
    agent.data_root.mkdir(parents=True)
    return agent


def spec(path: str, content: str = "v1") -> dict[str, Any]:
    return {"name": "ns.vm.d-abc", "sourceType": "Fake", "path": path, "options": {"content": content}}


def settle(agent: Agent, desired: dict[str, dict[str, Any]]) -> None:
    """Sync until no fetch is running."""
    agent._desired = desired
    for _ in range(100):
        agent._sync()
        if all(r.future is None for r in agent._replicas.values()):
            return
        threading.Event().wait(0.01)
    raise AssertionError("the agent did not settle")


def test_a_path_outside_the_data_roots_fails_and_is_retried_with_backoff(tmp_path: Path, clock: FakeClock) -> None:
    agent = make_agent(tmp_path)
    settle(agent, {"ns.vm.d-abc": spec("/mnt/elsewhere/ns/vm/d-abc")})
    replica = agent._replicas["ns.vm.d-abc"]
    assert replica.phase == "Failed"
    assert "outside this node's data roots" in replica.message
    assert f"retrying in {RETRY_BASE_SECONDS:.0f}s" in replica.message
    # The admin maps the root (e.g. the agent's configuration is reloaded): the next attempt works.
    agent.roots[PurePosixPath("/mnt/elsewhere")] = tmp_path / "elsewhere"
    settle(agent, agent._desired or {})
    assert replica.phase == "Failed"  # not before the backoff expired
    clock.now += RETRY_BASE_SECONDS
    settle(agent, agent._desired or {})
    settle(agent, agent._desired or {})
    assert replica.phase == "Ready", replica.message
    assert (tmp_path / "elsewhere" / "ns" / "vm" / "d-abc" / "data.txt").read_text() == "v1"


def test_a_replica_moved_to_another_path_is_fetched_there_and_the_old_data_deleted(
    tmp_path: Path, clock: FakeClock
) -> None:
    agent = make_agent(tmp_path)
    settle(agent, {"ns.vm.d-abc": spec("/var/lib/kvc/ns/vm/d-abc")})
    settle(agent, agent._desired or {})
    old = tmp_path / "root" / "ns" / "vm" / "d-abc"
    assert (old / "data.txt").read_text() == "v1"
    settle(agent, {"ns.vm.d-abc": spec("/data/kvc/ns/vm/d-abc")})
    settle(agent, agent._desired or {})
    assert not old.exists()
    assert (tmp_path / "extra" / "ns" / "vm" / "d-abc" / "data.txt").read_text() == "v1"
    assert agent._replicas["ns.vm.d-abc"].phase == "Ready"


def test_changed_options_are_fetched_again_in_place(tmp_path: Path, clock: FakeClock) -> None:
    agent = make_agent(tmp_path)
    settle(agent, {"ns.vm.d-abc": spec("/var/lib/kvc/ns/vm/d-abc")})
    settle(agent, agent._desired or {})
    settle(agent, {"ns.vm.d-abc": spec("/var/lib/kvc/ns/vm/d-abc", content="v2")})
    settle(agent, agent._desired or {})
    assert (tmp_path / "root" / "ns" / "vm" / "d-abc" / "data.txt").read_text() == "v2"
    assert agent._replicas["ns.vm.d-abc"].phase == "Ready"


class Unreachable:
    """An API whose server is down: every call fails to connect."""

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise urllib3.exceptions.MaxRetryError(None, "/apis", "connection refused")  # type: ignore[arg-type]

        return call


def test_an_api_server_outage_does_not_stop_the_agent(tmp_path: Path) -> None:
    agent = make_agent(tmp_path)
    agent.custom = Unreachable()
    agent._report()  # logged, retried at the next heartbeat
    stop = threading.Event()
    runner = threading.Thread(target=agent.run, args=(stop,))
    runner.start()
    threading.Event().wait(0.3)
    assert runner.is_alive()  # still trying to register its VolumeNode
    stop.set()
    runner.join(timeout=10)
    assert not runner.is_alive()


class SlowCopies(Copies):
    """Writes part of the data, then waits for ``release`` and writes more, as a fetch
    that notices a stop only between two files does."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def fetch(self, request: FetchRequest) -> Manifest:
        staging = request.replica.prepare()
        (staging / "first.bin").write_bytes(b"1")
        self.started.set()
        self.release.wait(10)
        (staging / "later").mkdir(parents=True, exist_ok=True)
        (staging / "later" / "second.bin").write_bytes(b"2")
        raise FetchError("stopped")


def test_a_replica_unassigned_mid_fetch_is_deleted_once_the_fetch_has_stopped(tmp_path: Path) -> None:
    slow = SlowCopies()
    agent = make_agent(tmp_path)
    agent.registry = SourceRegistry({"Fake": slow})
    agent._desired = {"ns.vm.d-abc": spec("/var/lib/kvc/ns/vm/d-abc")}
    agent._sync()
    assert slow.started.wait(10)
    staging = tmp_path / "root" / "ns" / "vm" / "d-abc.partial"
    agent._desired = {}
    agent._sync()
    fetch = agent._retiring["ns.vm.d-abc"].future
    assert fetch is not None
    assert staging.is_dir()  # not deleted under a fetch that still writes
    slow.release.set()
    wait([fetch])  # the fetch stops...
    agent._sync()  # ...and what it wrote meanwhile goes too
    assert not staging.exists()
    assert not (tmp_path / "root" / "ns").exists()


def test_a_half_fetched_replica_unassigned_while_the_agent_was_down_is_deleted(tmp_path: Path) -> None:
    slow = SlowCopies()
    slow.release.set()
    agent = make_agent(tmp_path)
    agent.registry = SourceRegistry({"Fake": slow})
    settle(agent, {"ns.vm.d-abc": spec("/var/lib/kvc/ns/vm/d-abc")})
    staging = tmp_path / "root" / "ns" / "vm" / "d-abc.partial"
    assert staging.is_dir()  # killed here: nothing published, the staging directory stays
    restarted = Agent("node-1", tmp_path / "root", None, registry=SourceRegistry({"Fake": Copies()}))
    other = {**spec("/var/lib/kvc/ns/vm/other-abc"), "name": "ns.vm.other-abc"}
    settle(restarted, {"ns.vm.other-abc": other})
    assert not staging.exists()
    assert (tmp_path / "root" / "ns" / "vm" / "other-abc" / "data.txt").is_file()


@pytest.mark.parametrize(
    ("capacity", "min_free_disk", "message"),
    [
        ("3", 0, r"writing data\.txt would take the volume's data past its capacity \(3 bytes\)"),
        ("1Ki", 1 << 60, r"the node's free disk is down to .* \(--min-free-disk\): stopped writing"),
    ],
    ids=["capacity", "free-disk-floor"],
)
def test_the_capacity_and_the_free_disk_floor_bound_a_fetch_and_its_status_says_so(
    tmp_path: Path, capacity: str, min_free_disk: int, message: str
) -> None:
    agent = make_agent(tmp_path, min_free_disk=min_free_disk)
    settle(agent, {"ns.vm.d-abc": {**spec("/var/lib/kvc/ns/vm/d-abc", "more than three"), "capacity": capacity}})
    (report,) = [r.report() for r in agent._replicas.values()]
    assert report["phase"] == "Failed"
    assert re.search(message, report["message"]), report["message"]


def test_a_failure_message_reported_in_the_volumenode_is_bounded(tmp_path: Path) -> None:
    """A source's error text (a server's answer, a key) cannot grow the node's status object."""
    agent = make_agent(tmp_path)
    settle(agent, {"ns.vm.d-abc": spec("/mnt/" + "x" * 100_000)})
    (report,) = [r.report() for r in agent._replicas.values()]
    assert report["phase"] == "Failed"
    assert len(report["message"]) == agent_module.MAX_MESSAGE_CHARS
    assert report["message"].startswith("replica path /mnt/xxx")
    assert report["message"].endswith("…")


def test_a_replica_that_cannot_be_deleted_never_stops_the_agent_and_is_deleted_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = make_agent(tmp_path)
    other = {**spec("/var/lib/kvc/ns/vm/other-abc"), "name": "ns.vm.other-abc"}
    settle(agent, {"ns.vm.d-abc": spec("/var/lib/kvc/ns/vm/d-abc"), "ns.vm.other-abc": other})
    settle(agent, agent._desired or {})
    final = tmp_path / "root" / "ns" / "vm" / "d-abc"
    assert (final / "data.txt").is_file()

    def too_deep(self: ReplicaDir) -> None:  # as shutil.rmtree did on a tree deeper than the recursion limit
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(ReplicaDir, "remove", too_deep)
    settle(agent, {"ns.vm.other-abc": other})  # unassigned: its deletion fails, the loop goes on
    assert final.exists()
    assert agent._replicas["ns.vm.other-abc"].phase == "Ready"
    monkeypatch.undo()
    agent._sync()  # deleted on a later pass
    assert not final.exists()
