"""The fault plan is a pure function of the seed: replayable, complete and well-formed."""

from __future__ import annotations

import itertools

import pytest

from e2e.faults import chaos

NODES = ("n1", "n2", "n3", "n4", "n5")


@pytest.mark.parametrize("seed", [1, 2, 101, 4242])
def test_a_plan_is_the_same_for_the_same_seed_and_has_everything_the_suite_promises(seed: int) -> None:
    plan = chaos.make_plan(seed, NODES)
    assert plan == chaos.make_plan(seed, NODES)
    assert len(plan.volumes) == 20
    assert len({v.name for v in plan.volumes}) == 20
    assert {v.kind for v in plan.volumes} == {chaos.S3, chaos.NFS, chaos.HTTP}
    assert all(1 <= v.replicas <= 2 for v in plan.volumes)
    assert sum(v.deleted_at is not None for v in plan.volumes) == 3
    assert all(v.deleted_at is None or v.deleted_at > v.created_at for v in plan.volumes)
    assert len(plan.pods) == 100
    assert {f.kind for f in plan.faults} == set(chaos.KINDS)
    assert all(0 < f.at < plan.duration for f in plan.faults)
    (removed,) = plan.removed_nodes
    assert all(f.target != removed for f in plan.faults if f.kind == chaos.KILL_AGENT)


@pytest.mark.parametrize("seed", range(20))
def test_outages_of_one_component_never_overlap(seed: int) -> None:
    plan = chaos.make_plan(seed, NODES)
    by_component = itertools.groupby(
        sorted(plan.faults, key=lambda f: (f.kind, f.target, f.at)), key=lambda f: (f.kind, f.target)
    )
    for _, faults in by_component:
        ordered = list(faults)
        for first, second in itertools.pairwise(ordered):
            assert first.at + first.down < second.at, (first, second)


def test_pods_ask_for_volumes_that_exist_by_then() -> None:
    plan = chaos.make_plan(7, NODES)
    created = {v.name: v.created_at for v in plan.volumes}
    for pod in plan.pods:
        assert all(created[name] <= pod.at for name in pod.volumes), pod
        assert pod.annotation.count(",") == len(pod.volumes) - 1


def test_seeds_change_the_plan_and_the_data() -> None:
    assert chaos.make_plan(1, NODES) != chaos.make_plan(2, NODES)
    assert chaos.file_bytes(1, "v", "a", 64) == chaos.file_bytes(1, "v", "a", 64)
    assert chaos.file_bytes(1, "v", "a", 64) != chaos.file_bytes(2, "v", "a", 64)
    assert len(chaos.file_bytes(1, "v", "a", 1000)) == 1000
