"""The bad-input corpus (``tests/corpus/*.yaml``): its cases, and the objects they create.

Shared by the unit run (``tests/test_corpus.py``) and the run against the real API server,
controller and webhook (``e2e/test_corpus.py``), so both send the same objects.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client.rest import ApiException

from kvc.api import names

# The admin settings the corpus's cases are written for (the controller's
# --allowed-data-root and --allowed-nfs-server in both runs). A node path the admin lets
# users choose for their data (options.dataPath):
ALLOWED_DATA_ROOT = "/data/kvc"
# The NFS servers the tests, the corpus, the demo's samples and the benchmark name: allowed
# by the admin (--allowed-nfs-server); any other is refused.
ALLOWED_NFS_SERVERS = ("nfs.example.com", "mirror.example.com", "nfs.storage.example.com", "nfs")

CORPUS = Path(__file__).resolve().parents[2] / "tests" / "corpus"
GROUP, VERSION, PLURAL = names.GROUP, names.VERSION, names.VOLUMEMANAGER_PLURAL

VOLUMEMANAGER_OUTCOMES = ("schema", "decode", "failed")
ADMISSION_REQUESTS = ("body", "generated", "review", "pod", "job")
ADMISSION_OUTCOMES = ("http", "deny", "allow")
# The prefixes the API server puts before the message of a refused VolumeManager.
INVALID_PREFIX = 'VolumeManager.kvc.kubeflow.org "{name}" is invalid: '
DECODE_PREFIX = 'VolumeManager in version "v1" cannot be handled as a VolumeManager: '
DEFAULT_CONTAINERS = [{"name": "main", "image": "busybox:1.36"}]


# --------------------------------------------------------------------------- the corpus


def volumemanager_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = yaml.safe_load((CORPUS / "volumemanagers.yaml").read_text())
    return cases


def admission_corpus() -> dict[str, Any]:
    corpus: dict[str, Any] = yaml.safe_load((CORPUS / "admission.yaml").read_text())
    return corpus


def outcome(case: Mapping[str, Any], kinds: tuple[str, ...]) -> str:
    """The one expected-outcome key of ``case``."""
    found = [kind for kind in kinds if kind in case]
    if len(found) != 1:
        raise ValueError(f"case {case.get('name')} must have exactly one of {', '.join(kinds)}, has {found}")
    return found[0]


def volumemanager_name(case: Mapping[str, Any]) -> str:
    return str(case.get("metadata_name", case["name"]))


def volumemanager_body(case: Mapping[str, Any]) -> dict[str, Any]:
    """The VolumeManager a case creates: its volumes, or its whole spec (none for `spec: null`)."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": names.VOLUMEMANAGER_KIND,
        "metadata": {"name": volumemanager_name(case)},
    }
    if "volumes" in case:
        body["spec"] = {"volumeConfigs": case["volumes"]}
    elif case.get("spec") is not None:
        body["spec"] = case["spec"]
    return body


def schema_messages(case: Mapping[str, Any]) -> list[str]:
    """The API server's whole message for a `schema` case: one error, or several as "[a, b]"
    in any order (it reports sibling fields in no fixed order)."""
    errors = case["schema"]
    prefix = INVALID_PREFIX.format(name=volumemanager_name(case))
    if not isinstance(errors, list):
        return [prefix + str(errors)]
    return [f"{prefix}[{', '.join(order)}]" for order in itertools.permutations(errors)]


def failed_messages(case: Mapping[str, Any]) -> list[str]:
    """One expected status message per volume of a `failed` case."""
    expected = case["failed"]
    return [str(message) for message in expected] if isinstance(expected, list) else [str(expected)]


def failed_summary(case: Mapping[str, Any]) -> str:
    """The VolumeManager's status.message when every volume failed: `<id>: <message>; ...`."""
    ids = [str(volume["id"]) for volume in case["volumes"]]
    return "; ".join(f"{volume_id}: {message}" for volume_id, message in zip(ids, failed_messages(case), strict=True))


def catalog_volumemanager(manager: Mapping[str, Any]) -> dict[str, Any]:
    """A catalog VolumeManager, as created in the e2e run (spec only)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": names.VOLUMEMANAGER_KIND,
        "metadata": {"name": manager["name"]},
        "spec": {"volumeConfigs": [volume["config"] for volume in manager["volumes"]]},
    }


def pod_object(case: Mapping[str, Any]) -> dict[str, Any]:
    """The Pod of a `pod` case, named after the case."""
    pod = case["pod"]
    metadata: dict[str, Any] = {"name": case["name"]}
    for field in ("annotations", "labels"):
        if field in pod:
            metadata[field] = pod[field]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": pod.get("spec", {"containers": DEFAULT_CONTAINERS}),
    }


def workload(case: Mapping[str, Any]) -> dict[str, Any]:
    """The object a `pod` or `job` case creates."""
    if "pod" in case:
        return pod_object(case)
    job: dict[str, Any] = case["job"]
    return job


def expected_text(text: str, namespace: str) -> str:
    return text.replace("{namespace}", namespace)


def api_message(exc: ApiException) -> str:
    return str(json.loads(exc.body)["message"])


VOLUMEMANAGER_CASES = volumemanager_cases()
REFUSED = [c for c in VOLUMEMANAGER_CASES if outcome(c, VOLUMEMANAGER_OUTCOMES) != "failed"]
FAILED = [c for c in VOLUMEMANAGER_CASES if outcome(c, VOLUMEMANAGER_OUTCOMES) == "failed"]
ADMISSION = admission_corpus()
# What the API server sends the webhook: CREATE of pods and training jobs. Raw bodies and
# reviews exist only between the API server and the webhook, so the unit run covers them.
THROUGH_API_SERVER = [c for c in ADMISSION["cases"] if ("pod" in c or "job" in c) and "operation" not in c]


def ids(cases: list[dict[str, Any]]) -> list[str]:
    return [str(case["name"]) for case in cases]
