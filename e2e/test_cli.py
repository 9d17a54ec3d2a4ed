"""`kvc status` and `kvc datasets` as an operator runs them: the real command, against the real
control plane, reading VolumeManagers the controller and agents brought to Running."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from e2e.cluster import ControlPlane
from e2e.helpers import VolumeManagers, wait_for
from e2e.kvc import KvcAgent, KvcController
from e2e.s3server import S3Server, credentials_secret
from kvc.api import names

FULL_BAR = "[####################]"


def kvc(control_plane: ControlPlane, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvc", *args],
        env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def nfs_volume(volume_id: str, team: str) -> dict[str, Any]:
    return {
        "id": volume_id,
        "sourceType": "NFS",
        "accessMode": "ReadWriteMany",
        "capacity": "1Gi",
        "labels": {"team": team, "kind": "dataset"},
        "options": {"server": "nfs.example.com", "path": f"/exports/{volume_id}"},
    }


@pytest.fixture
def other_namespace(api: Any) -> Iterator[str]:
    core = client.CoreV1Api(api)
    name = f"kvc-e2e-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"kvc.test/e2e": "true"}}})
    yield name
    core.delete_namespace(name)


def test_status_shows_each_node_holding_an_s3_replica_complete(
    control_plane: ControlPlane,
    api: Any,
    namespace: str,
    controller: KvcController,
    agents: dict[str, KvcAgent],
    s3: S3Server,
) -> None:
    bucket = f"cli-{uuid.uuid4().hex[:8]}"
    s3_client = s3.client()
    s3_client.create_bucket(Bucket=bucket)
    for index in range(3):
        s3_client.put_object(Bucket=bucket, Key=f"images/part-{index}.bin", Body=os.urandom(700_000 + index))
    client.CoreV1Api(api).create_namespaced_secret(namespace, credentials_secret("aws-creds"))
    vms = VolumeManagers(api, namespace)
    vms.create(
        "images",
        [
            {
                "id": "imagenet",
                "sourceType": "S3",
                "replicas": 2,
                "accessMode": "ReadOnlyMany",
                "capacity": "10Mi",
                "labels": {"team": "vision"},
                "options": {
                    "sourceURL": f"s3://{bucket}/images/",
                    "endpointURL": s3.endpoint_url,
                    "awsCredentialsSecretName": "aws-creds",
                },
            }
        ],
    )
    volume = vms.wait_state("images", "Running", timeout=120)["status"]["volumes"][0]
    holders = {node["name"] for node in volume["nodes"]}
    assert len(holders) == 2

    result = kvc(control_plane, "status", "images", "-n", namespace)
    print(result.stdout)  # shown with -rP: what an operator sees
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        f"VolumeManager images in namespace {namespace}",
        "State:    Running",
        "Message:  all 1 volumes ready",
    ]
    assert next(line for line in lines if line.startswith("imagenet")).split()[:4] == ["imagenet", "S3", "Ready", "2/2"]
    assert f"    claim {volume['claimName']} (PersistentVolume {volume['persistentVolumeName']})" in lines
    node_lines = {line.split()[0]: line.split() for line in lines if line.startswith("    ") and "claim" not in line}
    assert set(node_lines) == holders  # the third node holds nothing and is not listed
    for fields in node_lines.values():
        assert fields[1:3] == [FULL_BAR, "100%"]
        assert fields[3:7] == ["2.1", "MB", "/", "2.1"]  # 3 objects of 700 kB: 2,100,003 bytes
        assert "Ready" in fields


def test_status_of_an_nfs_volume_shows_its_claim(
    control_plane: ControlPlane, api: Any, namespace: str, controller: KvcController
) -> None:
    vms = VolumeManagers(api, namespace)
    vms.create("shared", [nfs_volume("scratch", "vision")])
    volume = vms.wait_state("shared", "Running")["status"]["volumes"][0]

    result = kvc(control_plane, "status", "shared", "--namespace", namespace)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-2].split()[:4] == ["scratch", "NFS", "Ready", "-"]
    assert lines[-1] == f"    claim {volume['claimName']} (PersistentVolume {volume['persistentVolumeName']})"
    bound = vms.core.read_namespaced_persistent_volume_claim(volume["claimName"], namespace)
    assert bound.status.phase == "Bound"


def controller_lease(api: Any, namespace: str) -> dict[str, Any] | None:
    """The controller's heartbeat Lease as the API server stores it; None when there is none."""
    try:
        response = client.CoordinationV1Api(api).read_namespaced_lease(
            names.CONTROLLER_LEASE, namespace, _preload_content=False
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    lease: dict[str, Any] = json.loads(response.data)
    return lease


def test_status_tells_a_restarted_controller_from_one_that_stopped_renewing(
    control_plane: ControlPlane, api: Any, namespace: str, controller_process: KvcController
) -> None:
    """The heartbeat Lease, for real: a controller SIGKILLed is NOT RENEWING once its Lease's
    duration has passed; started again, its new process takes the Lease over, counted as a
    restart. `kvc status` says each, and shows the VolumeManager all along."""
    # A controller of its own, whose 3-second Lease lives in the test's namespace (stale within
    # seconds, and no other test's); the session's makes way for it.
    controller_process.stop()
    controller = KvcController(control_plane, extra_args=[f"--lease-namespace={namespace}", "--lease-duration=3"])
    controller.name = "kvc-controller-heartbeat"
    controller.env["POD_NAME"] = ""  # not in a pod: the holder is <hostname>-<pid>
    vms = VolumeManagers(api, namespace)

    def controller_line() -> str:
        result = kvc(control_plane, "status", "shared", "-n", namespace, "--kvc-namespace", namespace)
        print(result.stdout)  # shown with -rP: what an operator sees
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[1:3] == ["State:    Running", "Message:  all 1 volumes ready"]  # whatever the controller
        return lines[3]

    try:
        controller.start()
        vms.create("shared", [nfs_volume("scratch", "vision")])
        vms.wait_state("shared", "Running")
        first = wait_for(lambda: controller_lease(api, namespace), what="the controller's Lease")
        holder = f"{socket.gethostname()}-{controller.pid}"
        assert first["spec"]["holderIdentity"] == holder
        assert (first["spec"]["leaseTransitions"], first["spec"]["leaseDurationSeconds"]) == (0, 3)
        assert re.fullmatch(
            rf"Controller: running \({re.escape(holder)}, renewed [0-3]s ago; started \S+ ago; restarted 0 times\)",
            controller_line(),
        )

        # Killed (as the OOM killer would): nothing renews the Lease, and after its 3 s `kvc
        # status` says the status it shows may be stale.
        controller.kill()
        stale = wait_for(
            lambda: (line := controller_line()).startswith("Controller: NOT RENEWING") and line,
            timeout=20,
            what="kvc status to say the controller is not renewing",
        )
        assert re.fullmatch(
            rf"Controller: NOT RENEWING - last renewed \d+s ago by {re.escape(holder)}: the controller may be down;"
            " this status may be stale",
            stale,
        )

        # Started again with the same flags, as the kubelet restarts a container: a new process.
        controller.restart()
        second = wait_for(
            lambda: (lease := controller_lease(api, namespace)) and lease["spec"]["holderIdentity"] != holder and lease,
            what="the restarted controller to take its Lease over",
        )
        new_holder = f"{socket.gethostname()}-{controller.pid}"
        assert second["spec"]["holderIdentity"] == new_holder != holder
        assert second["spec"]["leaseTransitions"] == 1

        def started(lease: dict[str, Any]) -> dt.datetime:
            return dt.datetime.fromisoformat(lease["spec"]["acquireTime"])

        assert started(second) > started(first)
        assert re.fullmatch(
            rf"Controller: running \({re.escape(new_holder)}, renewed [0-3]s ago; started \S+ ago;"
            r" restarted 1 time\)",
            controller_line(),
        )
    finally:
        controller.stop()
        controller_process.start()


def test_datasets_finds_labelled_volumes_in_every_namespace(
    control_plane: ControlPlane, api: Any, namespace: str, other_namespace: str, controller: KvcController
) -> None:
    VolumeManagers(api, namespace).create("vision", [nfs_volume("coco", "vision"), nfs_volume("notes", "nlp")])
    VolumeManagers(api, other_namespace).create("archive", [nfs_volume("imagenet", "vision")])
    VolumeManagers(api, other_namespace).create("text", [nfs_volume("wiki", "nlp")])
    VolumeManagers(api, namespace).wait_state("vision", "Running")
    VolumeManagers(api, other_namespace).wait_state("archive", "Running")

    result = kvc(control_plane, "datasets", "-l", "team=vision", "-A")
    assert result.returncode == 0, result.stderr
    header, *rows = (line.split() for line in result.stdout.splitlines())
    assert header == ["NAMESPACE", "VOLUMEMANAGER", "ID", "SOURCE", "PHASE", "REPLICAS", "LABELS"]
    ours = sorted(row[:5] for row in rows if row[0] in (namespace, other_namespace))
    assert ours == sorted(
        [[namespace, "vision", "coco", "NFS", "Ready"], [other_namespace, "archive", "imagenet", "NFS", "Ready"]]
    )
    assert all("team=vision" in row[-1].split(",") for row in rows)  # other tests' volumes too

    # -n searches one namespace; several requirements must all hold.
    result = kvc(control_plane, "datasets", "-n", other_namespace, "-l", "kind=dataset", "-l", "team!=vision")
    assert result.returncode == 0, result.stderr
    assert [line.split()[:3] for line in result.stdout.splitlines()[1:]] == [[other_namespace, "text", "wiki"]]

    result = kvc(control_plane, "datasets", "-n", other_namespace, "-l", "team=robotics")
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr == f'No volumes matching team=robotics in namespace "{other_namespace}".\n'


def test_a_missing_volumemanager_is_one_line_and_exit_code_1(
    control_plane: ControlPlane, namespace: str, kvc_crds: None
) -> None:
    result = kvc(control_plane, "status", "nope", "-n", namespace)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f'kvc: volumemanager "nope" not found in namespace "{namespace}"\n'


def test_a_bad_selector_is_a_usage_error(control_plane: ControlPlane) -> None:
    result = kvc(control_plane, "datasets", "-A", "-l", "team in (vision)")
    assert result.returncode == 2
    (error,) = (line for line in result.stderr.splitlines() if line.startswith("Error:"))
    assert "set-based requirements such as 'key in (a,b)' are not supported" in error
