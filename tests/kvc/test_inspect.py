from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from kvc.inspect import (
    DATASET_HEADERS,
    DatasetRow,
    HeartbeatUnreadable,
    Operator,
    Requirement,
    controller_heartbeat,
    dataset_rows,
    human_age,
    human_bytes,
    matches,
    parse_selector,
    progress_bar,
    render_table,
    status_report,
)

# --------------------------------------------------------------------------- sizes and bars


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (72_000_000, "72.0 MB"),
        (160_000_000, "160.0 MB"),
        (999_960, "1.0 MB"),  # rounds up into the next unit rather than showing 1000.0 kB
        (1_600_000_000, "1.6 GB"),
        (5 * 10**21, "5000.0 EB"),
    ],
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


@pytest.mark.parametrize(
    ("done", "total", "width", "bar"),
    [
        (72_000_000, 160_000_000, 20, "[#########-----------]  45%"),
        (0, 100, 10, "[----------]   0%"),
        (99, 100, 10, "[#########-]  99%"),  # never shows full before the last byte
        (159_999_999, 160_000_000, 20, "[###################-]  99%"),
        (100, 100, 10, "[##########] 100%"),
        (250, 100, 10, "[##########] 100%"),  # more than the total is clamped
        (-5, 100, 10, "[----------]   0%"),
        (0, 0, 4, "[####] 100%"),  # nothing to fetch
        (0, None, 4, "[....]    ?"),  # size not known yet
    ],
)
def test_progress_bar(done: int, total: int | None, width: int, bar: str) -> None:
    assert progress_bar(done, total, width) == bar


def test_progress_bars_have_one_width_whatever_the_progress() -> None:
    assert len({len(progress_bar(done, total)) for done, total in [(0, 1), (1, 2), (1, 1), (0, None)]}) == 1


def test_progress_bar_needs_a_width() -> None:
    with pytest.raises(ValueError, match="width of at least 1"):
        progress_bar(1, 2, 0)


def test_table_aligns_columns_without_trailing_spaces_or_control_characters() -> None:
    table = render_table(["ID", "MESSAGE"], [["cifar", "line one\nline two\x1b[31m"], ["a-much-longer-id", ""]])
    assert table.splitlines() == [
        "ID                 MESSAGE",
        "cifar              line one line two [31m",
        "a-much-longer-id",
    ]


# --------------------------------------------------------------------------- kvc status


def vm(status: dict[str, Any] | None, volume_configs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": "datasets", "namespace": "team-a", "generation": 1},
        "spec": {"volumeConfigs": volume_configs or []},
    }
    if status is not None:
        obj["status"] = status
    return obj


S3_CONFIG = {"id": "cifar", "sourceType": "S3", "replicas": 2}
NFS_CONFIG = {"id": "shared", "sourceType": "NFS"}


def test_status_shows_the_state_then_each_volume_with_its_nodes_or_claim() -> None:
    report = status_report(
        vm(
            {
                "state": "Pending",
                "message": "cifar: 1/2 replicas ready, 232000000/320000000 bytes",
                "observedGeneration": 1,
                "volumes": [
                    {
                        "id": "cifar",
                        "sourceType": "S3",
                        "phase": "Provisioning",
                        "message": "1/2 replicas ready, 232000000/320000000 bytes",
                        "volumeSource": {"hostPath": {"path": "/var/lib/kvc/x", "type": "Directory"}},
                        "claimName": "datasets-cifar-1234",
                        "persistentVolumeName": "kvc-team-a-datasets-cifar-1234",
                        "replicas": {"desired": 2, "ready": 1},
                        "nodes": [
                            {"name": "node-1", "phase": "Ready", "bytes": 160_000_000, "totalBytes": 160_000_000},
                            {
                                "name": "node-22",
                                "phase": "Downloading",
                                "bytes": 72_000_000,
                                "totalBytes": 160_000_000,
                                "message": "downloading",
                            },
                        ],
                    },
                    {
                        "id": "shared",
                        "sourceType": "NFS",
                        "phase": "Ready",
                        "message": "claim datasets-shared bound to nfs:/x",
                        "claimName": "datasets-shared",
                        "persistentVolumeName": "kvc-team-a-datasets-shared",
                    },
                ],
            },
            [S3_CONFIG, NFS_CONFIG],
        )
    )
    assert report.splitlines() == [
        "VolumeManager datasets in namespace team-a",
        "State:    Pending",
        "Message:  cifar: 1/2 replicas ready, 232000000/320000000 bytes",
        "",
        "ID       SOURCE   PHASE          REPLICAS   MESSAGE",
        "cifar    S3       Provisioning   1/2        1/2 replicas ready, 232000000/320000000 bytes",
        "    claim datasets-cifar-1234 (PersistentVolume kvc-team-a-datasets-cifar-1234)",
        "    node-1    [####################] 100%   160.0 MB / 160.0 MB   Ready",
        "    node-22   [#########-----------]  45%   72.0 MB / 160.0 MB    Downloading   downloading",
        "shared   NFS      Ready          -          claim datasets-shared bound to nfs:/x",
        "    claim datasets-shared (PersistentVolume kvc-team-a-datasets-shared)",
    ]


