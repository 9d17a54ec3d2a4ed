"""The bad-input corpus (tests/corpus/*.yaml) against the real API server, controller and
webhook: every malformed VolumeManager is refused by the API server with its exact message
or turns Failed with its exact message, and every malformed Pod or training job is denied
with its exact message when created through the API server.

The functions that turn a case into a request are kvc.testing.corpus's, shared with the unit
run (tests/test_corpus.py), so both runs send the same objects.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from e2e.cluster import ControlPlane
from e2e.helpers import wait_for
from e2e.kvc import KvcController, KvcWebhook
from kvc.testing.corpus import (
    ADMISSION,
    DECODE_PREFIX,
    DEFAULT_CONTAINERS,
    FAILED,
    GROUP,
    PLURAL,
    REFUSED,
    THROUGH_API_SERVER,
    VERSION,
    VOLUMEMANAGER_OUTCOMES,
    api_message,
    catalog_volumemanager,
    expected_text,
    failed_messages,
    failed_summary,
    ids,
    outcome,
    schema_messages,
    volumemanager_body,
    volumemanager_name,
    workload,
)
from kvc.wiring.mutation import INJECTED

TRAINING_CRDS = Path(__file__).resolve().parent / "manifests" / "kubeflow-training-crds.yaml"
# The webhook registrations of deploy/webhook, as the API server names them in denials.
POD_HOOK, JOB_HOOK = "volumes.kvc.kubeflow.org", "jobs.kvc.kubeflow.org"

# --------------------------------------------------------------------------- fixtures


def _namespace(api: Any, prefix: str) -> str:
    core = client.CoreV1Api(api)
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"kvc.test/e2e": "true"}}})
    # Pods are refused until the ServiceAccount controller has created `default`.
    wait_for(
        lambda: core.list_namespaced_service_account(name, field_selector="metadata.name=default").items,
        timeout=30,
        what=f"the default ServiceAccount of {name}",
    )
    return name


@pytest.fixture(scope="module")
def corpus_namespace(api: Any, kvc_crds: None) -> Iterator[str]:
    """One namespace for the whole module: cases have distinct names, and one namespace is
    much quicker than one per case."""
    name = _namespace(api, "kvc-corpus")
    yield name
    client.CoreV1Api(api).delete_namespace(name)


@pytest.fixture(scope="module")
def failed_volumemanagers(
    api: Any, corpus_namespace: str, controller_process: KvcController
) -> dict[str, dict[str, Any]]:
    """Every `failed` case created at once and read back once the controller has reported on
    each (whatever it reported: each case's test judges its own)."""
    custom = client.CustomObjectsApi(api)
    wanted = {volumemanager_name(case) for case in FAILED}
    for case in FAILED:
        custom.create_namespaced_custom_object(GROUP, VERSION, corpus_namespace, PLURAL, volumemanager_body(case))

    def all_reported() -> dict[str, dict[str, Any]] | None:
        listed = custom.list_namespaced_custom_object(GROUP, VERSION, corpus_namespace, PLURAL)["items"]
        reported = {
            vm["metadata"]["name"]: vm
            for vm in listed
            if vm["metadata"]["name"] in wanted
            and (vm.get("status") or {}).get("observedGeneration") == vm["metadata"]["generation"]
        }
        return reported if len(reported) == len(wanted) else None

    result: dict[str, dict[str, Any]] = wait_for(all_reported, timeout=60, what="a status on every Failed case")
    # The snapshot is all the cases need; deleted now, they stop costing the controller a
    # pass every resync for the rest of the run.
    for name in wanted:
        custom.delete_namespaced_custom_object(GROUP, VERSION, corpus_namespace, PLURAL, name)
    return result


@pytest.fixture(scope="module")
def corpus_webhook(
    control_plane: ControlPlane, api: Any, kvc_crds: None, controller_process: KvcController
) -> Iterator[KvcWebhook]:
    """KVC's webhook registered as deploy/webhook registers it, and the training job CRDs."""
    control_plane.kubectl("apply", "--server-side", "-f", str(TRAINING_CRDS))
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/tfjobs.kubeflow.org",
        "crd/pytorchjobs.kubeflow.org",
    )
    running = KvcWebhook(control_plane, name="kvc-corpus-webhook").start()
    with running.registered(api):
        yield running
    running.stop()


def _phases_match(custom: Any, namespace: str, manager: Mapping[str, Any]) -> bool:
    """Whether the controller reports the catalog VolumeManager's volumes as the corpus has them."""
    try:
        vm = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manager["name"])
    except ApiException:
        return False
    reported = {v["id"]: v for v in (vm.get("status") or {}).get("volumes") or []}
    for volume in manager["volumes"]:
        seen = reported.get(volume["config"]["id"]) or {}
        if seen.get("phase") != volume["phase"]:
            return False
        if "message" in volume and seen.get("message") != volume["message"]:
            return False
    return True


def _index_agrees(core: Any, namespace: str, manager: Mapping[str, Any], volume: Mapping[str, Any]) -> bool:
    """Whether the webhook's index holds the volume in the corpus' phase: a dry-run pod
    asking for it is denied as Failed, gated while Pending, or wired to its data when Ready."""
    ref = f"{manager['name']}/{volume['config']['id']}"
    probe = {
        "metadata": {"name": "index-probe", "annotations": {"kvc/volume": ref}},
        "spec": {"containers": DEFAULT_CONTAINERS},
    }
    try:
        created = core.create_namespaced_pod(namespace, probe, dry_run="All")
    except ApiException as exc:
        return volume["phase"] == "Failed" and f"KVC: volume {ref} is Failed" in api_message(exc)
    gated = bool(created.spec.scheduling_gates)
    wired = INJECTED in (created.metadata.annotations or {})
    return wired and gated == (volume["phase"] in ("Pending", "Provisioning"))


