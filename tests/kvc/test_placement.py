from __future__ import annotations

import random

import pytest

from kvc.placement import NodeInfo, VolumeRequest, affinity_matches, ineligibility, meet, place, tolerates

GIB = 1 << 30


def nodes(count: int, **fields: object) -> list[NodeInfo]:
    return [NodeInfo(name=f"node-{i:04d}", **fields) for i in range(count)]  # type: ignore[arg-type]


def affinity(*expressions: dict[str, object]) -> dict[str, object]:
    return {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": list(expressions)}]
        }
    }


def test_spreads_over_the_least_loaded_nodes_deterministically() -> None:
    cluster = [
        NodeInfo("a", replicas=3),
        NodeInfo("b", replicas=0, assigned_bytes=5),
        NodeInfo("c", replicas=0, assigned_bytes=1),
        NodeInfo("d", replicas=1),
    ]
    result = place(VolumeRequest(replicas=2), cluster)
    assert result.nodes == ("c", "b")
    assert result.shortfall == 0
    assert place(VolumeRequest(replicas=2), list(reversed(cluster))).nodes == ("c", "b")


def test_nodes_that_already_hold_the_data_come_first() -> None:
    cluster = [NodeInfo("a", replicas=0), NodeInfo("b", replicas=9)]
    assert place(VolumeRequest(replicas=1), cluster, holding=["b"]).nodes == ("b",)


def test_healthy_current_assignments_are_kept() -> None:
    cluster = nodes(4)
    result = place(VolumeRequest(replicas=2), cluster, current=["node-0003"])
    assert result.nodes == ("node-0003", "node-0000")
    assert result.added == ("node-0000",)
    # Fewer replicas wanted: keep a prefix of the current ones, add nothing.
    assert place(VolumeRequest(replicas=1), cluster, current=["node-0003", "node-0001"]).nodes == ("node-0003",)


def test_a_current_node_that_vanished_is_replaced() -> None:
    result = place(VolumeRequest(replicas=1), nodes(2), current=["gone"])
    assert result.nodes == ("node-0000",)


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        (NodeInfo("n", ready=False), "not Ready"),
        (NodeInfo("n", agent_alive=False), "without a live KVC agent"),
        (NodeInfo("n", taints=[{"key": "gpu", "effect": "NoSchedule"}]), "with untolerated taints"),
        (NodeInfo("n", taints=[{"key": "x", "effect": "NoExecute"}]), "with untolerated taints"),
        (NodeInfo("n", free_bytes=GIB), "short of free disk"),
        (NodeInfo("n", labels={"zone": "b"}), "not matching nodeAffinity"),
    ],
)
def test_ineligible_nodes_are_skipped_with_a_reason(node: NodeInfo, reason: str) -> None:
    request = VolumeRequest(
        replicas=1, capacity_bytes=2 * GIB, node_affinity=affinity({"key": "zone", "operator": "In", "values": ["a"]})
    )
    if reason != "not matching nodeAffinity":
        node = NodeInfo(**{**node.__dict__, "labels": {"zone": "a"}})
    assert ineligibility(node, request) == reason
    result = place(request, [node])
    assert result.shortfall == 1
    assert result.reasons == {reason: 1}


def test_prefer_no_schedule_taints_do_not_block() -> None:
    assert ineligibility(NodeInfo("n", taints=[{"key": "k", "effect": "PreferNoSchedule"}]), VolumeRequest(1)) is None


def test_unknown_free_disk_does_not_block() -> None:
    assert ineligibility(NodeInfo("n", free_bytes=None), VolumeRequest(1, capacity_bytes=GIB)) is None


@pytest.mark.parametrize(
    ("toleration", "taint", "tolerated"),
    [
        ({"key": "gpu", "operator": "Exists"}, {"key": "gpu", "value": "a100", "effect": "NoSchedule"}, True),
        ({"operator": "Exists"}, {"key": "anything", "effect": "NoExecute"}, True),
        ({"key": "gpu", "value": "a100"}, {"key": "gpu", "value": "a100", "effect": "NoSchedule"}, True),
        ({"key": "gpu", "value": "v100"}, {"key": "gpu", "value": "a100", "effect": "NoSchedule"}, False),
        ({"key": "gpu", "operator": "Exists", "effect": "NoExecute"}, {"key": "gpu", "effect": "NoSchedule"}, False),
        ({"key": "other", "operator": "Exists"}, {"key": "gpu", "effect": "NoSchedule"}, False),
    ],
)
def test_tolerations_follow_kubernetes_rules(
    toleration: dict[str, str], taint: dict[str, str], tolerated: bool
) -> None:
    assert tolerates([toleration], taint) is tolerated