def test_a_volumemanager_the_controller_has_not_seen_lists_its_spec_volumes() -> None:
    lines = status_report(vm(None, [S3_CONFIG])).splitlines()
    assert lines[1] == "State:    not reported yet (is the KVC controller running?)"
    assert lines[-1].split() == ["cifar", "S3", "-", "-", "not", "reported", "yet"]


def test_a_status_older_than_the_spec_says_so() -> None:
    obj = vm({"state": "Running", "message": "ok", "observedGeneration": 1, "volumes": []}, [S3_CONFIG])
    obj["metadata"]["generation"] = 2
    assert "this status describes generation 1; the spec is at generation 2" in status_report(obj)


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        # Missing byte counts, as before the agent's first report.
        ({"name": "n", "phase": "Pending"}, ["n", "[....................]", "?", "0", "B", "/", "?", "Pending"]),
        # Zero totalBytes while fetching: size unknown, not 100%.
        (
            {"name": "n", "phase": "Downloading", "bytes": 0, "totalBytes": 0},
            ["n", "[....................]", "?", "0", "B", "/", "?", "Downloading"],
        ),
        # Zero totalBytes once Ready: an empty data set, complete.
        (
            {"name": "n", "phase": "Ready", "bytes": 0, "totalBytes": 0},
            ["n", "[####################]", "100%", "0", "B", "/", "0", "B", "Ready"],
        ),
        # Garbage where numbers belong, an unknown phase, no name.
        (
            {"phase": "Hibernating", "bytes": "lots", "totalBytes": [1]},
            ["-", "[....................]", "?", "0", "B", "/", "?", "Hibernating"],
        ),
        (
            {"name": "n", "phase": "Failed", "bytes": 5, "totalBytes": "10", "message": "access denied"},
            ["n", "[##########----------]", "50%", "5", "B", "/", "10", "B", "Failed", "access", "denied"],
        ),
    ],
)
def test_node_lines_survive_missing_and_odd_fields(node: dict[str, Any], expected: list[str]) -> None:
    volume = {"id": "cifar", "phase": "Weird", "nodes": [node]}
    lines = status_report(vm({"state": "Pending", "volumes": [volume]}, [S3_CONFIG])).splitlines()
    assert lines[-2].split()[:3] == ["cifar", "S3", "Weird"]  # an unknown phase is shown as it is
    assert lines[-1].split() == expected


def test_a_node_local_volume_without_nodes_says_none_holds_it() -> None:
    volume = {"id": "cifar", "phase": "Pending", "message": "no eligible node", "nodes": []}
    report = status_report(vm({"state": "Pending", "volumes": [volume]}, [S3_CONFIG]))
    assert report.splitlines()[-1] == "    no node holds or is fetching this data yet"


def test_a_failed_volume_without_nodes_or_claim_shows_only_its_message() -> None:
    volume = {"id": "cifar", "phase": "Failed", "message": "options.sourceURL is required"}
    lines = status_report(vm({"state": "Failed", "volumes": [volume]}, [S3_CONFIG])).splitlines()
    assert lines[-1].split() == ["cifar", "S3", "Failed", "-", "options.sourceURL", "is", "required"]


