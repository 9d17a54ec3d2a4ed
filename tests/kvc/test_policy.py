from __future__ import annotations

import json
from typing import Any

import pytest

from kvc.placement import NodeInfo, VolumeRequest, place
from kvc.policy import (
    DEFAULT_MAX_REPLICAS_PER_NODE,
    ETCD_REQUEST_BYTES,
    MAX_COPIED_OPTIONS_BYTES,
    MAX_ENTRY_BYTES,
    AdminPolicy,
    NfsExport,
    TolerationRule,
    copied_options_problem,
    describe_toleration,
    nfs_path_problem,
    stored_bytes,
)

CONTROL_PLANE = {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}
EVERYTHING = {"operator": "Exists"}


# --------------------------------------------------------------------------- tolerations


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("dedicated", TolerationRule("dedicated")),
        ("dedicated=data", TolerationRule("dedicated", "data")),
        ("dedicated=data:NoSchedule", TolerationRule("dedicated", "data", "NoSchedule")),
        ("nvidia.com/gpu:NoSchedule", TolerationRule("nvidia.com/gpu", None, "NoSchedule")),
        ("dedicated=", TolerationRule("dedicated", "")),
        ("*", TolerationRule("*")),
        ("*:NoExecute", TolerationRule("*", None, "NoExecute")),
    ],
)
def test_toleration_rules_parse_and_print_as_written(text: str, rule: TolerationRule) -> None:
    assert TolerationRule.parse(text) == rule
    assert str(rule) == text


@pytest.mark.parametrize("text", ["", "=x", ":NoSchedule", "gpu:NoRun", "*=x", "gpu x"])
def test_malformed_toleration_rules_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"KEY|effect|value"):
        TolerationRule.parse(text)


