"""Who still refers to a volume's earlier data besides the pods running on its nodes: pods not
scheduled yet (gated or pending) and the training workloads whose pod templates mount it.

A training workload (TrainJob, JobSet, LeaderWorkerSet, TFJob, PyTorchJob: kvc.wiring.mutation's
WORKLOADS) makes its pods from the templates the webhook wired when it was created (a
TrainJob, from its runtime's, patched by the runtime patch KVC added). After the volume's
source changes, the job's next pods (a restarted worker, a scale-up) still mount the earlier
claim, and a pod gated while the earlier data was being
fetched can never be given another volume (a pod's volumes are immutable). So the earlier
data, its claim and its PV stay while such a job or pod refers to them: the job's workers all
read the same data, and none waits for a claim that is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException

from kvc.sources.base import SourceContext
from kvc.wiring.mutation import WORKLOADS, pod_templates

logger = logging.getLogger(__name__)

_FINISHED = ("Succeeded", "Failed")


@dataclass(frozen=True)
class Readers:
    """The pods and workloads (``pod/x``, ``tfjob/y``, ``trainjob/z``) that refer to each claim and each host path."""

    claims: Mapping[str, list[str]] = field(default_factory=dict)
    paths: Mapping[str, list[str]] = field(default_factory=dict)

    def of(self, claim: str, path: str) -> list[str]:
        return sorted({*self.claims.get(claim, []), *self.paths.get(path, [])})


def _collect(items: Iterable[tuple[str, Iterable[Mapping[str, Any]]]]) -> Readers:
    """Readers of (reader, its pod volumes as dicts)."""
    claims: dict[str, list[str]] = {}
    paths: dict[str, list[str]] = {}
    for reader, volumes in items:
        for volume in volumes:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            path = (volume.get("hostPath") or {}).get("path")
            if claim:
                claims.setdefault(str(claim), []).append(reader)
            if path:
                paths.setdefault(str(path), []).append(reader)
    return Readers(claims, paths)


def job_volumes(kind: str, job: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every volume of every pod template of a training workload of ``kind`` (pure): what the
    API server stored, read as it comes (a malformed part holds no volume)."""
    for template in pod_templates({**job, "kind": kind}, strict=False):
        spec = template.template.get("spec")
        volumes = spec.get("volumes") if isinstance(spec, dict) else None
        yield from (v for v in volumes if isinstance(v, dict)) if isinstance(volumes, list) else ()


def job_finished(kind: str, job: Mapping[str, Any]) -> bool:
    """Whether the workload has ended for good (a LeaderWorkerSet never does)."""
    conditions = (job.get("status") or {}).get("conditions") or []
    finished = WORKLOADS[kind].finished
    return any(c.get("type") in finished and c.get("status") == "True" for c in conditions)


def training_jobs(ctx: SourceContext) -> list[tuple[str, dict[str, Any]]]:
    """The VolumeManager's namespace's training workloads that have not finished, as (kind, job).

    Where a workload's CRD is not installed (404), or KVC may not read it (403), there are
    none of that kind to keep data for.
    """
    jobs = []
    for kind, workload in WORKLOADS.items():
        try:
            listed = ctx.custom.list_namespaced_custom_object(
                workload.group, workload.version, ctx.owner.namespace, workload.plural
            )
        except ApiException as exc:
            if exc.status not in (403, 404):
                raise
            logger.debug("no %s to look at in %s (API answered %s)", workload.plural, ctx.owner.namespace, exc.status)
            continue
        jobs += [(kind, job) for job in listed.get("items", []) if not job_finished(kind, job)]
    return jobs


def job_readers(ctx: SourceContext) -> Readers:
    return _collect(
        (f"{kind.lower()}/{job['metadata']['name']}", job_volumes(kind, job)) for kind, job in training_jobs(ctx)
    )


def waiting_readers(ctx: SourceContext) -> Readers:
    """Pods of the namespace not scheduled yet and not finished, and training jobs not finished."""
    pods = ctx.core.list_namespaced_pod(ctx.owner.namespace, field_selector="spec.nodeName=").items
    serialize = ctx.core.api_client.sanitize_for_serialization
    waiting = _collect(
        (f"pod/{pod.metadata.name}", serialize(pod.spec).get("volumes") or [])
        for pod in pods
        if pod.spec and not (pod.status and pod.status.phase in _FINISHED)
    )
    jobs = job_readers(ctx)
    return Readers(_merge(waiting.claims, jobs.claims), _merge(waiting.paths, jobs.paths))


def _merge(*parts: Mapping[str, list[str]]) -> dict[str, list[str]]:
    merged: dict[str, list[str]] = {}
    for part in parts:
        for key, readers in part.items():
            merged.setdefault(key, []).extend(readers)
    return merged