def test_malformed_status_entries_do_not_break_the_report() -> None:
    status = {"state": "Running", "volumes": ["not a mapping", {"id": "cifar", "phase": "Ready", "replicas": 3}]}
    lines = status_report(vm(status, [S3_CONFIG])).splitlines()
    assert lines[-1].split()[:4] == ["cifar", "S3", "Ready", "-"]


def test_an_object_without_spec_or_status_still_renders() -> None:
    assert status_report({}).splitlines() == [
        "VolumeManager - in namespace -",
        "State:    not reported yet (is the KVC controller running?)",
    ]


# --------------------------------------------------------------------------- the controller's heartbeat

NOW = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def lease(
    renewed_ago: float | None, started_ago: float | None = 125, transitions: object = 2, **spec: Any
) -> dict[str, Any]:
    def ago(seconds: float) -> str:
        return (NOW - dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    fields: dict[str, Any] = {"holderIdentity": "kvc-controller-5f7d-abcde", "leaseDurationSeconds": 30}
    if renewed_ago is not None:
        fields["renewTime"] = ago(renewed_ago)
    if started_ago is not None:
        fields["acquireTime"] = ago(started_ago)
    fields["leaseTransitions"] = transitions
    return {"metadata": {"name": "kvc-controller", "namespace": "kvc-system"}, "spec": {**fields, **spec}}


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-3, "0s"),  # a clock ahead of the reader's
        (0, "0s"),
        (3.9, "3s"),
        (42.9, "42s"),
        (95, "95s"),
        (119, "119s"),
        (120, "2m"),
        (150, "2m30s"),
        (599, "9m59s"),
        (192, "3m12s"),
        (600, "10m"),
        (1500, "25m"),
        (3 * 3600 - 1, "179m"),
        (15000, "4h10m"),
        (5 * 3600 + 20 * 60, "5h20m"),
        (8 * 3600, "8h"),
        (47 * 3600 + 59 * 60, "47h"),
        (3 * 86400 + 4 * 3600, "3d4h"),
        (2 * 86400, "2d"),
        (3 * 86400, "3d"),
        (20 * 86400 + 7 * 3600, "20d"),
    ],
)
def test_human_age_reads_like_kubectl(seconds: float, text: str) -> None:
    assert human_age(seconds) == text


@pytest.mark.parametrize(
    ("heartbeat", "text"),
    [
        (
            lease(renewed_ago=3),
            "running (kvc-controller-5f7d-abcde, renewed 3s ago; started 2m5s ago; restarted 2 times)",
        ),
        (
            lease(renewed_ago=0, started_ago=0, transitions=1),
            "running (kvc-controller-5f7d-abcde, renewed 0s ago; started 0s ago; restarted 1 time)",
        ),
        (
            lease(renewed_ago=30, transitions=0),
            "running (kvc-controller-5f7d-abcde, renewed 30s ago; started 2m5s ago; restarted 0 times)",
        ),
        # The last renewal older than the Lease's duration: nobody renews it.
        (
            lease(renewed_ago=95),
            "NOT RENEWING - last renewed 95s ago by kvc-controller-5f7d-abcde: the controller may be down;"
            " this status may be stale",
        ),
        (
            lease(renewed_ago=31),
            "NOT RENEWING - last renewed 31s ago by kvc-controller-5f7d-abcde: the controller"
            " may be down; this status may be stale",
        ),
        # The duration is the Lease's own, not a constant of the reader.
        (
            lease(renewed_ago=4, leaseDurationSeconds=3),
            "NOT RENEWING - last renewed 4s ago by"
            " kvc-controller-5f7d-abcde: the controller may be down; this status may be stale",
        ),
        (
            lease(renewed_ago=None),
            "NOT RENEWING - never renewed by kvc-controller-5f7d-abcde: the controller may be"
            " down; this status may be stale",
        ),
        # Renewed "in the future": the controller's clock runs ahead of the API server's.
        (
            lease(renewed_ago=-2, started_ago=None),
            "running (kvc-controller-5f7d-abcde, renewed 0s ago; restarted 2 times)",
        ),
        # Whatever is in the object, it renders: garbage counts, a holder with control characters.
        (
            lease(renewed_ago=1, started_ago=None, transitions="x", holderIdentity="evil\x1b[2J\nname"),
            "running (evil [2J name, renewed 1s ago; restarted 0 times)",
        ),
        (
            {"spec": {"renewTime": "not a time", "leaseDurationSeconds": "soon"}},
            "NOT RENEWING - never renewed by an unknown holder: the controller may be down; this status may be stale",
        ),
        (None, "no heartbeat found (is the KVC controller running? no Lease kvc-controller in namespace kvc-system)"),
        (
            HeartbeatUnreadable("forbidden to read Lease kvc-system/kvc-controller"),
            "heartbeat not readable (forbidden to read Lease kvc-system/kvc-controller)",
        ),
    ],
)
def test_the_controller_line_says_whether_the_heartbeat_is_fresh(
    heartbeat: dict[str, Any] | HeartbeatUnreadable | None, text: str
) -> None:
    assert controller_heartbeat(heartbeat, NOW) == text