@pytest.mark.parametrize(
    ("rule", "toleration", "covered"),
    [
        ("dedicated", {"key": "dedicated", "operator": "Exists"}, True),
        ("dedicated", {"key": "dedicated", "value": "x", "effect": "NoExecute"}, True),
        ("dedicated", {"key": "other", "operator": "Exists"}, False),
        # Only * covers the empty key, which tolerates every taint.
        ("dedicated", EVERYTHING, False),
        ("*", EVERYTHING, True),
        ("*:NoSchedule", {"operator": "Exists", "effect": "NoSchedule"}, True),
        ("*:NoSchedule", EVERYTHING, False),
        # A value: only Equal with it (Exists tolerates any value).
        ("dedicated=data", {"key": "dedicated", "value": "data"}, True),
        ("dedicated=data", {"key": "dedicated", "operator": "Equal", "value": "other"}, False),
        ("dedicated=data", {"key": "dedicated", "operator": "Exists"}, False),
        # An effect: only that one (an empty effect tolerates every effect).
        ("dedicated:NoSchedule", {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}, True),
        ("dedicated:NoSchedule", {"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}, False),
        ("dedicated:NoSchedule", {"key": "dedicated", "operator": "Exists"}, False),
    ],
)
def test_what_a_rule_covers(rule: str, toleration: dict[str, Any], covered: bool) -> None:
    assert TolerationRule.parse(rule).covers(toleration) is covered


def test_by_default_no_toleration_is_allowed_and_the_message_names_the_flag() -> None:
    policy = AdminPolicy()
    everything = policy.toleration_problem([EVERYTHING])
    assert everything == (
        "tolerations[0] tolerates every taint (*: operator Exists without a key): the cluster admin lets "
        "replicas onto tainted nodes only with the controller flag --allowed-toleration (allowed now: none)"
    )
    control_plane = policy.toleration_problem([{"key": "gpu", "operator": "Exists"}, CONTROL_PLANE])
    assert control_plane is not None
    assert control_plane.startswith("tolerations[0] gpu is not allowed:")
    assert policy.toleration_problem([]) is None
    # PreferNoSchedule taints never keep replicas off a node: tolerating them changes nothing.
    assert policy.toleration_problem([{"key": "x", "operator": "Exists", "effect": "PreferNoSchedule"}]) is None


def test_an_allowed_pool_opens_that_pool_only() -> None:
    policy = AdminPolicy(tolerations=(TolerationRule.parse("dedicated=data:NoSchedule"),))
    assert policy.toleration_problem([{"key": "dedicated", "value": "data", "effect": "NoSchedule"}]) is None
    refused = policy.toleration_problem([CONTROL_PLANE])
    assert refused == (
        "tolerations[0] node-role.kubernetes.io/control-plane:NoSchedule is not allowed: the cluster admin lets "
        "replicas onto tainted nodes only with the controller flag --allowed-toleration "
        "(allowed now: dedicated=data:NoSchedule)"
    )
    assert policy.toleration_problem([EVERYTHING]) is not None


def test_a_refused_toleration_is_shown_as_the_flag_would_allow_it() -> None:
    for toleration in (CONTROL_PLANE, EVERYTHING, {"key": "a", "value": "b", "effect": "NoExecute"}):
        assert TolerationRule.parse(describe_toleration(toleration)).covers(toleration)


# --------------------------------------------------------------------------- NFS


@pytest.mark.parametrize(
    ("text", "export"),
    [
        ("nfs.example.com", NfsExport("nfs.example.com")),
        ("NFS.Example.com:/exports", NfsExport("nfs.example.com", "/exports")),
        ("10.0.0.5:/exports/", NfsExport("10.0.0.5", "/exports")),
        ("[fd00::5]:/srv", NfsExport("[fd00::5]", "/srv")),
        ("*", NfsExport("*")),
        ("*:/", NfsExport("*", "/")),
    ],
)
def test_nfs_rules_parse(text: str, export: NfsExport) -> None:
    assert NfsExport.parse(text) == export


@pytest.mark.parametrize("text", ["", ":/exports", "nfs:/exports/../etc", "nfs://x", "nfs:/a//b", "a b"])
def test_malformed_nfs_rules_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"SERVER|prefix"):
        NfsExport.parse(text)


@pytest.mark.parametrize(
    ("rule", "server", "path", "covered"),
    [
        ("nfs.example.com", "nfs.example.com", "/anything", True),
        ("nfs.example.com", "NFS.example.COM", "/anything", True),
        ("nfs.example.com", "nfs.example.com.evil.org", "/x", False),
        ("nfs.example.com:/exports", "nfs.example.com", "/exports", True),
        ("nfs.example.com:/exports", "nfs.example.com", "/exports/", True),
        ("nfs.example.com:/exports", "nfs.example.com", "/exports/a/b", True),
        # Whole components: /exportsX is not under /exports.
        ("nfs.example.com:/exports", "nfs.example.com", "/exportsX", False),
        ("nfs.example.com:/exports", "nfs.example.com", "/exports/../etc", False),
        ("nfs.example.com:/exports", "nfs.example.com", "/etc", False),
        ("nfs.example.com:/exports", "other.example.com", "/exports/a", False),
        ("*", "anything.example.org", "/", True),
        ("*:/exports", "anything.example.org", "/exports/a", True),
    ],
)
def test_what_an_nfs_rule_covers(rule: str, server: str, path: str, covered: bool) -> None:
    assert NfsExport.parse(rule).covers(server, path) is covered


def test_by_default_no_nfs_server_is_allowed_and_the_message_names_the_flag() -> None:
    assert AdminPolicy().nfs_problem("nfs.example.com", "/exports/a") == (
        "NFS export nfs.example.com:/exports/a is not allowed: the cluster admin allows NFS servers and paths "
        "with the controller flag --allowed-nfs-server (allowed now: none)"
    )
    policy = AdminPolicy(nfs_exports=(NfsExport.parse("nfs.example.com:/exports"), NfsExport.parse("10.0.0.5")))
    assert policy.nfs_problem("nfs.example.com", "/exports/a") is None
    assert policy.nfs_problem("10.0.0.5", "/") is None
    refused = policy.nfs_problem("nfs.example.com", "/exportsX")
    assert refused is not None
    assert refused.endswith("(allowed now: nfs.example.com:/exports, 10.0.0.5)")


def test_dot_dot_in_an_nfs_path_is_refused_whatever_the_admin_allows() -> None:
    assert nfs_path_problem("/exports/a/../../etc") == "options.path must not contain '..': '/exports/a/../../etc'"
    assert nfs_path_problem("/exports/a..b/c") is None


# --------------------------------------------------------------------------- caps


def test_the_namespace_cap_names_the_flag() -> None:
    policy = AdminPolicy(max_replicas_per_namespace=4)
    assert policy.namespace_cap_problem("team-a", 2, 2) is None
    assert policy.namespace_cap_problem("team-a", 3, 2) == (
        "namespace team-a has 3 replicas of other volumes on nodes: 2 more would exceed the cluster admin's cap "
        "of 4 (controller flag --max-replicas-per-namespace); lower replicas or delete volumes no longer needed"
    )


def test_a_full_node_takes_no_new_replica_but_keeps_its_own() -> None:
    cluster = [NodeInfo("a", replicas=2), NodeInfo("b", replicas=1)]
    request = VolumeRequest(replicas=2, max_node_replicas=2)
    result = place(request, cluster)
    assert result.nodes == ("b",)
    assert result.shortfall_message(2) == (
        "only 1 of 2 replicas can be placed: 1 eligible nodes; other nodes are 1 full (--max-replicas-per-node=2)"
    )
    assert place(request, cluster, current=["a"]).nodes == ("a", "b")


def test_stored_bytes_is_an_upper_bound_of_the_api_servers_json() -> None:
    # Go's encoding/json: UTF-8 as is (up to 4 bytes a character), <, > and & as \u003c.
    def go_json(value: Any) -> int:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        for char in "<>&":
            text = text.replace(char, "\\u00XX")
        return len(text.encode())

    for value in ({"k": "a<b&c>"}, {"k": "données"}, {"k": "\U0001f600" * 10}, {"k": "\x00\n\t"}, "plain"):
        assert stored_bytes(value) >= go_json(value)
    assert stored_bytes({"k": "<" * 10}) == len('{"k":""}') + 60


def test_copied_options_are_bounded() -> None:
    assert copied_options_problem({"url": "https://example.com/model"}) is None
    long = {"url": "https://example.com/" + "a" * MAX_COPIED_OPTIONS_BYTES, "sha256": "0" * 64}
    problem = copied_options_problem(long)
    assert problem is not None
    assert problem.startswith("the settings copied to every node holding the data (options.sha256, options.url) take")
    assert f"at most {MAX_COPIED_OPTIONS_BYTES} are allowed" in problem
    # What goes along (a chosen node path, a node's part of the data) counts too.
    half = {"url": "x" * (MAX_COPIED_OPTIONS_BYTES // 2)}
    assert copied_options_problem(half) is None
    assert copied_options_problem(half, ("/" + "p" * (MAX_COPIED_OPTIONS_BYTES // 2),)) is not None


def test_a_volumenode_at_the_default_cap_stays_far_below_etcds_limit() -> None:
    assert DEFAULT_MAX_REPLICAS_PER_NODE * MAX_ENTRY_BYTES <= ETCD_REQUEST_BYTES // 2