@pytest.mark.parametrize(
    ("expression", "labels", "matches"),
    [
        ({"key": "zone", "operator": "In", "values": ["a", "b"]}, {"zone": "b"}, True),
        ({"key": "zone", "operator": "In", "values": ["a"]}, {}, False),
        ({"key": "zone", "operator": "NotIn", "values": ["a"]}, {}, True),
        ({"key": "zone", "operator": "NotIn", "values": ["a"]}, {"zone": "a"}, False),
        ({"key": "ssd", "operator": "Exists"}, {"ssd": ""}, True),
        ({"key": "ssd", "operator": "DoesNotExist"}, {"ssd": ""}, False),
        ({"key": "cores", "operator": "Gt", "values": ["8"]}, {"cores": "16"}, True),
        ({"key": "cores", "operator": "Lt", "values": ["8"]}, {"cores": "16"}, False),
        ({"key": "cores", "operator": "Gt", "values": ["8"]}, {"cores": "many"}, False),
    ],
)
def test_node_affinity_expressions(expression: dict[str, object], labels: dict[str, str], matches: bool) -> None:
    assert affinity_matches(affinity(expression), NodeInfo("n", labels=labels)) is matches


def test_affinity_terms_are_ored_and_fields_match_the_node_name() -> None:
    terms = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["special"]}]},
            ]
        }
    }
    assert affinity_matches(terms, NodeInfo("x", labels={"zone": "a"}))
    assert affinity_matches(terms, NodeInfo("special"))
    assert not affinity_matches(terms, NodeInfo("other", labels={"zone": "b"}))


def test_preferred_terms_rank_nodes() -> None:
    node_affinity = {
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 50, "preference": {"matchExpressions": [{"key": "ssd", "operator": "Exists"}]}}
        ]
    }
    cluster = [NodeInfo("a"), NodeInfo("b", labels={"ssd": "true"})]
    assert place(VolumeRequest(replicas=1, node_affinity=node_affinity), cluster).nodes == ("b",)


def test_shortfall_message_names_the_reasons() -> None:
    cluster = [NodeInfo("a"), NodeInfo("b", ready=False), NodeInfo("c", agent_alive=False)]
    result = place(VolumeRequest(replicas=3), cluster)
    assert result.nodes == ("a",)
    assert result.shortfall_message(3) == (
        "only 1 of 3 replicas can be placed: 1 eligible nodes; other nodes are 1 not Ready, 1 without a live KVC agent"
    )


def test_five_thousand_nodes() -> None:
    rng = random.Random(42)
    cluster = [
        NodeInfo(
            f"node-{i:05d}",
            labels={"zone": f"z{i % 5}"},
            ready=rng.random() > 0.05,
            free_bytes=rng.randrange(0, 100) * GIB,
            replicas=rng.randrange(0, 10),
            taints=[{"key": "gpu", "effect": "NoSchedule"}] if i % 7 == 0 else [],
        )
        for i in range(5000)
    ]
    request = VolumeRequest(
        replicas=20,
        capacity_bytes=50 * GIB,
        node_affinity=affinity({"key": "zone", "operator": "In", "values": ["z1", "z2"]}),
    )
    result = place(request, cluster)
    assert len(result.nodes) == 20
    assert result.shortfall == 0
    chosen = [n for n in cluster if n.name in result.nodes]
    assert all(ineligibility(n, request) is None for n in chosen)
    # Spread: nobody eligible has fewer replicas than the busiest chosen node.
    busiest = max(n.replicas for n in chosen)
    eligible = [n for n in cluster if ineligibility(n, request) is None and n.name not in result.nodes]
    assert all(n.replicas >= busiest for n in eligible)
    assert place(request, list(reversed(cluster))).nodes == result.nodes


def test_a_move_adds_the_meeting_node_and_keeps_every_other_replica_while_the_wish_stands() -> None:
    cluster = [NodeInfo(f"node-{i}") for i in range(4)]
    request = VolumeRequest(replicas=2)
    # Not there yet: the meeting node comes on top of the two replicas, which both stay.
    moving, problem = meet(request, cluster, ["node-2", "node-3"], "node-0")
    assert problem is None
    assert moving.nodes == ("node-2", "node-3", "node-0")
    assert moving.added == ("node-0",)
    # Assigned (fetching or Ready): nothing is dropped while the wish stands.
    staying, _ = meet(request, cluster, ["node-2", "node-3", "node-0"], "node-0")
    assert set(staying.nodes) == {"node-0", "node-2", "node-3"}
    assert staying.added == ()
    # The wish gone, place() keeps the first `replicas` of the current nodes, in the order given.
    after = place(request, cluster, current=["node-0", "node-3", "node-2"])
    assert after.nodes == ("node-0", "node-3")


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (NodeInfo("full", replicas=2), "full (--max-replicas-per-node=2)"),
        (NodeInfo("small", free_bytes=10), "short of free disk"),
        (NodeInfo("tainted", taints=[{"key": "gpu", "effect": "NoSchedule"}]), "with untolerated taints"),
    ],
)
def test_a_move_never_puts_a_replica_where_it_may_not_go(target: NodeInfo, reason: str) -> None:
    request = VolumeRequest(replicas=1, capacity_bytes=100, max_node_replicas=2)
    placement, problem = meet(request, [NodeInfo("home"), target], ["home"], target.name)
    assert placement.nodes == ("home",)
    assert problem == f"node {target.name} cannot take a replica: it is {reason}"
    gone, problem = meet(request, [NodeInfo("home")], ["home"], "elsewhere")
    assert gone.nodes == ("home",)
    assert problem == "node elsewhere cannot take a replica: it is not a schedulable node"