def test_no_heartbeat_names_the_namespace_looked_in() -> None:
    assert "no Lease kvc-controller in namespace kvc-ops)" in controller_heartbeat(None, NOW, "kvc-ops")


def test_the_controller_line_comes_right_after_the_state() -> None:
    report = status_report(
        vm({"state": "Running", "message": "all 1 volumes ready", "volumes": []}, [NFS_CONFIG]),
        controller=controller_heartbeat(lease(renewed_ago=3), NOW),
    )
    assert report.splitlines()[:5] == [
        "VolumeManager datasets in namespace team-a",
        "State:    Running",
        "Message:  all 1 volumes ready",
        "Controller: running (kvc-controller-5f7d-abcde, renewed 3s ago; started 2m5s ago; restarted 2 times)",
        "",
    ]
    unseen = status_report(vm(None), controller="no heartbeat found").splitlines()
    assert unseen[1:] == [
        "State:    not reported yet (is the KVC controller running?)",
        "Controller: no heartbeat found",
    ]


# --------------------------------------------------------------------------- selectors


@pytest.mark.parametrize(
    ("text", "requirements"),
    [
        ("team=vision", [Requirement("team", Operator.EQUALS, "vision")]),
        ("team==vision", [Requirement("team", Operator.EQUALS, "vision")]),
        (" team = vision ", [Requirement("team", Operator.EQUALS, "vision")]),
        ("team!=vision", [Requirement("team", Operator.NOT_EQUALS, "vision")]),
        ("team", [Requirement("team", Operator.EXISTS)]),
        ("!draft", [Requirement("draft", Operator.NOT_EXISTS)]),
        ("team=", [Requirement("team", Operator.EQUALS, "")]),
        ("example.com/team=vision", [Requirement("example.com/team", Operator.EQUALS, "vision")]),
        (
            "team=vision,kind!=model,approved",
            [
                Requirement("team", Operator.EQUALS, "vision"),
                Requirement("kind", Operator.NOT_EQUALS, "model"),
                Requirement("approved", Operator.EXISTS),
            ],
        ),
    ],
)
def test_selectors(text: str, requirements: list[Requirement]) -> None:
    assert list(parse_selector(text)) == requirements


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty requirement"),
        ("team=vision,,kind=x", "empty requirement"),
        ("team=vision,", "empty requirement"),
        ("=vision", "no label key"),
        ("!", "no label key"),
        ("team in (a,b)", "set-based requirements"),
        ("team=a=b", "'a=b' is not a label value"),
        ("team=vi sion", "is not a label value"),
        ("team=" + "v" * 64, "is not a label value"),
        ("-team=vision", "'-team' is not a label key"),
        ("t" * 64, "is not a label key"),
        ("a/b/c=x", "is not a label key"),
        ("/team=x", "is not a label key"),
        ("Example.com/team=x", "is not a label key"),
        ("!team=x", "is not a label key"),
    ],
)
def test_bad_selectors_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_selector(text)