@pytest.fixture(scope="module")
def admission_namespace(api: Any, controller_process: KvcController) -> Iterator[str]:
    """A namespace holding the corpus' catalog (the controller reports on it meanwhile)."""
    name = _namespace(api, "kvc-corpus-admission")
    custom = client.CustomObjectsApi(api)
    for manager in ADMISSION["catalog"]["volumemanagers"]:
        custom.create_namespaced_custom_object(GROUP, VERSION, name, PLURAL, catalog_volumemanager(manager))
    yield name
    client.CoreV1Api(api).delete_namespace(name)


@pytest.fixture(scope="module")
def catalog_ready(api: Any, admission_namespace: str, corpus_webhook: KvcWebhook) -> str:
    """The catalog's namespace once the controller and the webhook's index both hold every
    volume in the phase the corpus gives it."""
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    managers = ADMISSION["catalog"]["volumemanagers"]
    wait_for(
        lambda: all(_phases_match(custom, admission_namespace, manager) for manager in managers),
        timeout=60,
        what="the controller to report the catalog's volumes in the corpus' phases",
    )
    wait_for(
        lambda: all(
            _index_agrees(core, admission_namespace, manager, volume)
            for manager in managers
            for volume in manager["volumes"]
        ),
        timeout=30,
        what="the webhook's index to hold the catalog's volumes in the corpus' phases",
    )
    return admission_namespace


# --------------------------------------------------------------------------- VolumeManagers


def refusal(create: Callable[[], Any]) -> tuple[int, str] | None:
    """The API server's (status, message) when it refuses ``create``; None when it accepts."""
    try:
        create()
    except ApiException as exc:
        return exc.status, api_message(exc)
    return None


@pytest.mark.parametrize("case", REFUSED, ids=ids(REFUSED))
def test_malformed_volumemanager_is_refused_by_the_api_server_with_its_message(
    api: Any, corpus_namespace: str, case: dict[str, Any]
) -> None:
    custom = client.CustomObjectsApi(api)
    strict = {"field_validation": "Strict"} if case.get("strict") else {}
    refused = refusal(
        lambda: custom.create_namespaced_custom_object(
            GROUP, VERSION, corpus_namespace, PLURAL, volumemanager_body(case), **strict
        )
    )
    if refused is None:
        custom.delete_namespaced_custom_object(GROUP, VERSION, corpus_namespace, PLURAL, volumemanager_name(case))
        pytest.fail(f"the API server accepted {case['name']}: {case['why']}")
    if outcome(case, VOLUMEMANAGER_OUTCOMES) == "schema":
        messages = schema_messages(case)
        status, message = refused
        # Compared with the first order when none matches, so that the failure shows a diff.
        assert (status, message) == (422, message if message in messages else messages[0])
    else:
        assert refused == (400, DECODE_PREFIX + case["decode"])


@pytest.mark.parametrize("case", FAILED, ids=ids(FAILED))
def test_malformed_volumemanager_turns_failed_with_its_message(
    failed_volumemanagers: dict[str, dict[str, Any]], case: dict[str, Any]
) -> None:
    status = failed_volumemanagers[volumemanager_name(case)]["status"]
    volumes = [(v["phase"], v["message"]) for v in status["volumes"]]
    assert volumes == [("Failed", message) for message in failed_messages(case)]
    assert (status["state"], status["message"]) == ("Failed", failed_summary(case))


# --------------------------------------------------------------------------- admission


@pytest.mark.parametrize("case", THROUGH_API_SERVER, ids=ids(THROUGH_API_SERVER))
def test_malformed_workload_gets_its_answer_through_the_api_server(
    api: Any, catalog_ready: str, case: dict[str, Any]
) -> None:
    obj = workload(case)
    namespace = catalog_ready
    stored: dict[str, Any] = {}

    def create() -> None:
        if obj["kind"] == "Pod":
            stored.update(api.sanitize_for_serialization(client.CoreV1Api(api).create_namespaced_pod(namespace, obj)))
        else:
            plural = obj["kind"].lower() + "s"
            custom = client.CustomObjectsApi(api)
            stored.update(custom.create_namespaced_custom_object("kubeflow.org", "v1", namespace, plural, obj))

    refused = refusal(create)
    if "deny" in case:
        hook = POD_HOOK if obj["kind"] == "Pod" else JOB_HOOK
        expected = f'admission webhook "{hook}" denied the request: {expected_text(case["deny"], namespace)}'
        assert refused == (403, expected)
        return
    assert refused is None
    assert case["allow"] == "unchanged"
    # Unchanged by KVC: no marker, no volume of KVC's, no gate (the API server's own
    # defaults, such as the ServiceAccount token volume, are not KVC's doing).
    assert INJECTED not in (stored["metadata"].get("annotations") or {})
    spec = stored["spec"]
    assert not [volume["name"] for volume in spec.get("volumes") or [] if volume["name"].startswith("kvc-")]
    assert not spec.get("schedulingGates")