@pytest.mark.parametrize(
    ("labels", "selector", "expected"),
    [
        ({"team": "vision", "kind": "dataset"}, "team=vision", True),
        ({"team": "vision", "kind": "dataset"}, "team=vision,kind=dataset", True),
        ({"team": "vision", "kind": "model"}, "team=vision,kind=dataset", False),
        ({"team": "nlp"}, "team=vision", False),
        ({}, "team=vision", False),
        (None, "team=vision", False),
        ({"team": "nlp"}, "team!=vision", True),
        ({}, "team!=vision", True),  # Kubernetes: != also matches objects without the key
        ({"team": "vision"}, "team!=vision", False),
        ({"team": ""}, "team", True),
        ({"kind": "x"}, "team", False),
        ({"draft": "yes"}, "!draft", False),
        ({}, "!draft", True),
    ],
)
def test_matches(labels: dict[str, str] | None, selector: str, expected: bool) -> None:
    assert matches(labels, parse_selector(selector)) is expected


def test_an_empty_selector_matches_everything() -> None:
    assert matches({}, ())
    assert matches(None, ())


@pytest.mark.parametrize("text", ["team=vision", "team!=vision", "team", "!team", "example.com/team="])
def test_requirements_print_as_they_are_written(text: str) -> None:
    (requirement,) = parse_selector(text)
    assert str(requirement) == text


# --------------------------------------------------------------------------- kvc datasets


def manager(namespace: str, name: str, configs: list[dict[str, Any]], volumes: list[Any] | None = None) -> Any:
    obj: dict[str, Any] = {"metadata": {"namespace": namespace, "name": name}, "spec": {"volumeConfigs": configs}}
    if volumes is not None:
        obj["status"] = {"volumes": volumes}
    return obj


VISION = {"team": "vision", "kind": "dataset"}


def test_dataset_rows_keep_matching_volumes_of_every_volumemanager_in_order() -> None:
    managers = [
        manager(
            "team-b",
            "models",
            [{"id": "bert", "sourceType": "HTTP", "labels": {"team": "nlp"}}],
            [{"id": "bert", "phase": "Ready"}],
        ),
        manager(
            "team-b",
            "images",
            [
                {"id": "imagenet", "sourceType": "S3", "labels": VISION},
                {"id": "coco", "sourceType": "NFS", "labels": {"team": "vision"}},
            ],
            [
                {"id": "imagenet", "phase": "Degraded", "replicas": {"desired": 3, "ready": 2}},
                {"id": "coco", "phase": "Ready"},
            ],
        ),
        manager("team-a", "datasets", [{"id": "cifar", "sourceType": "S3", "labels": VISION}]),
        manager("team-c", "unlabelled", [{"id": "misc", "sourceType": "PVC"}]),
    ]
    rows = dataset_rows(managers, parse_selector("team=vision"))
    assert rows == [
        DatasetRow("team-a", "datasets", "cifar", "S3", "-", "-", "kind=dataset,team=vision"),
        DatasetRow("team-b", "images", "imagenet", "S3", "Degraded", "2/3", "kind=dataset,team=vision"),
        DatasetRow("team-b", "images", "coco", "NFS", "Ready", "-", "team=vision"),
    ]
    assert [row.id for row in dataset_rows(managers, ())] == ["cifar", "imagenet", "coco", "bert", "misc"]
    assert [row.id for row in dataset_rows(managers, parse_selector("!team"))] == ["misc"]


def test_dataset_rows_render_under_the_documented_headers() -> None:
    rows = dataset_rows([manager("ns", "vm", [{"id": "a", "sourceType": "S3", "labels": VISION}])], ())
    header, row = render_table(DATASET_HEADERS, rows).splitlines()
    assert header.split() == ["NAMESPACE", "VOLUMEMANAGER", "ID", "SOURCE", "PHASE", "REPLICAS", "LABELS"]
    assert row.split() == ["ns", "vm", "a", "S3", "-", "-", "kind=dataset,team=vision"]


def test_dataset_rows_skip_malformed_entries() -> None:
    odd = {"metadata": {"namespace": "ns", "name": "vm"}, "spec": {"volumeConfigs": ["x", {"id": "a"}]}, "status": 7}
    assert dataset_rows([odd, {}], ()) == [DatasetRow("ns", "vm", "a", "-", "-", "-", "-")]
